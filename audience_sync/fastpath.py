"""The no-change fast path: a run of an unchanged file, with nothing owed, skips load and diff.

A run may skip reading its source only when a full diff could not plan anything, and when
leaving its snapshot out changes nothing for the other audiences of the invocation:

- a regular ``run`` (not a dry run, backfill or retire) without ``--full-diff``, of an
  **audience** (computed traits are always diffed) read from a CSV or JSONL file;
- the key's last run was a regular run that ``succeeded`` (every change acknowledged),
  rejected no row and had no email conflict, read a file whose bytes hash to the digest
  the file has now, under the same config fingerprint;
- nothing is owed for the key: no uncertain member (a lost answer, or a ``verify
  --repair``), no pending change, no owed track event, no unfinished backfill;
- no other source of the invocation gives one of its members another email (checked once
  the others are staged), since the first configured source's email is the one sent.

Then the acknowledged members equal the file's rows, so the full diff would plan nothing:
the run is recorded ``succeeded`` with ``fast_path`` set. Any doubt: a full diff.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, exists, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import __version__, db
from audience_sync.config import Computation, Settings
from audience_sync.ledger import owed_event
from audience_sync.models import email_drift, memberships, uncertain_members
from audience_sync.models import member_changes as changes
from audience_sync.models import sync_runs as runs
from audience_sync.runs import unfinished_backfills
from audience_sync.sources import REQUIRED_COLUMNS, file_digest
from audience_sync.stage import Snapshot

log = logging.getLogger(__name__)

FAST_FORMATS = ("csv", "jsonl")
# Settings of an audience that decide when it runs, never what it sends.
SCHEDULING = frozenset({"schedule", "every"})
# Bumped when what the fingerprint covers changes meaning.
FINGERPRINT_VERSION = 1


@cache
def _schema() -> str | None:
    return db.head_revision()


def config_fingerprint(settings: Settings, audience: Computation) -> str:
    """A hash of everything that decides what is sent for ``audience``: all of its settings
    but the schedule, its kind, key and file format, the columns read, the Gist workspace
    (URL, and the API key hashed on its own), the schema revision and this version. Never
    reversible to a secret."""
    api_key = settings.gist.api_key.get_secret_value().encode()
    described = {
        "fingerprint": FINGERPRINT_VERSION,
        "version": __version__,
        "schema": _schema(),
        "kind": "trait" if audience.is_trait else "audience",
        "property_key": audience.property_key,
        "file_format": audience.file_format,
        "columns": REQUIRED_COLUMNS,
        "settings": audience.model_dump(mode="json", exclude=set(SCHEDULING)),
        "gist": {
            "base_url": settings.gist.base_url,
            "api_key": hashlib.sha256(b"audience-sync gist.api_key\0" + api_key).hexdigest(),
        },
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def judge(
    engine: Engine, audience: Computation, run_id: int, fingerprint: str, *, regular: bool
) -> Verdict | None:
    """Whether run ``run_id`` may take the fast path; None when its kind or source never
    may. ``regular``: a ``run`` that is not a dry run and not ``--full-diff``."""
    if audience.is_trait or audience.file_format not in FAST_FORMATS or audience.file is None:
        return None
    key = audience.property_key
    if not regular:
        log.info("%s: full diff: not a regular run, or --full-diff", key)
        return Verdict("not a regular run")
    verdict = load_verdict(engine, key, run_id, fingerprint, audience.file)
    if verdict.doubt is None:
        log.info("%s: fast path: file unchanged and nothing owed", key)
    else:
        log.info("%s: full diff: %s", key, verdict.doubt)
    return verdict


@dataclass(frozen=True)
class Verdict:
    """Whether a run may take the fast path: ``doubt`` says why not (None: it may). With
    the fast path, the file's digest and what the last run counted, which still hold."""

    doubt: str | None
    digest: str | None = None
    source_rows: int = 0
    members: int = 0


def load_verdict(engine: Engine, key: str, run_id: int, fingerprint: str, path: Path) -> Verdict:
    """Whether run ``run_id`` of ``key`` may skip load and diff: its last run and the state
    say nothing is owed, and the file at ``path`` hashes as the last run read it (hashed
    last, only when everything else holds)."""
    with engine.connect() as connection:
        last = connection.execute(
            select(
                runs.c.id,
                runs.c.source_rows,
                runs.c.members,
                runs.c.kind,
                runs.c.status,
                runs.c.rejected,
                runs.c.email_conflicts,
                runs.c.source_digest,
                runs.c.config_fingerprint,
            )
            .where(runs.c.audience_key == key, runs.c.id != run_id)
            .order_by(runs.c.id.desc())
            .limit(1)
        ).first()
        doubt = _doubt(connection, key, run_id, last, fingerprint)
    if doubt is None and unfinished_backfills(engine, key, run_id):
        doubt = "a backfill is unfinished"
    if doubt is not None or last is None:
        return Verdict(doubt or "first run")
    digest = file_digest(path)
    if digest is None or digest != last.source_digest:
        return Verdict("the file changed")
    return Verdict(None, digest, last.source_rows, last.members)


def _doubt(
    connection: Connection, key: str, run_id: int, last: Any, fingerprint: str
) -> str | None:
    if last is None:
        return "first run"
    if last.kind != "run":
        return f"the last run was a {last.kind}"
    if last.status != "succeeded":
        return f"the last run ended {last.status}"
    if last.config_fingerprint != fingerprint:
        return "the settings changed"
    if last.rejected:
        return "the last run rejected rows"
    if last.email_conflicts:
        return "the last run had email conflicts"
    if _has(connection, uncertain_members.c.audience_key == key):
        return "members are uncertain (a lost answer, or verify --repair)"
    # Each real run supersedes the key's older pending changes, so only the last run's (and
    # this one's, under the same lease) can be pending: an exact seek on the (run_id, status)
    # index. A range (run_id >= last) let PostgreSQL with stale statistics scan the key's
    # every change instead (0.24 s at 1M).
    if _has(connection, changes.c.run_id.in_([last.id, run_id]), changes.c.status == "pending"):
        return "changes are pending"
    if _has(connection, changes.c.audience_key == key, owed_event()):
        return "track events are owed"
    if _has(connection, email_drift.c.audience_key == key):
        return "a member's email is not the one Gist holds (another key sent it another)"
    return None


def overlaps(connection: Connection, key: str, snapshots: Sequence[Snapshot]) -> bool:
    """Whether a staged snapshot gives one of ``key``'s acknowledged members another email
    (with the fast path's conditions, those members are the key's file rows); True when it
    cannot tell."""
    m = memberships
    try:
        for snapshot in snapshots:
            s = snapshot.table
            with connection.begin():
                found = connection.scalar(
                    select(
                        exists().where(
                            m.c.audience_key == key,
                            m.c.user_id == s.c.user_id,
                            m.c.email != s.c.email,
                        )
                    )
                )
            if found:
                log.info("%s: full diff: another source gives a member another email", key)
                return True
    except SQLAlchemyError as exc:
        log.warning("%s: full diff: could not compare emails with other sources: %s", key, exc)
        return True
    return False


def _has(connection: Connection, *where: Any) -> bool:
    return bool(connection.scalar(select(exists().where(*where))))
