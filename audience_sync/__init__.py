"""audience-sync: keep Gist contacts' audience properties in step with audience membership.

``audience_sync.run(config, audiences)`` syncs once from Python (see ``audience_sync.api``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The API and the error classes it documents, imported on first use: the command line
# imports this package first, and a Ctrl-C during a second of imports it cannot catch yet
# would end in a traceback.
_LAZY = {
    "RunResult": "audience_sync.runs",
    "audiences": "audience_sync.api",
    "exit_code": "audience_sync.api",
    "failure_kind": "audience_sync.api",
    "is_retriable": "audience_sync.api",
    "run": "audience_sync.api",
    "RETRIABLE_FAILURES": "audience_sync.errors",
    "AudienceSyncError": "audience_sync.errors",
    "ConfigError": "audience_sync.errors",
    "FailureKind": "audience_sync.errors",
    "StateError": "audience_sync.errors",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
