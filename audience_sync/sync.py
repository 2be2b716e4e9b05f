"""``run_once``: lease → load → plan → deliver → record; shared by every way of running a sync."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

import httpx
from sqlalchemy import Engine, delete, func, select, update

from audience_sync import lease
from audience_sync.config import Computation, Settings, TraitConfig
from audience_sync.delivery import Deliverer, DeliveryReport, Pacer
from audience_sync.errors import ConfigError, LockHeldError, SourceError, StopRequestedError
from audience_sync.events import EventNames, send_events
from audience_sync.gist import GistClient, RequestObserver, make_http_client
from audience_sync.models import audiences, staged_members
from audience_sync.models import member_changes as changes
from audience_sync.models import sync_runs as runs
from audience_sync.plan import (
    analyze,
    clear_staging,
    discard_plan,
    load_diff,
    load_trait_diff,
    mark_events,
    save_backfill_plan,
    save_plan,
    save_retire_plan,
    save_trait_plan,
    stage_source,
)
from audience_sync.sources import source_for
from audience_sync.statuses import FAILED_STATUSES, MODES, Mode, RunKind, RunStatus

log = logging.getLogger(__name__)


Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Naive UTC now: how every timestamp is stored."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class RunResult:
    """How one audience's run ended (``run_id`` is None when it was skipped for a lock)."""

    audience_key: str
    name: str
    kind: RunKind
    status: RunStatus
    run_id: int | None = None
    source_rows: int = 0
    members: int = 0
    entered: int = 0
    exited: int = 0
    delivered: int = 0
    failed: int = 0
    rejected: int = 0
    error: str | None = None


def exit_code(results: Sequence[RunResult]) -> int:
    """0 all succeeded; 1 any partial/failed/guarded; 3 any skipped for a lock (none failed)."""
    if any(r.status in FAILED_STATUSES for r in results):
        return 1
    if any(r.status == "skipped" for r in results):
        return 3
    return 0


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
class _Target:
    key: str
    name: str
    audience: Computation | None  # None when retiring an audience no longer configured


def run_once(
    settings: Settings,
    engine: Engine,
    keys: Sequence[str] = (),
    *,
    mode: Mode = "run",
    dry_run: bool = False,
    allow_mass_exit: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
    observer: RequestObserver | None = None,
    progress: Progress | None = None,
) -> list[RunResult]:
    """Sync the audiences named by ``keys`` (all configured ones when empty) once.

    ``mode`` is ``run`` (send what changed), ``backfill`` (send ``true`` to every current
    member, resuming an unfinished backfill) or ``retire`` (send ``false`` to everyone Gist
    may hold for audiences no longer configured). ``memberships`` moves only for changes Gist
    acknowledged, so whatever is not delivered (failure, crash, stop) is planned again by the
    next run. Setting ``stop`` (e.g. from a signal handler) ends the run gracefully: requests
    in flight finish and are recorded, and the runs are marked ``interrupted``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    stop = stop or threading.Event()
    progress = progress or NoProgress()
    targets = _targets(settings, engine, keys, mode)
    kind: RunKind = "dry-run" if dry_run else mode
    owner = lease.new_owner()
    heartbeat = lease.Heartbeat(engine, owner, clock)
    held: list[_Target] = []
    results: dict[str, RunResult] = {}
    try:
        for target in targets:
            try:
                lease.acquire(engine, target.key, owner, clock())
            except LockHeldError as exc:
                log.warning("skipping %s: %s", target.key, exc)
                results[target.key] = RunResult(
                    target.key, target.name, kind, "skipped", error=str(exc)
                )
                continue
            held.append(target)
            heartbeat.add(target.key)
        heartbeat.start()
        planned: list[RunResult] = []
        for target in held:
            if stop.is_set():
                results[target.key] = RunResult(
                    target.key, target.name, kind, "interrupted",
                    error="stopped before this audience started",
                )  # fmt: skip
                continue
            result = _prepare(
                settings, engine, target, mode, kind, allow_mass_exit, clock, stop, progress
            )
            results[target.key] = result
            if result.status == "running":
                planned.append(result)
        report = DeliveryReport()
        # Audiences with track events may owe events from earlier runs even with no change.
        tracked = {
            t.key: _event_names(t.audience)
            for t in held
            if t.audience is not None and t.audience.send_track and mode == "run"
        }
        if (planned or tracked) and not dry_run:
            report = asyncio.run(
                _deliver(
                    settings,
                    engine,
                    planned,
                    tracked,
                    heartbeat,
                    transport,
                    clock,
                    stop,
                    observer,
                    progress,
                )
            )
        for result in planned:
            results[result.audience_key] = _finish(engine, result, report, clock)
    except BaseException as exc:
        # Ctrl-C, SIGTERM or a crash of our own: record it; acknowledged work is already saved.
        status: RunStatus = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _abandon(engine, [r for r in results.values() if r.status == "running"], status, exc, clock)
        raise
    finally:
        heartbeat.stop()
        lease.release(engine, [t.key for t in held], owner)
    return [results[t.key] for t in targets]


def _targets(settings: Settings, engine: Engine, keys: Sequence[str], mode: Mode) -> list[_Target]:
    if mode != "retire":
        chosen = [settings.audience(k) for k in keys] if keys else list(settings.computations)
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
    return [_Target(k, names.get(k, k), None) for k in keys]


def _prepare(
    settings: Settings,
    engine: Engine,
    target: _Target,
    mode: Mode,
    kind: RunKind,
    allow_mass_exit: bool,
    clock: Clock,
    stop: threading.Event,
    progress: Progress,
) -> RunResult:
    """Stage the source, diff it and write the plan; the result is ``running`` when planned."""
    key, audience = target.key, target.audience
    source = source_for(settings, audience) if audience is not None else None
    description = source.description if source is not None else "(retired)"
    now = clock()
    with engine.begin() as connection:
        # We hold the lease, so any run of this audience still marked running is dead;
        # its snapshot, if it died while staging, goes with it.
        dead = select(runs.c.id).where(runs.c.audience_key == key, runs.c.status == "running")
        connection.execute(delete(staged_members).where(staged_members.c.run_id.in_(dead)))
        connection.execute(
            update(runs)
            .where(runs.c.audience_key == key, runs.c.status == "running")
            .values(status="interrupted", finished_at=now, error="the process running it stopped")
        )
        known = connection.scalar(select(func.count()).where(audiences.c.key == key))
        if known:
            connection.execute(
                update(audiences)
                .where(audiences.c.key == key)
                .values(name=target.name, source=description)
            )
        else:
            connection.execute(
                audiences.insert().values(key=key, name=target.name, source=description)
            )
        run_id = connection.execute(
            runs.insert()
            .values(
                audience_key=key,
                kind=kind,
                status="running",
                started_at=now,
                source_rows=0,
                members=0,
                entered=0,
                exited=0,
                delivered=0,
                failed=0,
                rejected=0,
            )
            .returning(runs.c.id)
        ).scalar_one()
    result = RunResult(key, target.name, kind, "running", run_id=run_id)
    try:
        if mode == "retire":
            if kind == "dry-run":
                diff = load_diff(engine, run_id, key)
                result = replace(result, exited=diff.acknowledged, status="succeeded")
            else:
                result = replace(result, exited=save_retire_plan(engine, run_id, key))
        else:
            # only retire has no audience config and no source
            assert audience is not None
            assert source is not None
            staged = stage_source(
                engine,
                run_id,
                source,
                stop.is_set,
                lambda n: progress.loaded(key, n),
                with_value=audience.is_trait,
                value_type=audience.type if isinstance(audience, TraitConfig) else None,
            )
            result = replace(result, source_rows=staged.source_rows, rejected=staged.rejected)
            analyze(engine)
            result = _plan(engine, result, run_id, audience, mode, kind, allow_mass_exit)
    except SourceError as exc:
        result = replace(result, status="failed", error=str(exc))
    except StopRequestedError as exc:
        result = replace(result, status="interrupted", error=str(exc))
    finally:
        clear_staging(engine, run_id)
    log.info(
        "%s: %d rows, %d members, %d entered, %d exited, %d rejected",
        key,
        result.source_rows,
        result.members,
        result.entered,
        result.exited,
        result.rejected,
    )
    _save_run(engine, result, None if result.status == "running" else clock())
    return result


def _plan(
    engine: Engine,
    result: RunResult,
    run_id: int,
    audience: Computation,
    mode: Mode,
    kind: RunKind,
    allow_mass_exit: bool,
) -> RunResult:
    """Diff the staged snapshot and write the plan for ``run`` or ``backfill``."""
    key = result.audience_key
    if mode == "backfill":
        diff = load_diff(engine, run_id, key)
        resumed = _unfinished_backfills(engine, key, run_id)
        entered = diff.members
        if kind != "dry-run":
            entered = save_backfill_plan(engine, run_id, key, resumed, trait=audience.is_trait)
        if resumed:
            log.warning("%s: resuming the backfill of runs %s", key, ", ".join(map(str, resumed)))
        status: RunStatus = "succeeded" if kind == "dry-run" else "running"
        return replace(result, members=diff.members, entered=entered, status=status)
    dry = kind == "dry-run"
    if isinstance(audience, TraitConfig):
        missing = audience.on_missing
        diff = (
            load_trait_diff(engine, run_id, key, missing)
            if dry
            else save_trait_plan(engine, run_id, key, missing)
        )
    else:
        diff = load_diff(engine, run_id, key) if dry else save_plan(engine, run_id, key)
    result = replace(result, members=diff.members, entered=diff.entered, exited=diff.exited)
    if not allow_mass_exit and diff.is_mass_exit(
        audience.mass_exit_threshold, audience.mass_exit_min_members
    ):
        discard_plan(engine, run_id)
        share = diff.exited / diff.acknowledged
        return replace(
            result,
            status="guarded",
            error=(
                f"would remove {diff.exited} of {diff.acknowledged} members ({share:.0%} > "
                f"{audience.mass_exit_threshold:.0%}); nothing was sent. If this is intended, "
                "run again with --allow-mass-exit"
            ),
        )
    if dry:
        return replace(result, status="succeeded")
    if audience.send_track:
        mark_events(engine, run_id)
    return result


def _unfinished_backfills(engine: Engine, key: str, run_id: int) -> list[int]:
    """The backfill runs since the audience's last successful one: what a backfill resumes."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(runs.c.id, runs.c.status)
            .where(runs.c.audience_key == key, runs.c.kind == "backfill", runs.c.id != run_id)
            .order_by(runs.c.id.desc())
        ).all()
    chain: list[int] = []
    for row in rows:
        if row.status == "succeeded":
            break
        chain.append(row.id)
    return chain


async def _deliver(
    settings: Settings,
    engine: Engine,
    planned: Sequence[RunResult],
    tracked: dict[str, EventNames],
    heartbeat: lease.Heartbeat,
    transport: httpx.AsyncBaseTransport | None,
    clock: Clock,
    stop: threading.Event,
    observer: RequestObserver | None,
    progress: Progress,
) -> DeliveryReport:
    def should_stop() -> str | None:
        if stop.is_set():
            return "stopped by a signal"
        if heartbeat.lost.is_set():
            return "lost the audience lease to another process"
        return None

    async with make_http_client(settings.gist, transport) as http:
        client = GistClient(http, observer)
        deliverer = Deliverer(
            engine, client, settings.gist, clock, should_stop, on_result=progress.sent
        )
        progress.planned(sum(r.entered + r.exited for r in planned))
        report = await deliverer.run([r.run_id for r in planned if r.run_id is not None])
        if tracked and report.error is None:
            # Events describe acknowledged changes only: they go after the contacts.
            pacer = Pacer(settings.gist)
            concurrency = settings.gist.max_concurrency
            report.error = await send_events(
                engine, client, pacer, tracked, concurrency, should_stop
            )
        return report


def _event_names(audience: Computation) -> EventNames:
    if isinstance(audience, TraitConfig):
        return EventNames(trait=audience.event)
    return EventNames(audience.entered_event, audience.exited_event)


def _finish(engine: Engine, result: RunResult, report: DeliveryReport, clock: Clock) -> RunResult:
    """Count what was delivered and failed, and settle the run's status."""
    counts = _change_counts(engine, result.run_id)
    delivered, failed, pending = (counts.get(s, 0) for s in ("delivered", "failed", "pending"))
    error = report.error
    status: RunStatus
    if report.interrupted and pending:
        status = "interrupted"
    elif error is not None and not report.interrupted:
        # Delivery stopped (key refused, Gist down, events owed): not a success, even if
        # this audience's own changes all went through before it did.
        status = "failed"
    elif failed or pending:
        status = "partial"
    else:
        status = "succeeded"
    finished = replace(
        result,
        status=status,
        delivered=delivered,
        failed=failed,
        error=error
        if status in ("failed", "interrupted")
        else (f"{failed} changes failed" if failed else None),
    )
    _save_run(engine, finished, clock())
    return finished


def _save_run(engine: Engine, result: RunResult, finished_at: datetime | None) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.id == result.run_id)
            .values(
                status=result.status,
                finished_at=finished_at,
                source_rows=result.source_rows,
                members=result.members,
                entered=result.entered,
                exited=result.exited,
                delivered=result.delivered,
                failed=result.failed,
                rejected=result.rejected,
                error=result.error,
            )
        )
        if finished_at is not None and result.status in ("succeeded", "partial"):
            connection.execute(
                update(audiences)
                .where(audiences.c.key == result.audience_key)
                .values(
                    last_synced_at=finished_at,
                    first_synced_at=func.coalesce(audiences.c.first_synced_at, finished_at),
                )
            )


def _abandon(
    engine: Engine,
    running: Sequence[RunResult],
    status: RunStatus,
    exc: BaseException,
    clock: Clock,
) -> None:
    for result in running:
        try:
            counts = _change_counts(engine, result.run_id)
            _save_run(
                engine,
                replace(
                    result,
                    status=status,
                    delivered=counts.get("delivered", 0),
                    failed=counts.get("failed", 0),
                    error=f"{type(exc).__name__}: {exc}",
                ),
                clock(),
            )
        except Exception:
            # The original error matters more than this one; the next run marks it interrupted.
            log.exception("could not record run %s as %s", result.run_id, status)


def _change_counts(engine: Engine, run_id: int | None) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(changes.c.status, func.count())
            .where(changes.c.run_id == run_id)
            .group_by(changes.c.status)
        ).all()
    return {status: count for status, count in rows}
