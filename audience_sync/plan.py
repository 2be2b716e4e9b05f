"""The set-based diff of staged snapshots against what Gist may hold, written as the plan.

Every plan row says what one request will set for one user and key. A member is planned
from what Gist *may* hold: acknowledged rows (``memberships``, ``trait_values``) and
``uncertain_members`` (a request went out and no answer settled it). A track event is owed
only for a change of the acknowledged value: re-sending a value Gist already acknowledged
(a repair, a new email) sends no second ``Audience Entered``.

The diff is one pass over the snapshot (outer joins to the acknowledged rows and the
uncertain ones: entries, changes and new emails together) and one anti-join over what Gist
may hold (exits); both are hash joins on PostgreSQL and index probes on SQLite. Counts are
taken from the (small) plan, not from the snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    MetaData,
    Table,
    Text,
    and_,
    case,
    cast,
    delete,
    except_,
    exists,
    false,
    func,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.engine import Connection

from audience_sync.ledger import owed_event
from audience_sync.models import (
    NULL_JSON,
    contacts,
    email_conflicts,
    email_drift,
    gist_holdings,
    memberships,
    reconciles,
    rejected_rows,
    trait_values,
    uncertain_members,
)
from audience_sync.models import member_changes as changes
from audience_sync.stage import WORK_MEM, Snapshot, staged_user
from audience_sync.statuses import ChangeStatus

uncertain = uncertain_members
OPEN_STATUSES: tuple[ChangeStatus, ...] = ("pending", "planned")
DIFF_TABLES = ("diff_moved", "diff_gone")  # SQLite: what the two merges found


@dataclass(frozen=True)
class PlanTarget:
    """The run a plan is written for: its key, its snapshot (none for retire), and whether
    it is a dry run or owes events."""

    run_id: int
    key: str
    staged: Table | None = None
    dry_run: bool = False
    track: bool = False  # send_track: changes of the acknowledged value owe an event
    # Called first in the transaction that supersedes other runs' plans: raises unless this
    # run still holds the key's lease (``lease.Holder.confirm``).
    fence: Callable[[Connection], None] | None = None
    # Keys configured before this one whose sources this invocation did not stage: a user
    # one of them holds gets its email from that source, not from a resend of this key's.
    earlier: tuple[str, ...] = ()

    @property
    def status(self) -> ChangeStatus:
        """``planned`` rows of a dry run are only shown; ``pending`` ones are sent."""
        return "planned" if self.dry_run else "pending"

    @property
    def snapshot(self) -> Table:
        assert self.staged is not None, "only retire plans without a snapshot"
        return self.staged


@dataclass(frozen=True)
class Diff:
    """How a snapshot differs from what Gist may hold.

    ``held``: users Gist may hold a value for (acknowledged members or non-null values,
    plus uncertain ones); ``exited`` counts only such users, so it never exceeds ``held``.
    ``resent``: unchanged members sent again because their email changed.
    """

    members: int
    held: int
    entered: int
    exited: int
    resent: int = 0

    def is_mass_exit(self, threshold: float, min_members: int) -> bool:
        """True when the exits exceed ``threshold`` of an audience of ``min_members``+,
        or when a source that had members now returns none at all (a broken query's
        favourite symptom), whatever the audience's size."""
        if self.held == 0 or self.exited == 0:
            return False
        if self.members == 0:
            return True
        return self.held >= min_members and self.exited / self.held > threshold


def start_plan(connection: Connection, target: PlanTarget, kind: str | None) -> None:
    """Before a real run plans a key: older pending rows of it are superseded, since every
    plan re-plans everything still owed; events still owed by changes of another kind than
    the key's ``kind`` now (None: retiring it), or by any change while ``send_track`` is
    off, are dropped; and an unfinished reconcile reading of the key is dropped.

    Those events announce values of what the key was: a retire clears them from Gist (an
    ``Audience Entered`` sent after it would start a workflow for an audience gone), and a
    key configured as the other kind cannot describe them (an audience's change is no trait
    value). Without ``send_track`` this run's changes owe no event, so an older one sent
    once it is back on would arrive after a change it does not describe (an entry announced
    after the exit that followed it). ``event_error`` keeps the reason. With the target's
    ``fence``, all of it happens only while the run holds the key's lease: a run paused past
    it must not supersede the plan of the run that took it over.

    A reconcile reading's pages say what Gist held when they were read: continued after
    this run, they would overwrite in the ledger what this run gets Gist to acknowledge
    (see ``drop_readings``). A reading of other keys is left to go on (it may be live, its
    process reading the next page): the emails this run gets Gist to acknowledge are newer
    than its pages, and it keeps them (``reconcile._record``)."""
    if target.dry_run:
        return
    key = changes.c.audience_key == target.key
    with connection.begin():
        if target.fence is not None:
            target.fence(connection)
        connection.execute(
            changes.update()
            .where(key, changes.c.status == "pending", changes.c.run_id != target.run_id)
            .values(status="superseded", event_status=None)
        )
        other_kind = {
            None: true(),
            "audience": changes.c.value.is_(None),
            "trait": changes.c.value_json.is_(None),
        }[kind]
        reason = "the key was retired" if kind is None else f"the key is {_a(kind)} now"
        connection.execute(
            changes.update()
            .where(key, owed_event(), other_kind)
            .values(event_status=None, event_error=f"not sent: {reason}")
        )
        if kind is not None and not target.track:
            connection.execute(
                changes.update()
                .where(key, owed_event())
                .values(event_status=None, event_error="not sent: send_track was turned off")
            )
        drop_readings(connection, [target.key])


def drop_readings(connection: Connection, keys: Sequence[str]) -> None:
    """Drop the unfinished reconcile readings of any of ``keys`` (``reconciles`` and the
    pages in ``gist_holdings``). A reading continued later makes its pages the ledger of
    its keys; once anything else may have moved what Gist holds for one of them or what the
    state says of it (a run that plans it, another reading, ``verify --repair``), those
    pages are stale, and the next reconcile reads Gist again from its first page. Only a
    stopped reading can be dropped so: a live one holds its keys' leases, as all three do."""
    unfinished = connection.execute(
        select(reconciles.c.id, reconciles.c.audience_keys).where(
            reconciles.c.finished_at.is_(None)
        )
    ).all()
    stale = [reading for reading, theirs in unfinished if set(theirs.split(",")) & set(keys)]
    if stale:
        connection.execute(delete(gist_holdings).where(gist_holdings.c.reconcile_id.in_(stale)))
        connection.execute(delete(reconciles).where(reconciles.c.id.in_(stale)))


def _a(kind: str) -> str:
    return "an audience" if kind == "audience" else "a trait"


def save_plan(connection: Connection, target: PlanTarget) -> Diff:
    """Plan ``true`` for staged members Gist is not known to hold (and again, with the new
    email, for members whose email in the source changed) and ``false`` for those Gist may
    hold who are gone from the source; return the diff.

    On PostgreSQL one full outer join of the snapshot and the acknowledged members (one
    hash join) gives entries, new emails and exits in one pass; on SQLite two ordered
    EXCEPTs merge the snapshot's key with the acknowledged members' index. Uncertain
    members, few, are planned apart: those still in the source whom the diff left alone,
    and those gone who were never acknowledged.
    """
    key, s = target.key, target.snapshot
    unsure_exits = select(
        *_row(target, uncertain.c.user_id, uncertain.c.email, false(), event=false())
    ).where(
        uncertain.c.audience_key == key,
        ~_member(key, uncertain.c.user_id),
        _gone(target, uncertain.c.user_id),
    )
    with connection.begin():
        _joins_in_memory(connection)
        postgres = connection.dialect.name == "postgresql"
        # Nothing acknowledged for the key (a first sync): nobody can be resent.
        acked = (
            connection.execute(
                select(literal(1)).where(memberships.c.audience_key == key).limit(1)
            ).first()
            is not None
        )
        if not acked:
            diff = _first_sync(target)
        elif postgres:
            diff = _full_diff(target)
        else:
            diff = _merged_diff(connection, target)
        # What each statement plans is known (None: entries and exits together), so the
        # plan is counted from the statements' row counts, not read again (0.7 s per 1M).
        by_value = {True: 0, False: 0}
        mixed = False
        drifted = [(_drifted(target, true()), True)] if acked else []
        owed = [*diff, *drifted, (_unsure_members(target), True), (unsure_exits, False)]
        for query, value in owed:
            planned = _insert(connection, query)
            if value is None:
                mixed = True
            else:
                by_value[value] += planned
        if mixed:
            by_value = {True: 0, False: 0} | dict(
                connection.execute(
                    select(changes.c.value, func.count())
                    .where(*_planned(target))
                    .group_by(changes.c.value)
                ).all()
            )
        if not postgres:
            for name in DIFF_TABLES:
                connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        resent = 0
        if acked:
            resent = _count(
                connection,
                select(func.count()).where(
                    *_planned(target, changes.c.value == true()),
                    _member(key, changes.c.user_id),
                    ~_uncertain(key, changes.c.user_id),
                ),
            )
        members = _count(connection, select(func.count()).select_from(s))
        held = _count(
            connection, select(func.count()).where(memberships.c.audience_key == key)
        ) + _count(
            connection,
            select(func.count()).where(
                uncertain.c.audience_key == key, ~_member(key, uncertain.c.user_id)
            ),
        )
    sent_true, exits = by_value[True], by_value[False]
    return Diff(members, held, sent_true - resent, exits, resent)


def _full_diff(target: PlanTarget) -> list[tuple[Any, bool | None]]:
    """Entries, new emails and exits in one full outer join (PostgreSQL), each statement
    with the value it plans (None: both)."""
    key, s = target.key, target.snapshot
    m = (
        select(memberships.c.user_id, memberships.c.email)
        .where(memberships.c.audience_key == key)
        .subquery("m")
    )
    user = func.coalesce(s.c.user_id, m.c.user_id)
    present, known = s.c.user_id.is_not(None), m.c.user_id.is_not(None)
    glitch = exists().where(
        rejected_rows.c.run_id == target.run_id, rejected_rows.c.user_id == m.c.user_id
    )
    value = case((present, true()), else_=false())
    # An entry or an exit moves the acknowledged value (an event); a new email does not.
    row = _row(target, user, func.coalesce(s.c.email, m.c.email), value,
               event=~and_(present, known))  # fmt: skip
    joined = s.join(m, m.c.user_id == s.c.user_id, full=True)
    owed = or_(and_(present, or_(~known, m.c.email != s.c.email)), and_(~present, ~glitch))
    # By user, as SQLite's merges plan entries and exits (a hash join's order is arbitrary):
    # the changes' ids, and so delivery and "first failed" in reports, follow the users.
    # Only the changed rows are sorted.
    return [(select(*row).select_from(joined).where(owed).order_by(user), None)]


def _first_sync(target: PlanTarget) -> list[tuple[Any, bool | None]]:
    """Nothing acknowledged for the key: a diff would find every staged member entering and
    nobody gone. Each enters, owing its event, in the snapshot's key order, with no join
    (SQLite: without the copy of the whole snapshot the merge writes)."""
    s = target.snapshot
    row = _row(target, s.c.user_id, s.c.email, true(), event=true())
    return [(select(*row).select_from(s).order_by(s.c.user_id), True)]


def _merged_diff(connection: Connection, target: PlanTarget) -> list[tuple[Any, bool | None]]:
    """Entries and new emails, then exits, each found by one merge of two sorted inputs:
    SQLite walks the snapshot's primary key and the acknowledged members' index side by side
    for an ordered EXCEPT at the top of a statement (nested in a query it would build a
    temporary B-tree of the whole snapshot instead). The few rows found go to temporary
    tables the plan rows are then made from."""
    key, s = target.key, target.snapshot
    acked_rows = memberships.c.audience_key == key
    moved, gone = _diff_table(DIFF_TABLES[0], "email"), _diff_table(DIFF_TABLES[1])
    for table in (moved, gone):
        table.create(connection, checkfirst=True)
        connection.execute(delete(table))
    theirs = select(memberships.c.user_id, memberships.c.email).where(acked_rows)
    moved_rows = except_(select(s.c.user_id, s.c.email), theirs)
    gone_rows = except_(select(memberships.c.user_id).where(acked_rows), select(s.c.user_id))
    for table, rows in ((moved, moved_rows), (gone, gone_rows)):
        connection.execute(
            table.insert().from_select(
                list(rows.selected_columns.keys()), rows.order_by(*rows.selected_columns)
            )
        )
    m = memberships.alias("m")
    at_m = and_(m.c.audience_key == key, m.c.user_id == moved.c.user_id)
    entered = select(
        *_row(target, moved.c.user_id, moved.c.email, true(), event=m.c.user_id.is_(None))
    ).select_from(moved.outerjoin(m, at_m))
    glitch = exists().where(
        rejected_rows.c.run_id == target.run_id, rejected_rows.c.user_id == gone.c.user_id
    )
    exited = (
        select(*_row(target, m.c.user_id, m.c.email, false(), event=true()))
        .select_from(gone.join(m, and_(m.c.audience_key == key, m.c.user_id == gone.c.user_id)))
        .where(~glitch)
    )
    return [(entered, True), (exited, False)]


def _drifted(target: PlanTarget, *value: Any) -> Any:
    """``value`` again (an audience's ``true``; a trait's unchanged value: ``_NO_VALUE``,
    ``s.value``), owing no event, for members (users with a value) the diff left alone whose
    contact's email in Gist (``contacts``: another key's request moved it since, as
    ``email_drift`` says) is not the one this run's sources give: Gist's contact email
    follows the source. Unless a key configured earlier and not staged by this run holds
    the user: its source decides the email, and a resend with ours would move the contact
    away from it (only to be moved back by that key's next run, for ever)."""
    key, s = target.key, target.snapshot
    d = email_drift
    planned = exists().where(*_planned(target), changes.c.user_id == d.c.user_id)
    deferred = _held_earlier(target, d.c.user_id)
    return (
        select(*_row(target, d.c.user_id, s.c.email, *value, event=false()))
        .select_from(
            d.join(s, staged_user(s) == d.c.user_id).join(
                contacts, contacts.c.user_id == d.c.user_id
            )
        )
        .where(d.c.audience_key == key, contacts.c.email != s.c.email, ~planned, *deferred)
    )


def _held_earlier(target: PlanTarget, user_id: Any) -> list[ColumnElement[bool]]:
    """Conditions: no key of ``target.earlier`` holds the user (a member, a non-null value)."""
    if not target.earlier:
        return []
    return [
        ~exists().where(
            memberships.c.audience_key.in_(target.earlier), memberships.c.user_id == user_id
        ),
        ~exists().where(
            trait_values.c.trait_key.in_(target.earlier),
            trait_values.c.user_id == user_id,
            trait_values.c.value != NULL_JSON,
        ),
    ]


def _unsure_members(target: PlanTarget) -> Any:
    """``true`` again for the snapshot's uncertain members the diff did not plan: a request
    that may not have reached Gist is sent again. Few, so they are looked up through the
    snapshot's index rather than found by another pass over it."""
    key, s = target.key, target.snapshot
    u = uncertain.alias("u")
    planned = exists().where(*_planned(target), changes.c.user_id == u.c.user_id)
    return (
        select(*_row(target, u.c.user_id, s.c.email, true(), event=~_member(key, u.c.user_id)))
        .select_from(u.join(s, staged_user(s) == u.c.user_id))
        .where(u.c.audience_key == key, ~planned)
    )


def _diff_table(name: str, *columns: str) -> Table:
    """A temporary table of the users one side of a diff found."""
    return Table(
        name,
        MetaData(),
        Column("user_id", Text),
        *(Column(c, Text) for c in columns),
        prefixes=["TEMPORARY"],
    )


def save_trait_plan(connection: Connection, target: PlanTarget, on_missing: str) -> Diff:
    """Plan each staged value Gist is not known to hold (and again, with the new email, the
    values of users whose email changed), and for users gone from the source ``null`` (when
    ``on_missing`` is "null") or the last value attempted while unanswered ("keep"); return
    the diff (a change to ``null`` of a user who may hold a value is an exit)."""
    key, s = target.key, target.snapshot
    tv, u = trait_values.alias("tv"), uncertain.alias("u")
    joined = s.outerjoin(tv, and_(tv.c.trait_key == key, tv.c.user_id == s.c.user_id)).outerjoin(
        u, and_(u.c.audience_key == key, u.c.user_id == s.c.user_id)
    )
    same = and_(tv.c.user_id.is_not(None), tv.c.value == s.c.value)
    owed = select(
        *_row(target, s.c.user_id, s.c.email, _NO_VALUE, s.c.value, event=~same)
    ).select_from(joined)
    owed = owed.where(or_(~same, u.c.user_id.is_not(None), tv.c.email != s.c.email))
    with connection.begin():
        _joins_in_memory(connection)
        planned = _insert(connection, owed)
        planned += _insert(connection, _drifted(target, _NO_VALUE, s.c.value))
        exits = resent = 0
        if on_missing == "null":
            exits += _insert(connection, _trait_missing(target))
        else:
            planned += _insert(connection, _trait_kept(target))
        removals = _count(
            connection,
            select(func.count()).where(
                *_planned(target, changes.c.value_json == NULL_JSON),
                or_(_valued(key, changes.c.user_id), _uncertain(key, changes.c.user_id)),
                _present(target, changes.c.user_id),
            ),
        )
        resent = _count(
            connection,
            select(func.count()).where(
                *_planned(target),
                ~_uncertain(key, changes.c.user_id),
                exists().where(
                    trait_values.c.trait_key == key,
                    trait_values.c.user_id == changes.c.user_id,
                    trait_values.c.value == changes.c.value_json,
                ),
            ),
        )
        members = _count(
            connection, select(func.count()).select_from(s).where(s.c.value != NULL_JSON)
        )
        held = _count(connection, _held_values(key))
    return Diff(members, held, planned - removals - resent, exits + removals, resent)


def unify_emails(connection: Connection, snapshots: Sequence[Snapshot]) -> dict[int, int]:
    """Give a user staged by several runs of one invocation one email: the first run's (in
    config order). The rows that carried another are kept in ``email_conflicts``. Returns,
    per run, how many of its rows did."""
    conflicts: dict[int, int] = {}
    with connection.begin():
        for index, later in enumerate(snapshots):
            for earlier in snapshots[:index]:
                a, b = later.table, earlier.table
                differs = and_(a.c.user_id == b.c.user_id, a.c.email != b.c.email)
                connection.execute(
                    email_conflicts.insert().from_select(
                        ["run_id", "user_id", "email", "used_email"],
                        select(literal(later.run_id), a.c.user_id, a.c.email, b.c.email).where(
                            differs
                        ),
                    )
                )
                moved = connection.execute(
                    update(a).where(differs).values(email=b.c.email)
                ).rowcount
                if moved:
                    conflicts[later.run_id] = conflicts.get(later.run_id, 0) + moved
    return conflicts


def resolve_emails(
    connection: Connection, snapshots: Sequence[Snapshot], run_ids: Sequence[int]
) -> None:
    """Every planned request carries the user's current email: the one staged for them by
    any run of this invocation (unified by ``unify_emails``), else the one Gist last
    acknowledged for them under any key (``contacts``). A key whose run took the fast path
    stands for its unread file through that too: its members' emails are the contacts'
    (``email_drift`` holds none of its members, or it would not have taken it)."""
    if not run_ids:
        return
    open_status = changes.c.status.in_(OPEN_STATUSES)
    with connection.begin():
        for snapshot in snapshots:
            # A run's own plan rows of users its snapshot holds were made from that
            # snapshot, email included (entries, values, resends, backfills): only the
            # other runs' rows can differ. One audience's first sync plans a million rows
            # that this skips (1 s on SQLite, 3 s on PostgreSQL per 1M).
            others = [run_id for run_id in run_ids if run_id != snapshot.run_id]
            if not others:
                continue
            s = snapshot.table
            connection.execute(
                update(changes)
                .where(
                    changes.c.run_id.in_(others),
                    open_status,
                    staged_user(s) == changes.c.user_id,
                    changes.c.email != s.c.email,
                )
                .values(email=s.c.email)
            )
        if connection.execute(select(literal(1)).select_from(contacts).limit(1)).first() is None:
            return  # Gist acknowledged nobody yet: no contact's email to fall back on
        staged_anywhere = [
            exists().where(staged_user(s.table) == changes.c.user_id) for s in snapshots
        ]
        connection.execute(
            update(changes)
            .where(
                changes.c.run_id.in_(run_ids),
                open_status,
                *(~present for present in staged_anywhere),
                changes.c.user_id == contacts.c.user_id,
                changes.c.email != contacts.c.email,
            )
            .values(email=contacts.c.email)
        )


def discard_plan(connection: Connection, run_id: int) -> None:
    """Drop a run's plan before anything of it was sent (the mass-exit guard)."""
    with connection.begin():
        connection.execute(delete(changes).where(changes.c.run_id == run_id))


def save_backfill_plan(
    connection: Connection,
    target: PlanTarget,
    resumed_runs: Sequence[int],
    *,
    trait: bool,
    keep: bool = False,
) -> int:
    """Plan ``true`` (or the value) for every staged member, except those already delivered
    by the unfinished backfill runs in ``resumed_runs`` (so a backfill resumes, not restarts).
    A member Gist had not acknowledged owes its event like any entry.

    What a run leaves alone for users the snapshot lacks is sent again too, unchanged and
    owing no event: the acknowledged value of a user whose row this run rejected (a glitch
    is not a departure), and with ``keep`` (a trait's ``on_missing = "keep"``) the values
    kept for users gone from the source (``_trait_kept``'s for an uncertain one). Gist
    holds them as much as the source's values, and after a reset no run would send them
    again. Returns how many changes were planned."""
    key, s = target.key, target.snapshot

    def done(user_id: Any) -> ColumnElement[bool]:
        return exists().where(
            changes.c.run_id.in_(resumed_runs),
            changes.c.user_id == user_id,
            changes.c.status == "delivered",
        )

    def left_alone(user_id: Any) -> ColumnElement[bool]:
        """Not staged, settled, not yet resent, and rejected (or, with ``keep``, gone)."""
        rejected = exists().where(
            rejected_rows.c.run_id == target.run_id, rejected_rows.c.user_id == user_id
        )
        why = [] if keep else [rejected]
        return and_(~_present(target, user_id), *why, ~_uncertain(key, user_id), ~done(user_id))

    if trait:
        same = exists().where(
            trait_values.c.trait_key == key,
            trait_values.c.user_id == s.c.user_id,
            trait_values.c.value == s.c.value,
        )
        row = _row(target, s.c.user_id, s.c.email, _NO_VALUE, s.c.value, event=~same)
        value = trait_values.c.value
        kept = _row(target, trait_values.c.user_id, trait_values.c.email, _NO_VALUE, value,
                    event=false())  # fmt: skip
        held = select(*kept).where(
            trait_values.c.trait_key == key,
            trait_values.c.value != NULL_JSON,
            left_alone(trait_values.c.user_id),
        )
    else:
        row = _row(target, s.c.user_id, s.c.email, true(), event=~_member(key, s.c.user_id))
        held = select(
            *_row(target, memberships.c.user_id, memberships.c.email, true(), event=false())
        ).where(memberships.c.audience_key == key, left_alone(memberships.c.user_id))
    with connection.begin():
        planned = _insert(connection, select(*row).where(~done(s.c.user_id)))
        planned += _insert(connection, held)
        if keep:
            planned += _insert(connection, _trait_kept(target).where(~done(uncertain.c.user_id)))
        return planned


def save_retire_plan(connection: Connection, target: PlanTarget, *, trait: bool) -> int:
    """Plan the key's cleared value (``false`` for an audience, ``null`` for a trait) for
    everyone Gist may hold a value of it for: acknowledged members, acknowledged non-null
    values and uncertain users, whichever kind wrote them. Returns how many were planned."""
    key = target.key
    value = (_NO_VALUE, literal(NULL_JSON)) if trait else (false(), None)
    member_rows = select(*_row(target, memberships.c.user_id, memberships.c.email, *value)).where(
        memberships.c.audience_key == key
    )
    valued_rows = select(*_row(target, trait_values.c.user_id, trait_values.c.email, *value)).where(
        trait_values.c.trait_key == key,
        trait_values.c.value != NULL_JSON,
        ~_member(key, trait_values.c.user_id),
    )
    uncertain_rows = select(*_row(target, uncertain.c.user_id, uncertain.c.email, *value)).where(
        uncertain.c.audience_key == key,
        ~_member(key, uncertain.c.user_id),
        ~_valued(key, uncertain.c.user_id),
    )
    with connection.begin():
        return _insert(connection, union_all(member_rows, valued_rows, uncertain_rows))


def held_kind(connection: Connection, key: str) -> str | None:
    """Which kind of state the key holds: "audience" (members), "trait" (non-null values),
    "both", or None when it holds neither."""
    with connection.begin():
        members = connection.scalar(select(exists().where(memberships.c.audience_key == key)))
        values = connection.scalar(
            select(
                exists().where(trait_values.c.trait_key == key, trait_values.c.value != NULL_JSON)
            )
        )
    if members and values:
        return "both"
    return "audience" if members else "trait" if values else None


def count_staged(connection: Connection, snapshot: Snapshot) -> int:
    """How many members the snapshot holds."""
    with connection.begin():
        return _count(connection, select(func.count()).select_from(snapshot.table))


def count_planned(connection: Connection, run_id: int) -> int:
    """How many changes the run planned."""
    with connection.begin():
        return _count(connection, select(func.count()).where(changes.c.run_id == run_id))


# Typed NULLs: PostgreSQL cannot guess the type of a bare NULL in a UNION.
_NO_VALUE = cast(null(), Boolean)

PLAN_COLUMNS = [
    "run_id", "audience_key", "user_id", "email", "value", "value_json", "status", "attempts",
    "event_status",
]  # fmt: skip


def _row(
    target: PlanTarget,
    user_id: Any,
    email: Any,
    value: Any,
    value_json: Any = None,
    *,
    event: ColumnElement[bool] | None = None,
) -> list[Any]:
    """The columns of one plan row; ``event`` says when the change owes a track event."""
    if target.track and event is not None:
        event_status: Any = case((event, literal(target.status)), else_=cast(null(), Text))
    else:
        event_status = cast(null(), Text)
    return [
        literal(target.run_id),
        literal(target.key),
        user_id,
        email,
        value,
        cast(null(), Text) if value_json is None else value_json,
        literal(target.status),
        literal(0),
        event_status,
    ]


def _joins_in_memory(connection: Connection) -> None:
    """PostgreSQL: memory enough for the diff's hash joins to run in one batch."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL work_mem = '{WORK_MEM}'")


def _insert(connection: Connection, query: Any) -> int:
    """Insert plan rows; returns how many (psycopg's count of an INSERT is only kept when
    asked for)."""
    statement = changes.insert().from_select(PLAN_COLUMNS, query)
    return int(connection.execute(statement.execution_options(preserve_rowcount=True)).rowcount)


def _count(connection: Connection, query: Any) -> int:
    return int(connection.scalar(query) or 0)


def _planned(target: PlanTarget, *where: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    """This run's plan rows (matching ``where``)."""
    return [changes.c.run_id == target.run_id, *where]


def _member(key: str, user_id: Any) -> ColumnElement[bool]:
    return exists().where(memberships.c.audience_key == key, memberships.c.user_id == user_id)


def _uncertain(key: str, user_id: Any) -> ColumnElement[bool]:
    return exists().where(uncertain.c.audience_key == key, uncertain.c.user_id == user_id)


def _valued(key: str, user_id: Any) -> ColumnElement[bool]:
    """Gist acknowledged a non-null value of trait ``key`` for the user."""
    return exists().where(
        trait_values.c.trait_key == key,
        trait_values.c.user_id == user_id,
        trait_values.c.value != NULL_JSON,
    )


def _present(target: PlanTarget, user_id: Any) -> ColumnElement[bool]:
    """The user is in this run's snapshot."""
    return exists().where(staged_user(target.snapshot) == user_id)


def _held_values(key: str) -> Any:
    """How many users may hold a non-null value of trait ``key``."""
    valued = select(func.count()).where(
        trait_values.c.trait_key == key, trait_values.c.value != NULL_JSON
    )
    unsure = select(func.count()).where(
        uncertain.c.audience_key == key, ~_valued(key, uncertain.c.user_id)
    )
    return select(valued.scalar_subquery() + unsure.scalar_subquery())


def _trait_missing(target: PlanTarget) -> Any:
    """Users gone from the source who may hold a non-null value: acknowledged non-null
    values (an acknowledged change, so it owes an event), and uncertain users whatever
    their acknowledged value (``null`` included: a lost answer may have set another)."""
    key = target.key
    nothing = literal(NULL_JSON)
    acknowledged = select(
        *_row(
            target, trait_values.c.user_id, trait_values.c.email, _NO_VALUE, nothing, event=true()
        )
    ).where(
        trait_values.c.trait_key == key,
        trait_values.c.value != NULL_JSON,
        _gone(target, trait_values.c.user_id),
    )
    unsure = select(
        *_row(target, uncertain.c.user_id, uncertain.c.email, _NO_VALUE, nothing, event=false())
    ).where(
        uncertain.c.audience_key == key,
        ~_valued(key, uncertain.c.user_id),
        _gone(target, uncertain.c.user_id),
    )
    return union_all(acknowledged, unsure)


def _trait_kept(target: PlanTarget) -> Any:
    """``on_missing = "keep"``: a user gone from the source keeps the last value computed for
    them. When a request for them went unanswered, Gist holds either that value or the one
    acknowledged before, so the last value attempted (else the acknowledged one) is sent
    again until Gist acknowledges it, and Gist and the state agree once more."""
    key = target.key
    prior = changes.alias("prior")  # not the table the plan is inserted into
    attempted = (
        select(prior.c.value_json)
        .where(
            prior.c.audience_key == key,
            prior.c.user_id == uncertain.c.user_id,
            prior.c.value_json.is_not(None),
            prior.c.status != "planned",
        )
        .order_by(prior.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    acknowledged = (
        select(trait_values.c.value)
        .where(trait_values.c.trait_key == key, trait_values.c.user_id == uncertain.c.user_id)
        .scalar_subquery()
    )
    value = func.coalesce(attempted, acknowledged, literal(NULL_JSON))
    same = exists().where(
        trait_values.c.trait_key == key,
        trait_values.c.user_id == uncertain.c.user_id,
        trait_values.c.value == value,
    )
    row = _row(target, uncertain.c.user_id, uncertain.c.email, _NO_VALUE, value, event=~same)
    return select(*row).where(uncertain.c.audience_key == key, _gone(target, uncertain.c.user_id))


def _gone(target: PlanTarget, user_id: Any) -> ColumnElement[bool]:
    """Not in this run's snapshot, and not a row of it that was rejected (a glitch is not
    a departure)."""
    glitch = exists().where(
        rejected_rows.c.run_id == target.run_id, rejected_rows.c.user_id == user_id
    )
    return and_(~_present(target, user_id), ~glitch)
