"""The exception tree of audience-sync; every error the CLI maps to an exit code lives here.

AudienceSyncError
├── ConfigError            bad or missing configuration (exit 2)
├── StateError             the state database is unusable or behind its migrations (exit 2)
├── SourceError            an audience's source could not be read (that run fails)
├── LockHeldError          another process holds an audience's lease (exit 3)
├── FencedError            a request may not leave: its lease is lost or unconfirmed too long
├── StopRequestedError     a signal asked the run to stop (run ends `interrupted`)
└── ApiError               Gist answered something other than 2xx, or not at all
    ├── RetriableApiError  429, 5xx, timeouts, dropped connections: try again later
    └── FatalApiError      other 4xx: this change cannot be delivered as it is
        ├── AuthError      401/403: the API key is wrong; stop the whole run
        └── UnreachableError  Gist cannot be reached as configured (TLS, protocol): stop
"""

from __future__ import annotations


class AudienceSyncError(Exception):
    """Base class of every error raised on purpose by audience-sync."""


class ConfigError(AudienceSyncError):
    """The configuration is missing, malformed or inconsistent."""


class StateError(AudienceSyncError):
    """The state database cannot be used as it is (e.g. behind its migrations)."""


class SourceError(AudienceSyncError):
    """An audience's source could not be read; the message names the file, row or query."""


class LockHeldError(AudienceSyncError):
    """Another process holds the lease on an audience."""

    def __init__(self, audience_key: str, owner: str) -> None:
        super().__init__(f"audience {audience_key!r} is being synced by {owner}")
        self.audience_key = audience_key
        self.owner = owner


class FencedError(AudienceSyncError):
    """A request may not leave: its audience's lease was lost, or its last confirmed renewal
    is too old for the request to finish before the lease could expire."""

    def __init__(self, audience_key: str, reason: str) -> None:
        super().__init__(reason)
        self.audience_key = audience_key
        self.reason = reason


class StopRequestedError(AudienceSyncError):
    """A stop was requested (SIGTERM, Ctrl-C) while the run was under way."""


class ApiError(AudienceSyncError):
    """Gist did not acknowledge a request."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetriableApiError(ApiError):
    """A transient failure; ``retry_after`` is Gist's requested wait in seconds, if it gave one."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class FatalApiError(ApiError):
    """Gist refused this request; sending it again unchanged will not help."""


class AuthError(FatalApiError):
    """Gist refused the API key; no further request can succeed."""


class UnreachableError(FatalApiError):
    """Gist cannot be reached at the configured URL in a way no retry can mend (an
    unsupported protocol, a TLS handshake that fails): no further request can succeed."""
