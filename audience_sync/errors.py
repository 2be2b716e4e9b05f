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

Each class names its ``failure`` kind: what a scheduler should do about it. A retry mends
``unavailable``, ``state`` and ``interrupted``; the other kinds need a person (a retry meets
the same key, config, source or refusal again).
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal, get_args

FailureKind = Literal[
    "auth", "config", "source", "refused", "guarded", "unavailable", "state", "interrupted",
    "internal",
]  # fmt: skip
"""Why a run failed, as a scheduler needs to know it (``RunResult.failure``):

- ``auth``: Gist refused the API key (401/403);
- ``config``: the configuration cannot work (a bad or missing value, a ``${VAR}`` unset, a
  Gist URL no retry reaches, a key that still holds another kind's values);
- ``source``: an audience's source could not be read, or every row of it was rejected;
- ``refused``: Gist refused some changes (a 4xx such as 422): the run is ``partial``;
- ``guarded``: the mass-exit guard stopped the run before it sent anything;
- ``unavailable``: Gist stayed unreachable, overloaded or failing (5xx, 429, timeouts)
  through every retry;
- ``state``: the state database failed or could not be reached;
- ``interrupted``: the run was stopped (a signal, ``stop``) or lost its lease;
- ``internal``: an error audience-sync did not foresee (a bug: report it).
"""

FAILURE_KINDS: Final[tuple[FailureKind, ...]] = get_args(FailureKind)
RETRIABLE_FAILURES: Final[frozenset[FailureKind]] = frozenset(
    {"unavailable", "state", "interrupted"}
)
"""The kinds a retry can mend; a retry is always safe (it sends exactly what is owed)."""


def is_retriable(failure: FailureKind | None) -> bool:
    """Whether a retry can mend a failure of this kind (False for None: nothing failed)."""
    return failure in RETRIABLE_FAILURES


class AudienceSyncError(Exception):
    """Base class of every error raised on purpose by audience-sync."""

    failure: ClassVar[FailureKind] = "internal"


class ConfigError(AudienceSyncError):
    """The configuration is missing, malformed or inconsistent."""

    failure: ClassVar[FailureKind] = "config"


class StateError(AudienceSyncError):
    """The state database cannot be used as it is (e.g. behind its migrations)."""

    failure: ClassVar[FailureKind] = "state"


class SourceError(AudienceSyncError):
    """An audience's source could not be read; the message names the file, row or query."""

    failure: ClassVar[FailureKind] = "source"


class LockHeldError(AudienceSyncError):
    """Another process holds the lease on an audience."""

    def __init__(self, audience_key: str, owner: str) -> None:
        super().__init__(f"audience {audience_key!r} is being synced by {owner}")
        self.audience_key = audience_key
        self.owner = owner


class FencedError(AudienceSyncError):
    """A request may not leave: its audience's lease was lost, or its last confirmed renewal
    is too old for the request to finish before the lease could expire."""

    failure: ClassVar[FailureKind] = "interrupted"

    def __init__(self, audience_key: str, reason: str) -> None:
        super().__init__(reason)
        self.audience_key = audience_key
        self.reason = reason


class StopRequestedError(AudienceSyncError):
    """A stop was requested (SIGTERM, Ctrl-C) while the run was under way."""

    failure: ClassVar[FailureKind] = "interrupted"


class ApiError(AudienceSyncError):
    """Gist did not acknowledge a request."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetriableApiError(ApiError):
    """A transient failure; ``retry_after`` is Gist's requested wait in seconds, if it gave one."""

    failure: ClassVar[FailureKind] = "unavailable"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class FatalApiError(ApiError):
    """Gist refused this request; sending it again unchanged will not help."""

    failure: ClassVar[FailureKind] = "refused"


class AuthError(FatalApiError):
    """Gist refused the API key; no further request can succeed."""

    failure: ClassVar[FailureKind] = "auth"


class UnreachableError(FatalApiError):
    """Gist cannot be reached at the configured URL in a way no retry can mend (an
    unsupported protocol, a TLS handshake that fails): no further request can succeed."""

    failure: ClassVar[FailureKind] = "config"
