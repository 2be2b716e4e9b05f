"""The set-based diff of staged snapshots against what Gist acknowledged, written as the plan.

Every plan row says what one request will set for one user and key. A member is planned
from what Gist *may* hold: acknowledged rows (``memberships``, ``trait_values``) and
``uncertain_members`` (a request went out and no answer settled it). A track event is owed
only for a change of the acknowledged value: re-sending a value Gist already acknowledged
(a repair, a new email) sends no second ``Audience Entered``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Engine,
    Text,
    and_,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.engine import Connection

from audience_sync.models import (
    contacts,
    email_conflicts,
    memberships,
    rejected_rows,
    staged_members,
    trait_values,
    uncertain_members,
)
from audience_sync.models import member_changes as changes
from audience_sync.statuses import ChangeStatus

staged = staged_members
uncertain = uncertain_members
NULL_JSON = "null"
OPEN_STATUSES: tuple[ChangeStatus, ...] = ("pending", "planned")


@dataclass(frozen=True)
class PlanTarget:
    """The run a plan is written for: its key, and whether it is a dry run or owes events."""

    run_id: int
    key: str
    dry_run: bool = False
    track: bool = False  # send_track: changes of the acknowledged value owe an event

    @property
    def status(self) -> ChangeStatus:
        """``planned`` rows of a dry run are only shown; ``pending`` ones are sent."""
        return "planned" if self.dry_run else "pending"


@dataclass(frozen=True)
class Diff:
    """How a snapshot differs from what Gist may hold.

    ``held``: users Gist may hold a value for (acknowledged members or non-null values,
    plus uncertain ones); ``exited`` counts only such users, so it never exceeds ``held``.
    """

    members: int
    held: int
    entered: int
    exited: int

    def is_mass_exit(self, threshold: float, min_members: int) -> bool:
        """True when the exits exceed ``threshold`` of an audience of ``min_members``+,
        or when a source that had members now returns none at all (a broken query's
        favourite symptom), whatever the audience's size."""
        if self.held == 0 or self.exited == 0:
            return False
        if self.members == 0:
            return True
        return self.held >= min_members and self.exited / self.held > threshold


def start_plan(engine: Engine, target: PlanTarget) -> None:
    """Before a real run plans a key: older pending rows of it are superseded, since every
    plan re-plans everything still owed."""
    if target.dry_run:
        return
    with engine.begin() as connection:
        connection.execute(
            changes.update()
            .where(
                changes.c.audience_key == target.key,
                changes.c.status == "pending",
                changes.c.run_id != target.run_id,
            )
            .values(status="superseded")
        )


def save_plan(engine: Engine, target: PlanTarget) -> Diff:
    """Plan ``true`` for staged members Gist is not known to hold and ``false`` for those
    Gist may hold who are gone from the source; return the diff."""
    key, run_id = target.key, target.run_id
    acknowledged = _member(key, staged.c.user_id)
    entered = select(
        *_row(target, staged.c.user_id, staged.c.email, true(), event=~acknowledged)
    ).where(staged.c.run_id == run_id, or_(~acknowledged, _uncertain(key, staged.c.user_id)))
    exited = union_all(
        select(
            *_row(target, memberships.c.user_id, memberships.c.email, false(), event=true())
        ).where(memberships.c.audience_key == key, _gone(run_id, memberships.c.user_id)),
        select(*_row(target, uncertain.c.user_id, uncertain.c.email, false(), event=false())).where(
            uncertain.c.audience_key == key,
            ~_member(key, uncertain.c.user_id),
            _gone(run_id, uncertain.c.user_id),
        ),
    )
    with engine.begin() as connection:
        entries = _insert(connection, entered)
        exits = _insert(connection, exited)
        members = _count(connection, select(func.count()).where(staged.c.run_id == run_id))
        held = _count(
            connection, select(func.count()).where(memberships.c.audience_key == key)
        ) + _count(
            connection,
            select(func.count()).where(
                uncertain.c.audience_key == key, ~_member(key, uncertain.c.user_id)
            ),
        )
    return Diff(members, held, entries, exits)


def save_trait_plan(engine: Engine, target: PlanTarget, on_missing: str) -> Diff:
    """Plan each staged value Gist is not known to hold, and ``null`` for users gone from the
    source who may hold a value when ``on_missing`` is "null"; return the diff (a change to
    ``null`` of a user who may hold a value is an exit)."""
    key, run_id = target.key, target.run_id
    same = exists().where(
        trait_values.c.trait_key == key,
        trait_values.c.user_id == staged.c.user_id,
        trait_values.c.value == staged.c.value,
    )
    owed = and_(staged.c.run_id == run_id, or_(~same, _uncertain(key, staged.c.user_id)))
    removal = and_(
        staged.c.value == NULL_JSON,
        or_(_valued(key, staged.c.user_id), _uncertain(key, staged.c.user_id)),
    )
    row = _row(target, staged.c.user_id, staged.c.email, _NO_VALUE, staged.c.value, event=~same)
    with engine.begin() as connection:
        entries = _insert(connection, select(*row).where(owed, ~removal))
        exits = _insert(connection, select(*row).where(owed, removal))
        if on_missing == "null":
            exits += _insert(connection, _trait_missing(target))
        else:
            entries += _insert(connection, _trait_kept(target))
        members = _count(
            connection,
            select(func.count()).where(staged.c.run_id == run_id, staged.c.value != NULL_JSON),
        )
        held = _count(connection, _held_values(key))
    return Diff(members, held, entries, exits)


def save_email_updates(engine: Engine, target: PlanTarget, *, trait: bool) -> int:
    """Plan a re-send of the acknowledged value for staged members whose email in the source
    differs from the one Gist holds, so that Gist's contact email follows the source.
    Returns how many were planned; they owe no event."""
    key, run_id = target.key, target.run_id
    moved = exists().where(
        contacts.c.user_id == staged.c.user_id, contacts.c.email != staged.c.email
    )
    if trait:
        unchanged: ColumnElement[bool] = exists().where(
            trait_values.c.trait_key == key,
            trait_values.c.user_id == staged.c.user_id,
            trait_values.c.value == staged.c.value,
        )
        row = _row(target, staged.c.user_id, staged.c.email, _NO_VALUE, staged.c.value)
    else:
        unchanged = _member(key, staged.c.user_id)
        row = _row(target, staged.c.user_id, staged.c.email, true())
    query = select(*row).where(
        staged.c.run_id == run_id, unchanged, ~_uncertain(key, staged.c.user_id), moved
    )
    with engine.begin() as connection:
        return _insert(connection, query)


def unify_emails(engine: Engine, run_ids: Sequence[int]) -> dict[int, int]:
    """Give a user staged by several runs of one invocation one email: the first run's (in
    config order). Returns, per run, how many of its rows carried another email."""
    if len(run_ids) < 2:
        return {}
    other = staged.alias("other")
    first = (
        select(other.c.email)
        .where(other.c.run_id.in_(run_ids), other.c.user_id == staged.c.user_id)
        .order_by(other.c.run_id)
        .limit(1)
        .scalar_subquery()
    )
    earlier_differs = exists().where(
        other.c.run_id.in_(run_ids),
        other.c.run_id < staged.c.run_id,
        other.c.user_id == staged.c.user_id,
        other.c.email != staged.c.email,
    )
    conflicts: dict[int, int] = {}
    with engine.begin() as connection:
        for run_id in run_ids[1:]:
            connection.execute(
                email_conflicts.insert().from_select(
                    ["run_id", "user_id", "email", "used_email"],
                    select(staged.c.run_id, staged.c.user_id, staged.c.email, first).where(
                        staged.c.run_id == run_id, earlier_differs
                    ),
                )
            )
            updated = connection.execute(
                staged.update()
                .where(staged.c.run_id == run_id, earlier_differs)
                .values(email=first)
            ).rowcount
            if updated:
                conflicts[run_id] = updated
    return conflicts


def resolve_emails(engine: Engine, run_ids: Sequence[int]) -> None:
    """Every planned request carries the user's current email: the one staged for them by
    any run of this invocation (unified by ``unify_emails``), else the one Gist last
    acknowledged for them under any key."""
    if not run_ids:
        return
    open_change = and_(changes.c.run_id.in_(run_ids), changes.c.status.in_(OPEN_STATUSES))
    staged_here = and_(staged.c.run_id.in_(run_ids), staged.c.user_id == changes.c.user_id)
    from_source = select(func.min(staged.c.email)).where(staged_here).scalar_subquery()
    from_contact = (
        select(contacts.c.email).where(contacts.c.user_id == changes.c.user_id).scalar_subquery()
    )
    with engine.begin() as connection:
        connection.execute(
            changes.update()
            .where(open_change, exists().where(staged_here, staged.c.email != changes.c.email))
            .values(email=from_source)
        )
        connection.execute(
            changes.update()
            .where(
                open_change,
                ~exists().where(staged_here),
                exists().where(
                    contacts.c.user_id == changes.c.user_id, contacts.c.email != changes.c.email
                ),
            )
            .values(email=from_contact)
        )


def discard_plan(engine: Engine, run_id: int) -> None:
    """Drop a run's plan before anything of it was sent (the mass-exit guard)."""
    with engine.begin() as connection:
        connection.execute(delete(changes).where(changes.c.run_id == run_id))


def save_backfill_plan(
    engine: Engine, target: PlanTarget, resumed_runs: Sequence[int], *, trait: bool
) -> int:
    """Plan ``true`` (or the value) for every staged member, except those already delivered
    by the unfinished backfill runs in ``resumed_runs`` (so a backfill resumes, not restarts).
    A member Gist had not acknowledged owes its event like any entry. Returns how many
    changes were planned."""
    key = target.key
    done = exists().where(
        changes.c.run_id.in_(resumed_runs),
        changes.c.user_id == staged.c.user_id,
        changes.c.status == "delivered",
    )
    if trait:
        same = exists().where(
            trait_values.c.trait_key == key,
            trait_values.c.user_id == staged.c.user_id,
            trait_values.c.value == staged.c.value,
        )
        row = _row(target, staged.c.user_id, staged.c.email, _NO_VALUE, staged.c.value, event=~same)
    else:
        acknowledged = _member(key, staged.c.user_id)
        row = _row(target, staged.c.user_id, staged.c.email, true(), event=~acknowledged)
    with engine.begin() as connection:
        return _insert(connection, select(*row).where(staged.c.run_id == target.run_id, ~done))


def save_retire_plan(engine: Engine, target: PlanTarget, *, trait: bool) -> int:
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
    with engine.begin() as connection:
        return _insert(connection, union_all(member_rows, valued_rows, uncertain_rows))


def held_kind(engine: Engine, key: str) -> str | None:
    """Which kind of state the key holds: "audience" (members), "trait" (non-null values),
    "both", or None when it holds neither."""
    with engine.connect() as connection:
        members = connection.scalar(select(exists().where(memberships.c.audience_key == key)))
        values = connection.scalar(
            select(
                exists().where(trait_values.c.trait_key == key, trait_values.c.value != NULL_JSON)
            )
        )
    if members and values:
        return "both"
    return "audience" if members else "trait" if values else None


def count_staged(engine: Engine, run_id: int) -> int:
    """How many members the run's snapshot holds."""
    with engine.connect() as connection:
        return _count(connection, select(func.count()).where(staged.c.run_id == run_id))


def count_planned(engine: Engine, run_id: int) -> int:
    """How many changes the run planned."""
    with engine.connect() as connection:
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


def _insert(connection: Connection, query: Any) -> int:
    """Insert plan rows; returns how many (psycopg's count of an INSERT is only kept when
    asked for)."""
    statement = changes.insert().from_select(PLAN_COLUMNS, query)
    return int(connection.execute(statement.execution_options(preserve_rowcount=True)).rowcount)


def _count(connection: Connection, query: Any) -> int:
    return int(connection.scalar(query) or 0)


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
    key, run_id = target.key, target.run_id
    nothing = literal(NULL_JSON)
    acknowledged = select(
        *_row(
            target, trait_values.c.user_id, trait_values.c.email, _NO_VALUE, nothing, event=true()
        )
    ).where(
        trait_values.c.trait_key == key,
        trait_values.c.value != NULL_JSON,
        _gone(run_id, trait_values.c.user_id),
    )
    unsure = select(
        *_row(target, uncertain.c.user_id, uncertain.c.email, _NO_VALUE, nothing, event=false())
    ).where(
        uncertain.c.audience_key == key,
        ~_valued(key, uncertain.c.user_id),
        _gone(run_id, uncertain.c.user_id),
    )
    return union_all(acknowledged, unsure)


def _trait_kept(target: PlanTarget) -> Any:
    """``on_missing = "keep"``: a user gone from the source keeps the last value computed for
    them. When a request for them went unanswered, Gist holds either that value or the one
    acknowledged before, so the last value attempted (else the acknowledged one) is sent
    again until Gist acknowledges it, and Gist and the state agree once more."""
    key, run_id = target.key, target.run_id
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
    return select(*row).where(uncertain.c.audience_key == key, _gone(run_id, uncertain.c.user_id))


def _gone(run_id: int, user_id: Any) -> ColumnElement[bool]:
    """Not in this run's snapshot, and not a row of it that was rejected (a glitch is not
    a departure)."""
    present = exists().where(staged.c.run_id == run_id, staged.c.user_id == user_id)
    glitch = exists().where(rejected_rows.c.run_id == run_id, rejected_rows.c.user_id == user_id)
    return and_(~present, ~glitch)
