"""``run_once``: lease → load → plan → deliver → record; shared by every way of running a sync."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import httpx
from sqlalchemy import Engine, delete, func, select, update

from audience_sync import lease
from audience_sync.config import AudienceConfig, Settings
from audience_sync.delivery import Deliverer, DeliveryReport
from audience_sync.errors import LockHeldError, SourceError, StopRequestedError
from audience_sync.gist import GistClient, RequestObserver, make_http_client
from audience_sync.models import audiences, staged_members
from audience_sync.models import member_changes as changes
from audience_sync.models import sync_runs as runs
from audience_sync.plan import clear_staging, load_diff, save_plan, stage_source
from audience_sync.sources import source_for

log = logging.getLogger(__name__)


FAILED_STATUSES = frozenset({"partial", "failed", "guarded", "interrupted"})

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Naive UTC now: how every timestamp is stored."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class RunResult:
    """How one audience's run ended (``run_id`` is None when it was skipped for a lock)."""

    audience_key: str
    name: str
    kind: str
    status: str
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


def run_once(
    settings: Settings,
    engine: Engine,
    keys: Sequence[str] = (),
    *,
    dry_run: bool = False,
    allow_mass_exit: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
    observer: RequestObserver | None = None,
) -> list[RunResult]:
    """Sync the audiences named by ``keys`` (all when empty) once; see DESIGN.md.

    ``memberships`` moves only for changes Gist acknowledged, so whatever this run does
    not deliver (failure, crash, stop) is planned again by the next one. Setting ``stop``
    (e.g. from a signal handler) ends the run gracefully: requests in flight finish and are
    recorded, and the runs are marked ``interrupted``.
    """
    stop = stop or threading.Event()
    selected = [settings.audience(k) for k in keys] if keys else list(settings.audiences)
    kind = "dry-run" if dry_run else "run"
    owner = lease.new_owner()
    heartbeat = lease.Heartbeat(engine, owner, clock)
    held: list[AudienceConfig] = []
    results: dict[str, RunResult] = {}
    try:
        for audience in selected:
            key = audience.property_key
            try:
                lease.acquire(engine, key, owner, clock())
            except LockHeldError as exc:
                log.warning("skipping %s: %s", key, exc)
                results[key] = RunResult(key, audience.name, kind, "skipped", error=str(exc))
                continue
            held.append(audience)
            heartbeat.add(key)
        heartbeat.start()
        planned: list[RunResult] = []
        for audience in held:
            if stop.is_set():
                results[audience.property_key] = RunResult(
                    audience.property_key, audience.name, kind, "interrupted",
                    error="stopped before this audience started",
                )  # fmt: skip
                continue
            result = _prepare(settings, engine, audience, kind, allow_mass_exit, clock, stop)
            results[audience.property_key] = result
            if result.status == "running":
                planned.append(result)
        report = DeliveryReport()
        if planned and not dry_run:
            report = asyncio.run(
                _deliver(settings, engine, planned, heartbeat, transport, clock, stop, observer)
            )
        for result in planned:
            results[result.audience_key] = _finish(engine, result, report, clock)
    except BaseException as exc:
        # Ctrl-C, SIGTERM or a crash of our own: record it; acknowledged work is already saved.
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _abandon(engine, [r for r in results.values() if r.status == "running"], status, exc, clock)
        raise
    finally:
        heartbeat.stop()
        lease.release(engine, [a.property_key for a in held], owner)
    return [results[a.property_key] for a in selected]


def _prepare(
    settings: Settings,
    engine: Engine,
    audience: AudienceConfig,
    kind: str,
    allow_mass_exit: bool,
    clock: Clock,
    stop: threading.Event,
) -> RunResult:
    """Stage the source, diff it and write the plan; the result is ``running`` when planned."""
    key = audience.property_key
    source = source_for(settings, audience)
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
                .values(name=audience.name, source=source.description)
            )
        else:
            connection.execute(
                audiences.insert().values(key=key, name=audience.name, source=source.description)
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
    result = RunResult(key, audience.name, kind, "running", run_id=run_id)
    try:
        staged = stage_source(engine, run_id, source, stop.is_set)
        diff = load_diff(engine, run_id, key)
        result = replace(
            result,
            source_rows=staged.source_rows,
            rejected=staged.rejected,
            members=diff.members,
            entered=diff.entered,
            exited=diff.exited,
        )
        if not allow_mass_exit and diff.is_mass_exit(
            audience.mass_exit_threshold, audience.mass_exit_min_members
        ):
            share = diff.exited / diff.acknowledged
            result = replace(
                result,
                status="guarded",
                error=(
                    f"would remove {diff.exited} of {diff.acknowledged} members ({share:.0%} > "
                    f"{audience.mass_exit_threshold:.0%}); nothing was sent. If this is intended, "
                    "run again with --allow-mass-exit"
                ),
            )
        elif kind == "dry-run":
            result = replace(result, status="succeeded")
        else:
            save_plan(engine, run_id, key)
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
    if result.status != "running":
        _save_run(engine, result, clock())
    else:
        _save_run(engine, result, None)
    return result


async def _deliver(
    settings: Settings,
    engine: Engine,
    planned: Sequence[RunResult],
    heartbeat: lease.Heartbeat,
    transport: httpx.AsyncBaseTransport | None,
    clock: Clock,
    stop: threading.Event,
    observer: RequestObserver | None,
) -> DeliveryReport:
    def should_stop() -> str | None:
        if stop.is_set():
            return "stopped by a signal"
        if heartbeat.lost.is_set():
            return "lost the audience lease to another process"
        return None

    async with make_http_client(settings.gist, transport) as http:
        client = GistClient(http, observer)
        deliverer = Deliverer(engine, client, settings.gist, clock, should_stop)
        return await deliverer.run([r.run_id for r in planned if r.run_id is not None])


def _finish(engine: Engine, result: RunResult, report: DeliveryReport, clock: Clock) -> RunResult:
    """Count what was delivered and failed, and settle the run's status."""
    counts = _change_counts(engine, result.run_id)
    delivered, failed, pending = (counts.get(s, 0) for s in ("delivered", "failed", "pending"))
    error = report.error
    if report.interrupted and pending:
        status = "interrupted"
    elif error is not None and (pending or failed):
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
    engine: Engine, running: Sequence[RunResult], status: str, exc: BaseException, clock: Clock
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
