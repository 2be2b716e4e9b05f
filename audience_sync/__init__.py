"""audience-sync: keep Gist contacts' audience properties in step with audience membership.

``audience_sync.run(config, audiences)`` syncs once from Python (see ``audience_sync.api``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from audience_sync.api import RunResult, exit_code, run

__all__ = ["RunResult", "__version__", "exit_code", "run"]


def __getattr__(name: str) -> Any:
    # The API is imported on first use: the command line imports this package first, and a
    # Ctrl-C during a second of imports it cannot catch yet would end in a traceback.
    if name in ("RunResult", "exit_code", "run"):
        from audience_sync import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
