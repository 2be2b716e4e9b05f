"""The daemon: one APScheduler job per scheduled audience, reload, graceful stop within a
bound, heartbeat, and its own check of the state database behind ``/healthz``."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_SCHEDULER_STARTED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import undefined
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.config import Computation, Settings, parse_duration
from audience_sync.cron import cron_trigger
from audience_sync.db import describe_error
from audience_sync.errors import AudienceSyncError, ConfigError
from audience_sync.health import HeartbeatFile, Signs, StateWatch, SyncProgress, assess
from audience_sync.render import ProgressLog, duration_text
from audience_sync.sync import RunResult

log = logging.getLogger(__name__)


class _QuietSkips(logging.Filter):
    """Drops APScheduler's warning at every tick of a job still running: the daemon says
    it once per overrun, in its own words (``Daemon._on_max_instances``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in str(record.msg)


# The scheduler's own logger: a child of APScheduler's, so its level follows -vv, filtered
# here rather than on APScheduler's logger, which other code in the process may share.
_scheduler_log = logging.getLogger("apscheduler.scheduler.audience_sync")
_scheduler_log.addFilter(_QuietSkips())

SyncFn = Callable[[Settings, list[str], threading.Event], list[RunResult]]
"""Syncs the given audience keys once (a closure over ``run_once`` and the state engine)."""

RecentStatuses = Callable[[list[str], int], dict[str, list[str]]]
"""The statuses of each audience's latest N finished runs, newest first (reads the state
database, so it raising means the database cannot be reached)."""

# Keys a reload cannot apply to a running daemon: it would need a new engine or server.
RESTART_KEYS = ("state.url", "daemon.metrics_host", "daemon.metrics_port")

HEARTBEAT_JOB = "daemon:heartbeat"  # ':' never occurs in an audience key
HEARTBEAT_SECONDS = 60
# A stop asked for (SIGTERM) ends the process within gist.timeout_seconds (requests in
# flight get their deadline) plus this, whatever the state database or a source does.
STOP_MARGIN_SECONDS = 10

# What a job's trigger is built from; a reload reschedules a job only when this changes.
_Spec = tuple[str, str]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _ignore(results: list[RunResult]) -> None:
    return None


class Daemon:
    """Runs each scheduled audience's sync on its cron schedule or interval until stopped."""

    def __init__(
        self,
        load_settings: Callable[[], Settings],
        sync: SyncFn,
        last_starts: Callable[[], dict[str, datetime]],
        *,
        clock: Callable[[], datetime] = _utcnow,
        on_results: Callable[[list[RunResult]], None] = _ignore,
        stop: threading.Event | None = None,
        recent_statuses: RecentStatuses | None = None,
        hard_stop: bool = False,
    ) -> None:
        """Load the config and schedule its audiences (the scheduler starts in :meth:`serve`).

        ``ConfigError`` when no audience has a ``schedule`` or ``every``: such a daemon
        would idle forever. ``stop`` is the event that ends the running sync (a signal
        handler's, for ``--once``). ``recent_statuses`` is read by the daemon's own check
        of the state database while it serves (see ``health.StateWatch``). With
        ``hard_stop`` (the daemon is the process), a stop that has not finished within
        :attr:`stop_seconds` ends the process (exit 1), whatever still waits.
        """
        self._load_settings = load_settings
        self._sync = sync
        self._last_starts = last_starts
        self._clock = clock
        self._on_results = on_results
        self._recent_statuses = recent_statuses
        self._hard_stop = hard_stop
        self._stop = stop if stop is not None else threading.Event()
        self._tick_at: datetime | None = None  # the scheduler loop's last heartbeat job
        self._progress_at = clock()  # the sync thread's last sign of life
        # Progress as log lines too (shown with -v): a long sync is never silent. Each sync
        # gets a fresh one (see _sync_and_report); ``sync`` reads this attribute per call.
        self.progress = SyncProgress(self._touch, ProgressLog())
        self._state = (
            StateWatch(self._read_recent, clock, describe_error, log)
            if recent_statuses is not None
            else None
        )
        self._job_started: dict[str, datetime] = {}  # job id → when its run began
        self._ticks_skipped: dict[str, int] = {}  # job id → ticks skipped while it ran
        self._lock = threading.RLock()  # reloads, last results and the heartbeat file
        self._idle = threading.Condition()  # guards _active and _running
        self._active = 0  # sync calls not yet reported; serve() waits for none
        self._running: list[str] = []  # keys being synced, for the heartbeat
        self._last_results: dict[str, tuple[RunResult, datetime]] = {}
        self._skipped: dict[str, str | None] = {}  # key → why its last tick was skipped
        self._specs: dict[str, _Spec] = {}
        self._serve_thread: threading.Thread | None = None
        self._settings = load_settings()
        _check_scheduled(self._settings)
        self._heartbeat = HeartbeatFile(self._settings.daemon.heartbeat_file)
        self._scheduler = BlockingScheduler(
            logger=_scheduler_log,
            timezone=ZoneInfo(self._settings.daemon.timezone),
            # One sync at a time, so gist.requests_per_second holds for the daemon as a whole;
            # the heartbeat has its own thread so a long sync never makes it look dead.
            executors={"default": ThreadPoolExecutor(1), "heartbeat": ThreadPoolExecutor(1)},
        )
        self._scheduler.add_listener(self._on_started, EVENT_SCHEDULER_STARTED)
        self._scheduler.add_listener(self._on_max_instances, EVENT_JOB_MAX_INSTANCES)
        self._apply(self._settings, self._load_starts())
        unscheduled = [a.property_key for a in self._settings.computations if _spec(a, "") is None]
        if unscheduled:
            log.info("not scheduled (no `schedule` or `every`): %s", ", ".join(unscheduled))

    @property
    def settings(self) -> Settings:
        """The config in force (the newest that loaded without error)."""
        return self._settings

    @property
    def scheduler(self) -> Any:
        """The underlying APScheduler ``BlockingScheduler`` (for introspection)."""
        return self._scheduler

    def jobs(self) -> dict[str, Any]:
        """Audience key → the APScheduler trigger currently scheduled for it."""
        return {j.id: j.trigger for j in self._scheduler.get_jobs() if j.id != HEARTBEAT_JOB}

    def due(self, now: datetime | None = None) -> list[str]:
        """Scheduled audiences never run, or whose next fire time after their last start is due."""
        now = now or self._clock()
        lasts, jobs = self._load_starts(), self.jobs()
        keys = [a.property_key for a in self._settings.computations if a.property_key in jobs]
        return [key for key in keys if _is_due(jobs[key], lasts.get(key), now)]

    def missed(self, now: datetime | None = None) -> list[str]:
        """What start-up runs at once: audiences never run, or whose newest fire time since
        their last start passed at most ``misfire_grace_seconds`` ago."""
        now = now or self._clock()
        lasts, jobs = self._load_starts(), self.jobs()
        grace = self._settings.daemon.misfire_grace_seconds
        keys = [a.property_key for a in self._settings.computations if a.property_key in jobs]
        return [key for key in keys if _is_due(jobs[key], lasts.get(key), now, grace)]

    def run_due(self) -> list[RunResult]:
        """Sync every due audience now in one ``sync`` call (``--once``); their results."""
        keys = self.due()
        if not keys:
            log.info("no audience is due")
            self._write_heartbeat()
            return []
        return self._sync_and_report(keys)

    def reload(self) -> None:
        """Re-read the config; add, drop and reschedule jobs. A broken config keeps the old one."""
        if threading.current_thread() is self._serve_thread:
            # A signal handler interrupted the scheduler loop, maybe while it holds its job
            # store mid-update: apply from another thread, which waits for the loop to finish.
            threading.Thread(target=self._reload, name="audience-sync-reload").start()
            return
        self._reload()

    def _reload(self) -> None:
        try:
            settings = self._load_settings()
            _check_scheduled(settings)
            lasts = self._load_starts()
        except ConfigError as exc:
            log.error("config reload failed, keeping the previous config: %s", exc)
            return
        except Exception:
            log.exception("config reload failed, keeping the previous config")
            return
        changed_keys = _restart_keys_changed(self._settings, settings)
        if changed_keys:
            log.error(
                "config reload refused, keeping the previous config: %s changed, which "
                "only a restart applies; restart the daemon to use the new config",
                ", ".join(changed_keys),
            )
            return
        with self._lock:
            added, removed, changed = self._apply(settings, lasts)
            self._settings = settings
            self._heartbeat.move_to(settings.daemon.heartbeat_file)
        log.info(
            "config reloaded: added %s; removed %s; rescheduled %s",
            *(", ".join(keys) or "none" for keys in (added, removed, changed)),
        )

    @property
    def stop_seconds(self) -> float:
        """How long a stop may take: the requests in flight get their deadline
        (``gist.timeout_seconds``), saving what they did ``STOP_MARGIN_SECONDS`` more."""
        return self._settings.gist.timeout_seconds + STOP_MARGIN_SECONDS

    def request_stop(self) -> None:
        """Stop scheduling; the running sync sees the stop event and ends gracefully."""
        if not self._stop.is_set():
            log.info("stopping: the running sync finishes its requests in flight")
            if self._hard_stop:
                overdue = threading.Timer(self.stop_seconds, self._stop_overdue)
                overdue.daemon = True  # a stop that finishes in time exits without it
                overdue.name = "stop-deadline"
                overdue.start()
        self._stop.set()
        self._shutdown()

    def _stop_overdue(self) -> None:
        """The stop took longer than its bound: something waits on a database, a source or
        the network without end. Leave it; nothing acknowledged and saved is lost, and a run
        left ``running`` is marked ``interrupted`` by the next one."""
        with self._idle:
            running = list(self._running)
        what = (
            f"the sync of {', '.join(running)} is still waiting (on the state database, a "
            "source or Gist)"
            if running
            else "the state database does not answer"
        )
        log.error(
            "not stopped within %gs (gist.timeout_seconds + %d s): %s; exiting now (the next "
            "run marks a run left `running` interrupted)",
            self.stop_seconds, STOP_MARGIN_SECONDS, what,
        )  # fmt: skip
        logging.shutdown()
        os._exit(1)

    def serve(self) -> int:
        """Run the scheduler until :meth:`request_stop`, wait for the running sync, return 0.

        At start, audiences never synced, and those whose missed fire time is at most
        ``misfire_grace_seconds`` old, run at once; older misses are skipped, not run late.
        """
        if self._stop.is_set():
            return 0
        with self._lock:  # a reload from now on catches up new audiences itself
            self._serve_thread = threading.current_thread()
            for key in self.missed():
                self._scheduler.modify_job(key, next_run_time=datetime.now(UTC))
        self._tick_at = self._clock()
        self._scheduler.add_job(
            self._tick,
            IntervalTrigger(seconds=HEARTBEAT_SECONDS, timezone=UTC),
            id=HEARTBEAT_JOB,
            name=HEARTBEAT_JOB,
            executor="heartbeat",
            misfire_grace_time=HEARTBEAT_SECONDS,
        )
        self._write_heartbeat()
        if self._state is not None:
            threading.Thread(
                target=self._state.watch, args=(self._stop,), name="state-watch", daemon=True
            ).start()
        log.info("daemon started (pid %d): %d audiences scheduled", os.getpid(), len(self._specs))
        self._scheduler.start()  # blocks until request_stop() shuts it down
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0)
        self._write_heartbeat()
        log.info("daemon stopped")
        return 0

    def _apply(
        self, settings: Settings, lasts: dict[str, datetime]
    ) -> tuple[list[str], list[str], list[str]]:
        """Make the jobs match ``settings``; returns the keys added, removed and rescheduled."""
        tz = settings.daemon.timezone
        grace = settings.daemon.misfire_grace_seconds
        wanted = {a.property_key: (a, s) for a in settings.computations if (s := _spec(a, tz))}
        removed = [key for key in self._specs if key not in wanted]
        for key in removed:
            self._scheduler.remove_job(key)
            del self._specs[key]
        added, changed = [], []
        for key, (audience, spec) in wanted.items():
            last = lasts.get(key)
            if key not in self._specs:
                trigger = _trigger(audience, tz, last)
                catch_up = self._serve_thread is not None and _is_due(
                    trigger, last, self._clock(), grace
                )
                self._scheduler.add_job(
                    self._run_job,
                    trigger,
                    args=[key],
                    id=key,
                    name=key,
                    coalesce=True,
                    max_instances=1,
                    misfire_grace_time=grace,
                    next_run_time=datetime.now(UTC) if catch_up else undefined,
                )
                added.append(key)
            else:
                if spec != self._specs[key]:
                    self._scheduler.reschedule_job(key, trigger=_trigger(audience, tz, last))
                    changed.append(key)
                self._scheduler.modify_job(key, misfire_grace_time=grace)
            self._specs[key] = spec
        return added, removed, changed

    def _run_job(self, key: str) -> None:
        if key in self._specs:  # a reload may have dropped it while the run was queued
            with self._job_running(key):
                self._sync_and_report([key])

    @contextmanager
    def _job_running(self, job_id: str) -> Iterator[None]:
        """Notes when a job's run began; after a run that outlasted ticks, says so once."""
        started = self._clock()
        with self._idle:
            self._job_started[job_id] = started
        try:
            yield
        finally:
            with self._idle:
                self._job_started.pop(job_id, None)
                skipped = self._ticks_skipped.pop(job_id, 0)
            if skipped:
                took = duration_text((self._clock() - started).total_seconds())
                log.info(
                    "%s: the run that began at %s ended after %s; %d %s skipped",
                    job_id, self._local(started), took,
                    skipped, "tick was" if skipped == 1 else "ticks were",
                )  # fmt: skip

    def _on_max_instances(self, event: Any) -> None:
        """A tick came while the job's previous run still runs (or waits for the one
        thread syncs run on): said once per overrun, not at every tick."""
        job_id = event.job_id
        with self._idle:
            first = job_id not in self._ticks_skipped
            self._ticks_skipped[job_id] = self._ticks_skipped.get(job_id, 0) + 1
            started = self._job_started.get(job_id)
            others = sorted(k for k in self._job_started if k not in (job_id, HEARTBEAT_JOB))
        if not first:
            return
        if started is not None:
            doing = "running" if job_id == HEARTBEAT_JOB else "syncing"
            log.warning(
                "%s: still %s since %s; ticks are skipped until it ends",
                job_id, doing, self._local(started),
            )  # fmt: skip
        else:
            behind = f"the sync of {', '.join(others)}" if others else "the running sync"
            log.warning(
                "%s: waiting for %s to end; ticks are skipped until it has run", job_id, behind
            )

    def _local(self, moment: datetime) -> str:
        """``moment`` as a time of day in ``daemon.timezone``, as people read schedules."""
        return moment.astimezone(ZoneInfo(self._settings.daemon.timezone)).strftime("%H:%M:%S")

    def _sync_and_report(self, keys: list[str]) -> list[RunResult]:
        with self._idle:
            if self._stop.is_set():
                return []
            self._active += 1
        self.progress = SyncProgress(self._touch, ProgressLog())  # counts start from zero
        self._touch()
        try:
            return self._sync_logged(keys)
        finally:
            self._touch()
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the daemon is healthy, with details for ``/healthz`` (see ``health.assess``).

        Answered from what the daemon keeps: the state database is never asked here (the
        daemon's own check does, see :meth:`check_state`), so a database that stopped
        answering never holds a probe."""
        config = self._settings.daemon
        with self._idle:
            busy, running = self._active > 0, list(self._running)
        keys = sorted(self.jobs())
        recent, unanswered_since = self._state.seen() if self._state else (None, None)
        return assess(
            Signs(
                now=self._clock(),
                tick_at=self._tick_at,
                progress_at=self._progress_at if busy else None,
                running=running,
                keys=keys,
                recent=recent,
                unanswered_since=unanswered_since,
            ),
            stall_seconds=config.health_stall_seconds,
            failed_runs=config.health_failed_runs,
        )

    def check_state(self) -> None:
        """Check the state database once, in this thread, for ``/healthz`` (serving, the
        daemon does so every ``health.STATE_CHECK_SECONDS`` from a thread of its own)."""
        if self._state is not None:
            self._state.check()

    def _read_recent(self) -> dict[str, list[str]]:
        assert self._recent_statuses is not None
        keys = sorted(self.jobs())
        return self._recent_statuses(keys, self._settings.daemon.health_failed_runs)

    def _touch(self) -> None:
        self._progress_at = self._clock()

    def _tick(self) -> None:
        with self._job_running(HEARTBEAT_JOB):
            self._tick_at = self._clock()
            self._write_heartbeat()

    def _sync_logged(self, keys: list[str]) -> list[RunResult]:
        """Call ``sync``, then log a line per run, refresh the heartbeat and call ``on_results``."""
        settings = self._settings
        started = self._clock()
        with self._idle:
            self._running.extend(keys)
        raised = False
        try:
            results = self._sync(settings, keys, self._stop)
        except Exception as exc:
            # One failing audience (or a state database outage) must never kill the daemon,
            # nor fill its log: one line per failed tick, the traceback with -v.
            log.error("sync of %s failed: %s", ", ".join(keys), _one_line(exc), exc_info=_verbose())
            raised = True
            names = {a.property_key: a.name for a in settings.computations}
            error = describe_error(exc)  # its first line: the heartbeat file and alerts show it
            results = [RunResult(k, names.get(k, k), "run", "failed", error=error) for k in keys]
        finally:
            with self._idle:
                for key in keys:
                    self._running.remove(key)
        finished = self._clock()
        seconds = (finished - started).total_seconds()
        for r in results:
            if r.status == "skipped":
                # Another worker holds it: said once per holder, not at every tick.
                if self._skipped.get(r.audience_key) != r.error:
                    self._skipped[r.audience_key] = r.error
                    log.info("%s: skipped, %s", r.audience_key, r.error)
                continue
            self._skipped.pop(r.audience_key, None)
            if raised:
                continue  # the error line above said it
            log.info(
                "%s %s: %s entered=%d exited=%d resent=%d delivered=%d failed=%d rejected=%d"
                " in %.1fs%s",
                r.kind, r.audience_key, r.status, r.entered, r.exited, r.resent, r.delivered,
                r.failed, r.rejected, seconds, f" ({r.error})" if r.error else "",
            )  # fmt: skip
        with self._lock:
            self._last_results.update((r.audience_key, (r, finished)) for r in results)
        self._write_heartbeat()
        try:
            self._on_results(results)
        except Exception as exc:
            log.error("the on_results hook failed: %s", _one_line(exc), exc_info=_verbose())
        return results

    def _write_heartbeat(self) -> None:
        """Rewrite the heartbeat file (if configured) for a supervisor to watch."""
        with self._lock:
            with self._idle:
                running = list(self._running)
            self._heartbeat.write(
                {
                    "pid": os.getpid(),
                    "updated_at": _iso(self._clock()),
                    "running": running,
                    "last_results": [
                        {**asdict(result), "finished_at": _iso(at)}
                        for result, at in self._last_results.values()
                    ],
                }
            )

    def _load_starts(self) -> dict[str, datetime]:
        return {
            key: start.replace(tzinfo=UTC) if start.tzinfo is None else start
            for key, start in self._last_starts().items()
        }

    def _on_started(self, _event: Any) -> None:
        if self._stop.is_set():  # request_stop() came while the scheduler was starting
            self._shutdown()

    def _shutdown(self) -> None:
        with suppress(SchedulerNotRunningError):
            self._scheduler.shutdown(wait=False)


def _verbose() -> bool:
    """Whether ``-v`` was given (the package logs INFO): then failures carry a traceback."""
    return logging.getLogger("audience_sync").isEnabledFor(logging.INFO)


def _one_line(exc: BaseException) -> str:
    """What went wrong in one line: our own errors say it themselves; a database error by
    its first line (never SQL or parameters); anything else by its type and first line."""
    if isinstance(exc, AudienceSyncError):
        return str(exc)
    if isinstance(exc, SQLAlchemyError):
        return f"the state database: {describe_error(exc)}"
    return f"unexpected {describe_error(exc)}" + ("" if _verbose() else " (-v shows the traceback)")


def _check_scheduled(settings: Settings) -> None:
    if not any(_spec(a, "") is not None for a in settings.computations):
        raise ConfigError(
            f"{settings.path}: no audience or trait has a `schedule` or `every`, so the "
            "daemon would have nothing to run; add one, or use `audience-sync run` from cron"
        )


def _restart_keys_changed(old: Settings, new: Settings) -> list[str]:
    values = {
        "state.url": (old.state.url, new.state.url),
        "daemon.metrics_host": (old.daemon.metrics_host, new.daemon.metrics_host),
        "daemon.metrics_port": (old.daemon.metrics_port, new.daemon.metrics_port),
    }
    return [key for key in RESTART_KEYS if values[key][0] != values[key][1]]


def _spec(audience: Computation, tz: str) -> _Spec | None:
    if audience.schedule is not None:
        return (f"cron {audience.schedule}", tz)
    if audience.every is not None:
        return ("every", str(parse_duration(audience.every)))  # "60m" and "1h" are one spec
    return None


def _trigger(audience: Computation, tz: str, last: datetime | None) -> Any:
    if audience.schedule is not None:
        return cron_trigger(audience.schedule, ZoneInfo(tz))
    interval = timedelta(seconds=parse_duration(audience.every or "") or 0)
    # Anchored on the last run, so a restart keeps the cadence rather than waiting a full
    # interval from the restart.
    start = last + interval if last is not None else None
    return IntervalTrigger(seconds=interval.total_seconds(), start_date=start, timezone=UTC)


def _is_due(trigger: Any, last: datetime | None, now: datetime, grace: int | None = None) -> bool:
    """Never run, or a fire time after ``last`` has passed (with ``grace``: the newest such
    fire time is at most ``grace`` seconds old)."""
    if last is None:
        return True
    earliest = now - timedelta(seconds=grace) if grace is not None else None
    fire: datetime | None
    if earliest is None or earliest <= last:
        fire = trigger.get_next_fire_time(last, last)  # strictly after `last`
    else:
        # Is there a fire time in [now - grace, now]? Older misses do not count: the
        # newest one decides, so a long outage still runs once if its last miss is recent.
        fire = trigger.get_next_fire_time(None, earliest)
    return fire is not None and fire <= now


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
