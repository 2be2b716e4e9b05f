"""SQLAlchemy models of the state database (docs/state-tables.md documents them)."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import (
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

KEY = String(255)
USER_ID = String(255)
EMAIL = String(320)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Audience(Base):
    """An audience this state database has seen, by property key."""

    __tablename__ = "audiences"

    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    # "audience" or "trait": what the key's state means (retire clears it by this kind).
    kind: Mapped[str | None] = mapped_column(String(16))
    first_synced_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_synced_at: Mapped[datetime | None] = mapped_column(DateTime)


class SyncRun(Base):
    """One run of one audience: what it planned, sent and how it ended."""

    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    audience_key: Mapped[str] = mapped_column(KEY, ForeignKey("audiences.key"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    source_rows: Mapped[int] = mapped_column(Integer, default=0)
    members: Mapped[int] = mapped_column(Integer, default=0)
    entered: Mapped[int] = mapped_column(Integer, default=0)
    exited: Mapped[int] = mapped_column(Integer, default=0)
    delivered: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    # Members sent again with an unchanged value (their email changed in the source).
    resent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Source rows whose email differed from another audience's for the same user this run.
    email_conflicts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    # A file source's bytes as this run read them (SHA-256), and a hash of every setting that
    # decides what is sent for the key: the no-change fast path compares both with the last run.
    source_digest: Mapped[str | None] = mapped_column(String(64))
    config_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # True when the run skipped load and diff (unchanged file, nothing owed: see fastpath.py).
    fast_path: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A reconcile's reading of Gist: contacts and pages read, leads (no user_id) skipped.
    contacts_read: Mapped[int | None] = mapped_column(Integer)
    pages_read: Mapped[int | None] = mapped_column(Integer)
    leads: Mapped[int | None] = mapped_column(Integer)


class Membership(Base):
    """A member Gist acknowledged as in the audience; written only after a 2xx."""

    __tablename__ = "memberships"

    audience_key: Mapped[str] = mapped_column(KEY, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)
    email: Mapped[str] = mapped_column(EMAIL)
    since: Mapped[datetime] = mapped_column(DateTime)
    last_run_id: Mapped[int] = mapped_column(Integer)


class UncertainMember(Base):
    """A member whose value in Gist is unknown: a change was sent (or about to be) without an
    acknowledgement yet. Until one arrives the member is planned as if Gist might hold either
    value, so a timed-out, dropped or killed request can never leave a stale value behind."""

    __tablename__ = "uncertain_members"

    audience_key: Mapped[str] = mapped_column(KEY, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)
    email: Mapped[str] = mapped_column(EMAIL)
    run_id: Mapped[int] = mapped_column(Integer)


class MemberChange(Base):
    """One planned property change for one member in one run, and what became of it."""

    __tablename__ = "member_changes"
    __table_args__ = (
        Index("ix_member_changes_run_id_status_user_id", "run_id", "status", "user_id"),
        Index("ix_member_changes_audience_key_user_id", "audience_key", "user_id"),
        Index("ix_member_changes_event_status_audience_key", "event_status", "audience_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("sync_runs.id"))
    audience_key: Mapped[str] = mapped_column(KEY)
    user_id: Mapped[str] = mapped_column(USER_ID)
    email: Mapped[str] = mapped_column(EMAIL)
    value: Mapped[bool | None] = mapped_column(Boolean)  # an audience change: entered?
    value_json: Mapped[str | None] = mapped_column(Text)  # a trait change: the new value
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    http_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Track event for this change (send_track): pending → delivered | failed; NULL when none.
    event_status: Mapped[str | None] = mapped_column(String(16))
    event_error: Mapped[str | None] = mapped_column(Text)


class RejectedRow(Base):
    """A source row that could not be used, with the reason."""

    __tablename__ = "rejected_rows"
    __table_args__ = (Index("ix_rejected_rows_run_id_user_id", "run_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("sync_runs.id"))
    row_number: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[str | None] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)


class EmailConflict(Base):
    """A user whose email in this run's source differed from the one another audience of
    the same invocation gave (the first configured wins, so every request agrees)."""

    __tablename__ = "email_conflicts"
    __table_args__ = (Index("ix_email_conflicts_run_id_user_id", "run_id", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("sync_runs.id"))
    user_id: Mapped[str] = mapped_column(USER_ID)
    email: Mapped[str] = mapped_column(EMAIL)  # this source's
    used_email: Mapped[str] = mapped_column(EMAIL)  # the one sent


class TraitValue(Base):
    """A computed trait's value Gist acknowledged for a user (canonical JSON, so 1, 1.0 and
    "1" stay different); written only after a 2xx, like ``memberships``."""

    __tablename__ = "trait_values"

    trait_key: Mapped[str] = mapped_column(KEY, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)
    email: Mapped[str] = mapped_column(EMAIL)
    value: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(DateTime)
    last_run_id: Mapped[int] = mapped_column(Integer)


class EmailDrift(Base):
    """A member whose acknowledged email (``memberships.email``) is not the one Gist last
    acknowledged for the user (``contacts.email``): another key's request changed the
    contact's email since. While a key has such a member, a full diff of several sources
    may send that member again, so the key never takes the no-change fast path."""

    __tablename__ = "email_drift"

    audience_key: Mapped[str] = mapped_column(KEY, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)


class Contact(Base):
    """The email Gist last acknowledged for a user, whatever the key: requests for users no
    source of the run has carry it, and a member whose source email differs from it is sent
    again so that Gist's contact email follows the source."""

    __tablename__ = "contacts"

    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)
    email: Mapped[str] = mapped_column(EMAIL)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    last_run_id: Mapped[int] = mapped_column(Integer)


class Reconcile(Base):
    """A reading of every Gist contact for some keys (``reconcile``), page by page: where it
    is, so that one killed half-way continues instead of starting again."""

    __tablename__ = "reconciles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    audience_keys: Mapped[str] = mapped_column(Text)  # the keys read, sorted, comma-separated
    per_page: Mapped[int] = mapped_column(Integer)
    next_page: Mapped[int] = mapped_column(Integer)
    pages: Mapped[int] = mapped_column(Integer)
    contacts: Mapped[int] = mapped_column(Integer)
    leads: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class GistHolding(Base):
    """What a reconcile in progress found Gist holding: a member (``value`` NULL) of an
    audience, or a trait's value (canonical JSON), with the contact's email."""

    __tablename__ = "gist_holdings"

    reconcile_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("reconciles.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)
    email: Mapped[str | None] = mapped_column(EMAIL)
    value: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """Who may sync an audience right now; renewed by a heartbeat, free once expired or
    released."""

    __tablename__ = "leases"

    audience_key: Mapped[str] = mapped_column(KEY, primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    # Set when its holder gave it up; the row keeps naming the last holder.
    released_at: Mapped[datetime | None] = mapped_column(DateTime)


class RateLimit(Base):
    """One Gist workspace's request budget, shared by every process on this state database:
    the first send time no process has claimed yet (database clock, Unix seconds)."""

    __tablename__ = "rate_limits"

    workspace: Mapped[str] = mapped_column(String(64), primary_key=True)  # a hash, no secret
    next_free: Mapped[float] = mapped_column(Double)
    # The database's time of the last claim: a later claim that finds its own time earlier
    # knows the clock stepped back by the difference.
    claimed_at: Mapped[float | None] = mapped_column(Double)


class Worker(Base):
    """A process that syncs (a daemon, or one `run`/`backfill`/`retire`): who it is, when it
    last showed it is alive (database time) and what it is syncing now."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # its leases' owner name
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    boot_id: Mapped[str] = mapped_column(String(64))
    command: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)
    running: Mapped[str | None] = mapped_column(Text)  # audience keys, comma-separated


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


# Core tables, for the set-based statements of plan, delivery and sync.
audiences = _table(Audience)
sync_runs = _table(SyncRun)
memberships = _table(Membership)
member_changes = _table(MemberChange)
uncertain_members = _table(UncertainMember)
trait_values = _table(TraitValue)
contacts = _table(Contact)
email_drift = _table(EmailDrift)
reconciles = _table(Reconcile)
gist_holdings = _table(GistHolding)
email_conflicts = _table(EmailConflict)
rejected_rows = _table(RejectedRow)
leases = _table(Lease)
rate_limits = _table(RateLimit)
workers = _table(Worker)
