"""``audience-sync check``: is this set-up able to sync? Config, state, sources, Gist's key.

Each check is done the way a sync would do it, but as little of it as tells: the config is
loaded and validated; the state database is opened (never created or migrated) and its
revision compared with this version's; each source reads its first row (a query streams one
row, a file its header and first row); Gist is asked once, with no retries, for a contact
that need not exist, which any accepted key may read. A wrong key is known in one round
trip, not after a sync's retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from audience_sync import db
from audience_sync.config import Settings, load_settings, redact_url
from audience_sync.errors import ApiError, AudienceSyncError, AuthError
from audience_sync.gist import GistClient, make_http_client
from audience_sync.sources import source_for

__all__ = ["Check", "run_checks"]

PROBE_USER = "audience-sync-check"  # asked for by `check`; Gist need not know it


@dataclass(frozen=True)
class Check:
    """One line of the checklist: what was checked, whether it holds, and what was seen."""

    name: str
    ok: bool
    detail: str


def run_checks(path: Path, environ: Mapping[str, str]) -> list[Check]:
    """Every check, in order; a config that cannot be loaded is the only one then."""
    try:
        settings = load_settings(path, environ)
    except AudienceSyncError as exc:
        return [Check("config", False, str(exc))]
    computations = settings.computations
    checks = [Check("config", True, f"{path}: {len(computations)} audiences and traits")]
    checks.append(_check_state(settings))
    checks += [_check_source(settings, key) for key in (a.property_key for a in computations)]
    checks.append(asyncio.run(_check_gist(settings)))
    return checks


def _check_state(settings: Settings) -> Check:
    shown = redact_url(settings.state.url)
    try:
        engine = db.make_engine(settings.state.url, schema=settings.state.db_schema, create=False)
    except AudienceSyncError as exc:
        return Check("state", False, str(exc))
    try:
        current, head = db.current_revision(engine), db.head_revision()
    except SQLAlchemyError as exc:
        return Check("state", False, f"cannot open {shown}: {db.describe_error(exc)}")
    except AudienceSyncError as exc:
        return Check("state", False, str(exc))
    finally:
        engine.dispose()
    if current == head:
        return Check("state", True, f"{shown} at revision {head}")
    if current is None:
        return Check("state", False, f"{shown} has no schema yet: run `audience-sync db upgrade`")
    return Check(
        "state",
        False,
        f"{shown} at revision {current}, needs {head}: run `audience-sync db upgrade`",
    )


def _check_source(settings: Settings, key: str) -> Check:
    audience = settings.audience(key)
    source = source_for(settings, audience)
    name = f"source {key}"
    try:
        chunks = source.read_chunks(1)
        first = next(chunks, [])
        # Closed once the first row is in: a query stops there and its connection goes.
        if isinstance(chunks, Generator):
            chunks.close()
    except AudienceSyncError as exc:
        return Check(name, False, str(exc))
    seen = "a first row" if first else "no rows"
    return Check(name, True, f"{source.description}: readable, {seen}")


async def _check_gist(settings: Settings) -> Check:
    gist = settings.gist
    where = gist.base_url.rstrip("/")
    async with make_http_client(gist) as http:
        client = GistClient(http, deadline=gist.timeout_seconds)
        try:
            await client.fetch_contact(PROBE_USER)
        except AuthError as exc:
            return Check("gist", False, f"{where} refused the API key ({exc})")
        except ApiError as exc:
            return Check("gist", False, str(exc))
    return Check("gist", True, f"{where} accepted the API key")
