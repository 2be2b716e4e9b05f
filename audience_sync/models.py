"""SQLAlchemy models of the state database (docs/state-tables.md documents them)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
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
    text,
)

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

# Core tables, for the set-based statements of plan, delivery and sync (no ORM: importing its
# declarative machinery costs every command more than the rest of this module).
metadata = MetaData(naming_convention=NAMING_CONVENTION)


# An audience this state database has seen, by property key.
audiences = Table(
    "audiences",
    metadata,
    Column("key", KEY, primary_key=True),
    Column("name", Text, nullable=False),
    Column("source", Text, nullable=False),
    # "audience" or "trait": what the key's state means (retire clears it by this kind).
    Column("kind", String(16)),
    Column("first_synced_at", DateTime),
    Column("last_synced_at", DateTime),
)

# One run of one audience: what it planned, sent and how it ended.
sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", KEY, ForeignKey("audiences.key"), index=True, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("source_rows", Integer, default=0, nullable=False),
    Column("members", Integer, default=0, nullable=False),
    Column("entered", Integer, default=0, nullable=False),
    Column("exited", Integer, default=0, nullable=False),
    Column("delivered", Integer, default=0, nullable=False),
    Column("failed", Integer, default=0, nullable=False),
    Column("rejected", Integer, default=0, nullable=False),
    # Members sent again with an unchanged value (their email changed in the source).
    Column("resent", Integer, default=0, server_default="0", nullable=False),
    # Source rows whose email differed from another audience's for the same user this run.
    Column("email_conflicts", Integer, default=0, server_default="0", nullable=False),
    Column("error", Text),
    # A file source's bytes as this run read them (SHA-256), and a hash of every setting that
    # decides what is sent for the key: the no-change fast path compares both with the last run.
    Column("source_digest", String(64)),
    Column("config_fingerprint", String(64)),
    # True when the run skipped load and diff (unchanged file, nothing owed: see fastpath.py).
    Column("fast_path", Boolean, default=False, server_default=false(), nullable=False),
    # True when a backfill skipped whom the unfinished backfills before it reached (--resume).
    Column("resumed", Boolean, default=False, server_default=false(), nullable=False),
    # A reconcile's reading of Gist: contacts and pages read, leads (no user_id) skipped.
    Column("contacts_read", Integer),
    Column("pages_read", Integer),
    Column("leads", Integer),
)

# A member Gist acknowledged as in the audience; written only after a 2xx.
memberships = Table(
    "memberships",
    metadata,
    Column("audience_key", KEY, primary_key=True),
    Column("user_id", USER_ID, primary_key=True),
    Column("email", EMAIL, nullable=False),
    Column("since", DateTime, nullable=False),
    Column("last_run_id", Integer, nullable=False),
)

# A member whose value in Gist is unknown: a change was sent (or about to be) without an
# acknowledgement yet. Until one arrives the member is planned as if Gist might hold either value,
# so a timed-out, dropped or killed request can never leave a stale value behind.
uncertain_members = Table(
    "uncertain_members",
    metadata,
    Column("audience_key", KEY, primary_key=True),
    Column("user_id", USER_ID, primary_key=True),
    Column("email", EMAIL, nullable=False),
    Column("run_id", Integer, nullable=False),
)

# One planned property change for one member in one run, and what became of it.
member_changes = Table(
    "member_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # No foreign key: PostgreSQL would check the one run once per plan row (migration 0011).
    Column("run_id", Integer, nullable=False),
    Column("audience_key", KEY, nullable=False),
    Column("user_id", USER_ID, nullable=False),
    Column("email", EMAIL, nullable=False),
    Column("value", Boolean),  # an audience change: entered?
    Column("value_json", Text),  # a trait change: the new value
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, default=0, nullable=False),
    Column("http_status", Integer),
    Column("last_error", Text),
    Column("delivered_at", DateTime),
    # Track event for this change (send_track): pending → delivered | failed; NULL when none.
    Column("event_status", String(16)),
    Column("event_error", Text),
    Index("ix_member_changes_run_id_status_user_id", "run_id", "status", "user_id"),
    Index("ix_member_changes_audience_key_user_id", "audience_key", "user_id"),
    # Only changes that owe an event (ledger.owed_event asks for nothing else): a plan of
    # changes without one, a dry run's or an audience's without send_track, writes one
    # index fewer per change.
    Index(
        "ix_member_changes_event_status_audience_key",
        "event_status",
        "audience_key",
        postgresql_where=text("event_status IS NOT NULL"),
        sqlite_where=text("event_status IS NOT NULL"),
    ),
)

# A source row that could not be used, with the reason.
rejected_rows = Table(
    "rejected_rows",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("sync_runs.id"), nullable=False),
    Column("row_number", Integer, nullable=False),
    Column("user_id", Text),
    Column("email", Text),
    Column("reason", Text, nullable=False),
    Index("ix_rejected_rows_run_id_user_id", "run_id", "user_id"),
)

# A user whose email in this run's source differed from the one another audience of the same
# invocation gave (the first configured wins, so every request agrees).
email_conflicts = Table(
    "email_conflicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("sync_runs.id"), nullable=False),
    Column("user_id", USER_ID, nullable=False),
    Column("email", EMAIL, nullable=False),  # this source's
    Column("used_email", EMAIL, nullable=False),  # the one sent
    Index("ix_email_conflicts_run_id_user_id", "run_id", "user_id"),
)

# A trait's value that is JSON null: no value (a user gone from an on_missing = "null" trait).
NULL_JSON = "null"

# A computed trait's value Gist acknowledged for a user (canonical JSON, so 1, 1.0 and "1" stay
# different); written only after a 2xx, like ``memberships``.
trait_values = Table(
    "trait_values",
    metadata,
    Column("trait_key", KEY, primary_key=True),
    Column("user_id", USER_ID, primary_key=True),
    Column("email", EMAIL, nullable=False),
    Column("value", Text, nullable=False),
    Column("since", DateTime, nullable=False),
    Column("last_run_id", Integer, nullable=False),
)

# A member (or a trait's non-null value) whose acknowledged email (``memberships.email``,
# ``trait_values.email``) is not the one Gist last acknowledged for the user (``contacts.email``):
# another key's request changed the contact's email since. While a key has such a member, a full
# diff sends it again when the contact's email is not its source's, so the key never takes the
# no-change fast path.
email_drift = Table(
    "email_drift",
    metadata,
    Column("audience_key", KEY, primary_key=True),
    Column("user_id", USER_ID, primary_key=True),
)

# The email Gist last acknowledged for a user, whatever the key: requests for users no source of the
# run has carry it, and a member whose source email differs from it is sent again so that Gist's
# contact email follows the source.
contacts = Table(
    "contacts",
    metadata,
    Column("user_id", USER_ID, primary_key=True),
    Column("email", EMAIL, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("last_run_id", Integer, nullable=False),
)

# A reading of every Gist contact for some keys (``reconcile``), page by page: where it is, so that
# one killed half-way continues instead of starting again.
reconciles = Table(
    "reconciles",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_keys", Text, nullable=False),  # the keys read, sorted, comma-separated
    Column("per_page", Integer, nullable=False),
    Column("next_page", Integer, nullable=False),
    Column("pages", Integer, nullable=False),
    Column("contacts", Integer, nullable=False),
    Column("leads", Integer, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
)

# What a reconcile in progress found Gist holding: a member (``value`` NULL) of an audience, or a
# trait's value (canonical JSON), with the contact's email.
gist_holdings = Table(
    "gist_holdings",
    metadata,
    Column(
        "reconcile_id", Integer, ForeignKey("reconciles.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("key", KEY, primary_key=True),
    Column("user_id", USER_ID, primary_key=True),
    Column("email", EMAIL),
    Column("value", Text),
)

# Who may sync an audience right now; renewed by a heartbeat, free once expired or released.
leases = Table(
    "leases",
    metadata,
    Column("audience_key", KEY, primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("acquired_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    # Set when its holder gave it up; the row keeps naming the last holder.
    Column("released_at", DateTime),
)

# One Gist workspace's request budget, shared by every process on this state database: the first
# send time no process has claimed yet (database clock, Unix seconds).
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("workspace", String(64), primary_key=True),  # a hash, no secret
    Column("next_free", Double, nullable=False),
    # The database's time of the last claim: a later claim that finds its own time earlier
    # knows the clock stepped back by the difference.
    Column("claimed_at", Double),
)

# A process that syncs (a daemon, or one `run`/`backfill`/`retire`): who it is, when it last showed
# it is alive (database time) and what it is syncing now.
workers = Table(
    "workers",
    metadata,
    Column("id", String(255), primary_key=True),  # its leases' owner name
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("boot_id", String(64), nullable=False),
    Column("command", String(16), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, index=True, nullable=False),
    Column("stopped_at", DateTime),
    Column("running", Text),  # audience keys, comma-separated
)
