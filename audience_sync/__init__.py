"""audience-sync: keep Gist contacts' audience properties in step with audience membership."""

__version__ = "0.1.0"
