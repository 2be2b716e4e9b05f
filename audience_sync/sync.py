"""``run_once``: lease → stage → plan → deliver → record; shared by every way of running a sync.

One invocation stages every chosen audience first, then plans them, so that a user's email
is the same in every request of the invocation (the first configured source that has the
user decides) and exits carry the current email, not the one stored with the membership.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import db, lease
from audience_sync.budget import workspace_budget
from audience_sync.config import Computation, Settings, TraitConfig, scrub
from audience_sync.delivery import Deliverer, DeliveryReport
from audience_sync.errors import (
    ConfigError,
    FencedError,
    LockHeldError,
    SourceError,
    StopRequestedError,
)
from audience_sync.events import EventNames, send_events
from audience_sync.fastpath import config_fingerprint, judge, overlaps
from audience_sync.gist import GistClient, RequestObserver, make_http_client
from audience_sync.ledger import vacuum_uncertain
from audience_sync.models import audiences
from audience_sync.pacer import Pacer
from audience_sync.plan import (
    PlanTarget,
    count_planned,
    count_staged,
    discard_plan,
    held_kind,
    resolve_emails,
    save_backfill_plan,
    save_plan,
    save_retire_plan,
    save_trait_plan,
    start_plan,
    unify_emails,
)
from audience_sync.runs import (
    Clock,
    RunResult,
    abandon_runs,
    exit_code,
    failure_kind,
    finish_run,
    load_key_kind,
    open_run,
    save_key_kind,
    save_run,
    unfinished_backfills,
    utcnow,
)
from audience_sync.sources import (
    FileSource,
    SqlSource,
    attachable_file,
    is_warehouse_native,
    source_for,
)
from audience_sync.stage import Snapshot, Staging, analyze_state
from audience_sync.statuses import DRY_RUN_KINDS, MODES, Mode, RunKind, RunStatus
from audience_sync.workers import Presence

__all__ = ["Progress", "RunResult", "SyncContext", "exit_code", "run_once", "utcnow"]

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Told how a run advances; the CLI draws progress bars from it."""

    def loaded(self, audience_key: str, rows: int) -> None:
        """``rows`` more source rows of ``audience_key`` were staged."""

    def planned(self, changes: int) -> None:
        """Delivery of ``changes`` planned changes is about to start."""

    def sent(self, changes: int) -> None:
        """``changes`` more changes got an answer (acknowledged or refused)."""


class NoProgress:
    """A Progress that shows nothing."""

    def loaded(self, audience_key: str, rows: int) -> None:
        pass

    def planned(self, changes: int) -> None:
        pass

    def sent(self, changes: int) -> None:
        pass


@dataclass(frozen=True)
class SyncContext:
    """Everything one invocation of ``run_once`` works with, passed as one value."""

    settings: Settings
    engine: Engine
    mode: Mode
    kind: RunKind
    allow_mass_exit: bool
    clock: Clock
    stop: threading.Event
    progress: Progress
    owner: str
    transport: httpx.AsyncBaseTransport | None = None
    observer: RequestObserver | None = None
    full_diff: bool = False  # never take the no-change fast path
    resume: bool = False  # a backfill skips whom the unfinished backfills before it reached

    @property
    def dry_run(self) -> bool:
        return self.kind in DRY_RUN_KINDS.values()


@dataclass(frozen=True)
class _Target:
    key: str
    name: str
    audience: Computation | None  # None when retiring an audience no longer configured


def run_once(
    settings: Settings,
    engine: Engine,
    keys: str | Sequence[str] = (),
    *,
    mode: Mode = "run",
    dry_run: bool = False,
    allow_mass_exit: bool = False,
    full_diff: bool = False,
    resume: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
    observer: RequestObserver | None = None,
    progress: Progress | None = None,
    worker: Presence | None = None,
) -> list[RunResult]:
    """Sync the audiences named by ``keys`` (one key, or several; all configured ones when
    empty, except for ``retire``, which needs them named) once.

    ``mode`` is ``run`` (send what changed), ``backfill`` (send ``true`` to every current
    member; with ``resume``, but those an unfinished backfill reached) or ``retire`` (clear
    a key no longer configured for everyone Gist may hold a value of it for).
    ``memberships`` moves only for changes Gist acknowledged, so whatever is not delivered
    (failure, crash, stop) is planned again by the next run. A dry run writes its plan as
    ``planned`` changes and sends nothing. A run of an unchanged file with nothing owed
    skips load and diff (``fastpath``) unless ``full_diff``.
    Setting ``stop`` (e.g. from a signal handler) ends the run gracefully: requests in
    flight finish and are recorded, and the runs are marked ``interrupted``.

    ``worker`` is the calling process's row in ``workers`` (a daemon keeps one for its
    lifetime); without one, this call registers itself for as long as it runs.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    keys = audience_keys(keys)
    if mode == "retire" and not keys:
        raise ValueError("retire needs the keys to retire: it never means every audience")
    # Without a worker of the caller's (a daemon keeps one), this call is one for its length.
    registered = nullcontext(worker) if worker is not None else Presence(engine, mode)
    with registered as worker:
        ctx = SyncContext(
            settings=settings,
            engine=engine,
            mode=mode,
            kind=DRY_RUN_KINDS[mode] if dry_run else mode,
            allow_mass_exit=allow_mass_exit,
            clock=clock,
            stop=stop or threading.Event(),
            progress=progress or NoProgress(),
            owner=worker.id,
            transport=transport,
            observer=observer,
            full_diff=full_diff,
            resume=resume,
        )
        targets = _targets(settings, engine, keys, mode)
        holder = lease.holder_for(engine, ctx.owner, settings)
        held: list[_Target] = []
        results: dict[str, RunResult] = {}
        try:
            for target in targets:
                try:
                    holder.acquire(target.key)
                except LockHeldError as exc:
                    # The caller reports it (a daemon once per holder, `run` in its table).
                    log.debug("skipping %s: %s", target.key, exc)
                    results[target.key] = RunResult(
                        target.key, target.name, ctx.kind, "skipped", error=str(exc)
                    )
                    continue
                held.append(target)
            worker.running(t.key for t in held)
            holder.start()
            planned = _prepare(ctx, held, results, holder)
            report = DeliveryReport()
            # Audiences with track events may owe events from earlier runs even with no change.
            tracked = {
                t.key: _event_names(t.audience)
                for t in held
                if t.audience is not None and t.audience.send_track
            }
            if (planned or tracked) and not ctx.dry_run:
                report = asyncio.run(_deliver(ctx, planned, tracked, holder))
            lost = {**holder.loss(), **report.lost}
            for result in planned:
                results[result.audience_key] = finish_run(
                    engine, result, report.error, report.interrupted, clock,
                    lost=lost.get(result.audience_key), failure=report.failure,
                )  # fmt: skip
            for key, reason in lost.items():
                # A run that planned nothing still ran without its lease at the end.
                if key in results and results[key].status == "succeeded":
                    results[key] = replace(
                        results[key], status="interrupted", error=reason, failure="interrupted"
                    )
                    save_run(engine, results[key], clock())
            vacuum_uncertain(engine, sum(results[r.audience_key].delivered for r in planned))
        except BaseException as exc:
            # Ctrl-C, SIGTERM or a crash of our own: record it; acknowledged work is already saved.
            status: RunStatus = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            running = [r for r in results.values() if r.status == "running"]
            abandon_runs(engine, running, status, exc, clock)
            raise
        finally:
            holder.stop()
            holder.release()
            worker.running(())
        return [results[t.key] for t in targets]


def audience_keys(keys: str | Sequence[str]) -> list[str]:
    """The keys a caller named, once each in their order: a single string is one key (not
    its characters); anything else must be a sequence of strings."""
    if isinstance(keys, str):
        return [keys]
    if not all(isinstance(key, str) for key in keys):
        raise TypeError(f"audience keys must be strings, got {keys!r}")
    return list(dict.fromkeys(keys))


def _targets(settings: Settings, engine: Engine, keys: Sequence[str], mode: Mode) -> list[_Target]:
    if mode != "retire":
        # In config order, however the keys were named: of a user's emails in several
        # sources, the first configured source's is sent (plan.unify_emails); in the order
        # named, `run b a` and `run a b` would each move the contact's email in Gist.
        wanted = {settings.audience(k).property_key for k in keys}  # unknown: a ConfigError
        chosen = [a for a in settings.computations if not keys or a.property_key in wanted]
        return [_Target(a.property_key, a.name, a) for a in chosen]
    configured = {a.property_key for a in settings.computations}
    still = [k for k in keys if k in configured]
    if still:
        raise ConfigError(
            f"{settings.path}: {', '.join(still)} still configured; remove it from the config "
            "before retiring it"
        )
    with engine.connect() as connection:
        names = dict(connection.execute(select(audiences.c.key, audiences.c.name)).all())
    unknown = [k for k in keys if k not in names]
    if unknown:
        retirable = ", ".join(sorted(set(names) - configured)) or "none"
        raise ConfigError(
            f"{', '.join(unknown)}: no such audience in the state, nothing to retire "
            f"(retirable: {retirable})"
        )
    return [_Target(k, names[k], None) for k in keys]


def _prepare(
    ctx: SyncContext,
    held: Sequence[_Target],
    results: dict[str, RunResult],
    holder: lease.Holder,
) -> list[RunResult]:
    """Stage every held target (but those the fast path spares), then plan each; returns
    the runs left ``running`` (planned, to deliver). Every run's result goes into
    ``results``; one audience's failure never stops the others. Staging and planning share
    one connection: the snapshots are its temporary tables."""
    opened: list[tuple[_Target, RunResult]] = []
    snapshots: dict[int, Snapshot] = {}

    def stage(c: SyncContext, t: _Target, r: RunResult) -> RunResult:
        return _stage(c, staging, snapshots, t, r)

    with ctx.engine.connect() as connection:
        staging = Staging(connection)
        try:
            for target in held:
                if ctx.stop.is_set():
                    results[target.key] = RunResult(
                        target.key, target.name, ctx.kind, "interrupted",
                        error="stopped before this audience started", failure="interrupted",
                    )  # fmt: skip
                    continue
                result = RunResult(target.key, target.name, ctx.kind, "running")
                result = results[target.key] = _guarded(ctx, target, result, _open)
                if result.status == "running" and target.audience is not None:
                    result = _guarded(ctx, target, result, _judge)
                    if result.status == "running" and not result.fast_path:
                        result = _guarded(ctx, target, result, stage)
                results[target.key] = result
                opened.append((target, result))
            _settle_fast_paths(ctx, connection, opened, snapshots, stage)
            for target, result in opened:
                results[target.key] = result
            staged = [
                snapshots[r.run_id]
                for _, r in opened
                if r.status == "running" and r.run_id in snapshots
            ]
            staged_keys = {
                t.key for t, r in opened if r.status == "running" and r.run_id in snapshots
            }
            # From here on every transaction reads the state and then writes it.
            connection.execution_options(**{db.WRITE_LOCK: True})
            conflicts = unify_emails(connection, staged)
            if staged:  # a fast path alone plans nothing: no statistics to refresh
                analyze_state(connection)
            for index, (target, result) in enumerate(opened):
                if result.status != "running":
                    continue
                result = replace(result, email_conflicts=conflicts.get(result.run_id or 0, 0))

                def plan(c: SyncContext, t: _Target, r: RunResult) -> RunResult:
                    earlier = _earlier_unstaged(c.settings, t.key, staged_keys)
                    return _plan(c, connection, snapshots.get(r.run_id or 0), t, r, holder, earlier)

                result = _guarded(ctx, target, result, plan)
                opened[index] = (target, result)
                results[target.key] = result
            plans = [
                r.run_id for _, r in opened if r.run_id and r.status in ("running", "succeeded")
            ]
            resolve_emails(connection, staged, plans)
        finally:
            # Every snapshot of this invocation, also one cut short while staging.
            _drop_quietly(staging)
    for _, result in opened:
        log.info(
            "%s: %d rows, %d members, %d entered, %d exited, %d resent, %d rejected%s",
            result.audience_key, result.source_rows, result.members, result.entered,
            result.exited, result.resent, result.rejected,
            " (fast path: file unchanged, load and diff skipped)" if result.fast_path else "",
        )  # fmt: skip
        if result.run_id is not None:
            save_run(ctx.engine, result, None if result.status == "running" else ctx.clock())
    return [r for _, r in opened if r.status == "running"]


def _judge(ctx: SyncContext, target: _Target, result: RunResult) -> RunResult:
    """Fingerprint the run's settings; mark it ``fast_path`` when ``fastpath`` allows."""
    assert target.audience is not None
    assert result.run_id is not None
    run_id, fingerprint = result.run_id, config_fingerprint(ctx.settings, target.audience)
    result = replace(result, config_fingerprint=fingerprint)
    regular = ctx.kind == "run" and not ctx.full_diff
    verdict = judge(ctx.engine, target.audience, run_id, fingerprint, regular=regular)
    if verdict is None or verdict.doubt is not None:
        return result
    return replace(
        result,
        fast_path=True,
        source_digest=verdict.digest,
        source_rows=verdict.source_rows,
        members=verdict.members,
    )


def _settle_fast_paths(
    ctx: SyncContext,
    connection: Connection,
    opened: list[tuple[_Target, RunResult]],
    snapshots: dict[int, Snapshot],
    stage: Callable[[SyncContext, _Target, RunResult], RunResult],
) -> None:
    """Stage after all a spared run whose members another staged source gives another
    email (the first configured source's email is sent, so its snapshot takes part), until
    none is left; the others end ``succeeded`` with nothing planned."""
    settled = False
    while not settled:
        settled = True
        staged = [snapshots[r.run_id] for _, r in opened if r.run_id in snapshots]
        for index, (target, result) in enumerate(opened):
            if not result.fast_path or not staged:
                continue
            if not overlaps(connection, target.key, staged):
                continue
            result = replace(result, fast_path=False, source_digest=None, source_rows=0, members=0)
            opened[index] = (target, _guarded(ctx, target, result, stage))
            settled = False
            break
    for index, (target, result) in enumerate(opened):
        if result.fast_path:
            opened[index] = (target, replace(result, status="succeeded"))


def _drop_quietly(staging: Staging) -> None:
    """Drop the snapshots; a connection that broke took its temporary tables with it."""
    try:
        staging.drop()
    except SQLAlchemyError as exc:
        log.debug("staging tables not dropped (the connection is gone): %s", exc)


def _guarded(
    ctx: SyncContext,
    target: _Target,
    result: RunResult,
    step: Callable[[SyncContext, _Target, RunResult], RunResult],
) -> RunResult:
    """Run one step of one audience; any failure fails that audience's run alone."""
    try:
        return step(ctx, target, result)
    except SourceError as exc:
        return replace(result, status="failed", error=str(exc), failure=exc.failure)
    except StopRequestedError as exc:
        return replace(result, status="interrupted", error=str(exc), failure=exc.failure)
    except FencedError as exc:  # the lease was lost before planning: as when sending
        return replace(result, status="interrupted", error=exc.reason, failure=exc.failure)
    except Exception as exc:
        error = describe_error(exc, ctx.settings)
        log.error("%s: %s failed: %s", target.key, step.__name__.strip("_"), error)
        log.debug("the failure in detail", exc_info=True)
        return replace(result, status="failed", error=error, failure=failure_kind(exc))


def describe_error(exc: Exception, settings: Settings) -> str:
    """One line naming an unexpected error, without the SQL or parameters (users' emails) a
    database error carries, nor any password of the configured URLs."""
    orig = getattr(exc, "orig", None) if isinstance(exc, SQLAlchemyError) else None
    cause = orig if isinstance(orig, BaseException) else exc
    lines = str(cause).strip().splitlines()
    text = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    for url in [settings.state.url, *(s.url for s in settings.sources.values())]:
        text = scrub(text, url)
    return text


def _open(ctx: SyncContext, target: _Target, result: RunResult) -> RunResult:
    """Record the run in ``sync_runs``."""
    audience = target.audience
    description = (
        source_for(ctx.settings, audience).description if audience is not None else "(retired)"
    )
    run_id = open_run(ctx.engine, target.key, target.name, description, ctx.kind, ctx.clock())
    return replace(result, run_id=run_id)


def _stage(
    ctx: SyncContext,
    staging: Staging,
    snapshots: dict[int, Snapshot],
    target: _Target,
    result: RunResult,
) -> RunResult:
    """Stage the run's source into its snapshot."""
    audience = target.audience
    assert audience is not None
    assert result.run_id is not None
    source = source_for(ctx.settings, audience)
    if is_warehouse_native(ctx.settings, audience):
        assert isinstance(source, SqlSource)
        snapshot = staging.stage_query(result.run_id, source)
        ctx.progress.loaded(target.key, snapshot.source_rows)
    else:
        # Both ends SQLite files: the state database reads the source itself, unless
        # stage_attached finds that unsafe (then None, and Python reads it).
        database = attachable_file(ctx.settings, audience)
        attached = None
        if database is not None:
            assert isinstance(source, SqlSource)
            attached = staging.stage_attached(
                result.run_id, source, database, lambda n: ctx.progress.loaded(target.key, n)
            )
        snapshot = attached or staging.stage(
            result.run_id,
            source,
            ctx.stop.is_set,
            lambda n: ctx.progress.loaded(target.key, n),
            value_type=audience.type if isinstance(audience, TraitConfig) else None,
        )
    snapshots[result.run_id] = snapshot
    result = replace(
        result,
        source_digest=source.digest if isinstance(source, FileSource) else None,
        source_rows=snapshot.source_rows,
        rejected=snapshot.rejected,
        staged_in=snapshot.staged_in,
    )
    if snapshot.source_rows and snapshot.rejected == snapshot.source_rows:
        return replace(
            result,
            status="failed",
            error=f"all {snapshot.rejected} rows were rejected ({snapshot.first_rejection}); "
            "nothing was planned",
            failure="source",
        )
    return result


def _earlier_unstaged(settings: Settings, key: str, staged: set[str]) -> tuple[str, ...]:
    """The keys configured before ``key`` (audiences before traits, each in config order)
    whose sources this invocation did not stage."""
    order = [c.property_key for c in settings.computations]
    before = order[: order.index(key)] if key in order else []
    return tuple(k for k in before if k not in staged)


def _plan(
    ctx: SyncContext,
    connection: Connection,
    snapshot: Snapshot | None,
    target: _Target,
    result: RunResult,
    holder: lease.Holder,
    earlier: tuple[str, ...] = (),
) -> RunResult:
    """Diff the staged snapshot and write the plan; ``running`` when there is one to send.
    ``earlier``: the keys configured before this one whose sources were not staged."""
    assert result.run_id is not None
    engine, key, audience = ctx.engine, target.key, target.audience
    track = audience is not None and audience.send_track
    staged = snapshot.table if snapshot is not None else None
    fence = partial(holder.confirm, keys=[key])
    plan = PlanTarget(
        result.run_id, key, staged, dry_run=ctx.dry_run, track=track, fence=fence,
        earlier=earlier,
    )  # fmt: skip
    done: RunStatus = "succeeded" if ctx.dry_run else "running"
    if audience is None:  # retire: clear what the key's recorded kind means
        kind = load_key_kind(engine, key) or held_kind(connection, key)
        start_plan(connection, plan, None)
        exits = save_retire_plan(connection, plan, trait=kind == "trait")
        return replace(result, exited=exits, status=done)
    assert snapshot is not None
    kind = "trait" if audience.is_trait else "audience"
    holds = held_kind(connection, key)
    if holds not in (None, kind):
        return replace(
            result,
            status="failed",
            error=(
                f"key {key!r} still holds {'trait values' if holds == 'trait' else 'members'} "
                f"from when it was {'a trait' if holds == 'trait' else 'an audience'}; "
                f"remove it from the config, run `audience-sync retire {key}`, then add it "
                "back (or give it another key)"
            ),
            failure="config",
        )
    if not ctx.dry_run:
        save_key_kind(engine, key, kind)
    start_plan(connection, plan, kind)
    if ctx.mode == "backfill":
        unfinished = unfinished_backfills(engine, key, plan.run_id)
        runs_text = ", ".join(map(str, unfinished))
        # Resuming trusts Gist to still hold what those backfills sent; only the operator
        # knows whether it was reset since (what a backfill is for), so it is asked for.
        resumed = unfinished if ctx.resume else []
        if resumed:
            log.warning("%s: resuming the backfill of runs %s", key, runs_text)
        elif unfinished:
            log.warning(
                "%s: the backfill of runs %s did not finish; starting over (--resume skips "
                "whom it reached, when Gist was not reset since)", key, runs_text,
            )  # fmt: skip
        keep = isinstance(audience, TraitConfig) and audience.on_missing == "keep"
        entered = save_backfill_plan(connection, plan, resumed, trait=audience.is_trait, keep=keep)
        members = count_staged(connection, snapshot)
        return replace(result, members=members, entered=entered, status=done, resumed=bool(resumed))
    if isinstance(audience, TraitConfig):
        diff = save_trait_plan(connection, plan, audience.on_missing)
    else:
        diff = save_plan(connection, plan)
    result = replace(
        result,
        members=diff.members,
        entered=diff.entered,
        exited=diff.exited,
        resent=diff.resent,
    )
    if not ctx.allow_mass_exit and diff.is_mass_exit(
        audience.mass_exit_threshold, audience.mass_exit_min_members
    ):
        discard_plan(connection, plan.run_id)
        noun = "values" if audience.is_trait else "members"
        return replace(
            result,
            status="guarded",
            failure="guarded",
            resent=0,
            error=(
                f"would remove {diff.exited} of {diff.held} {noun} "
                f"({diff.exited / diff.held:.0%} > {audience.mass_exit_threshold:.0%}); "
                "nothing was sent. If this is intended, run again with --allow-mass-exit"
            ),
        )
    return replace(result, status=done)


async def _deliver(
    ctx: SyncContext,
    planned: Sequence[RunResult],
    tracked: dict[str, EventNames],
    holder: lease.Holder,
) -> DeliveryReport:
    def should_stop() -> str | None:
        if ctx.stop.is_set():
            return "stopped by a signal"
        return None

    gist = ctx.settings.gist
    async with make_http_client(gist, ctx.transport) as http:
        client = GistClient(http, ctx.observer, deadline=gist.timeout_seconds)
        pacer = Pacer(gist, budget=workspace_budget(ctx.engine, gist))
        try:
            return await _send(ctx, client, pacer, planned, tracked, should_stop, holder)
        finally:
            await pacer.close()


async def _send(
    ctx: SyncContext,
    client: GistClient,
    pacer: Pacer,
    planned: Sequence[RunResult],
    tracked: dict[str, EventNames],
    should_stop: Callable[[], str | None],
    holder: lease.Holder,
) -> DeliveryReport:
    """The contacts of every planned run, then the events they owe."""
    gist = ctx.settings.gist
    deliverer = Deliverer(
        ctx.engine,
        client,
        gist,
        ctx.clock,
        should_stop,
        on_result=ctx.progress.sent,
        holder=holder,
        pacer=pacer,
    )
    run_ids = [r.run_id for r in planned if r.run_id is not None]
    with ctx.engine.connect() as connection:
        ctx.progress.planned(sum(count_planned(connection, run_id) for run_id in run_ids))
    report = await deliverer.run(run_ids)
    if tracked and report.error is None:
        # Events describe acknowledged changes only: they go after the contacts.
        stopped = await send_events(
            ctx.engine, client, pacer, tracked, gist.max_concurrency, should_stop, holder
        )
        if stopped is not None:
            report.error, report.failure = stopped
        if report.error is not None and holder.loss():
            report.interrupted, report.failure = True, "interrupted"
            report.lost.update(holder.loss())
    return report


def _event_names(audience: Computation) -> EventNames:
    if isinstance(audience, TraitConfig):
        return EventNames(trait=audience.event)
    return EventNames(audience.entered_event, audience.exited_event)
