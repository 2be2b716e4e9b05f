"""audience-sync: keep Gist contacts' audience properties in step with audience membership.

``audience_sync.run(config, audiences)`` syncs once from Python (see ``audience_sync.api``).
"""

__version__ = "0.1.0"

from audience_sync.api import audiences, exit_code, failure_kind, is_retriable, run
from audience_sync.errors import (
    RETRIABLE_FAILURES,
    AudienceSyncError,
    ConfigError,
    FailureKind,
    StateError,
)
from audience_sync.runs import RunResult

__all__ = [
    "RETRIABLE_FAILURES",
    "AudienceSyncError",
    "ConfigError",
    "FailureKind",
    "RunResult",
    "StateError",
    "__version__",
    "audiences",
    "exit_code",
    "failure_kind",
    "is_retriable",
    "run",
]
