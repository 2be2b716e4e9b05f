"""audience-sync: keep Gist contacts' audience properties in step with audience membership.

``audience_sync.run(config, audiences)`` syncs once from Python (see ``audience_sync.api``).
"""

__version__ = "0.1.0"

from audience_sync.api import RunResult, exit_code, run

__all__ = ["RunResult", "__version__", "exit_code", "run"]
