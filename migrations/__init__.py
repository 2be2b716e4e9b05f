"""Alembic migrations of the state database, shipped as ``audience_sync.migrations``."""
