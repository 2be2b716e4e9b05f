"""The daemon's scheduling, due-ness, reload, stop and heartbeat, driven by an injected clock."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.events import EVENT_SCHEDULER_STARTED
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.exc import OperationalError

from audience_sync.config import Settings, load_settings
from audience_sync.cron import CronSchedule
from audience_sync.errors import ConfigError
from audience_sync.scheduler import Daemon
from audience_sync.sync import RunResult

ENV = {"GIST_API_KEY": "test-key"}
T0 = datetime(2024, 5, 1, 10, 0, 5, tzinfo=UTC)  # a Wednesday
WAIT = 5.0  # upper bound for events that normally come within milliseconds

NIGHTLY = {"name": "nightly", "schedule": "0 */2 * * *"}
VIP = {"name": "vip", "every": "30m"}
MANUAL = {"name": "manual"}
WEEKLY = {"name": "weekly", "schedule": "0 3 * * 1"}


class FakeClock:
    """A settable aware-UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeSync:
    """Records each call; every run succeeds after ``seconds`` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float = 1.5) -> None:
        self.clock = clock
        self.seconds = seconds
        self.calls: list[list[str]] = []
        self.error: Exception | None = None

    def __call__(self, settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        self.calls.append(list(keys))
        self.clock.now += timedelta(seconds=self.seconds)
        if self.error is not None:
            raise self.error
        return [
            RunResult(k, settings.audience(k).name, "run", "succeeded", 1, 9, 9, 3, 1, 4)
            for k in keys
        ]


class Harness:
    """A config file in a folder, a fake clock, sync and last-start table for a Daemon."""

    def __init__(self, root: Path, audiences: list[dict[str, Any]], **daemon: Any) -> None:
        self.root = root
        self.config = root / "audience_sync.toml"
        self.clock = FakeClock(T0)
        self.sync = FakeSync(self.clock)
        self.starts: dict[str, datetime] = {}
        self.seen: list[list[RunResult]] = []
        self.write(audiences, **daemon)

    def write(self, audiences: list[dict[str, Any]], **daemon: Any) -> None:
        lines = ["[gist]", 'api_key = "${GIST_API_KEY}"', "[daemon]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in daemon.items()]
        for audience in audiences:
            (self.root / f"{audience['name']}.jsonl").touch()
            lines += ["[[audiences]]", f'file = "{audience["name"]}.jsonl"']
            lines += [f"{k} = {json.dumps(v)}" for k, v in audience.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def daemon(self, **options: Any) -> Daemon:
        options = {"clock": self.clock, "on_results": self.seen.append, **options}
        sync = options.pop("sync", self.sync)
        return Daemon(
            lambda: load_settings(self.config, ENV), sync, lambda: dict(self.starts), **options
        )


def naive(moment: datetime) -> datetime:
    """How the state database stores a start time: naive UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def serve_in_thread(daemon: Daemon) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.serve()), daemon=True)
    thread.start()
    return thread, codes


def test_scheduled_audiences_become_jobs_with_deliberate_options(tmp_path: Path) -> None:
    h = Harness(tmp_path, [NIGHTLY, VIP], timezone="Europe/Berlin", misfire_grace_seconds=120)
    daemon = h.daemon()
    jobs = daemon.jobs()
    assert set(jobs) == {"nightly", "vip"}
    berlin = ZoneInfo("Europe/Berlin")
    assert isinstance(jobs["nightly"], CronSchedule)
    assert str(jobs["nightly"].timezone) == "Europe/Berlin"
    after = datetime(2024, 5, 1, 10, 30, tzinfo=berlin)
    assert jobs["nightly"].get_next_fire_time(None, after) == datetime(
        2024, 5, 1, 12, tzinfo=berlin
    )
    assert isinstance(jobs["vip"], IntervalTrigger)
    assert jobs["vip"].interval == timedelta(minutes=30)
    assert str(daemon.scheduler.timezone) == "Europe/Berlin"
    for key in jobs:
        job = daemon.scheduler.get_job(key)
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 120)


def test_cron_schedules_default_to_utc(tmp_path: Path) -> None:
    daemon = Harness(tmp_path, [NIGHTLY]).daemon()
    assert str(daemon.jobs()["nightly"].timezone) == "UTC"
    assert daemon.scheduler.get_job("nightly").misfire_grace_time == 300


def test_unscheduled_audiences_are_skipped_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "audience_sync.scheduler")
    daemon = Harness(tmp_path, [NIGHTLY, MANUAL]).daemon()
    assert set(daemon.jobs()) == {"nightly"}
    assert daemon.due() == ["nightly"]
    notes = [m for m in caplog.messages if "not scheduled" in m]
    assert len(notes) == 1
    assert "manual" in notes[0]


@pytest.mark.parametrize(
    ("key", "last", "now", "expected"),
    [
        ("nightly", None, T0, True),
        ("nightly", T0, T0 + timedelta(minutes=30), False),
        ("nightly", T0.replace(second=0), T0 + timedelta(minutes=1), False),
        ("nightly", T0 - timedelta(hours=2), T0.replace(second=0), True),
        ("nightly", T0 - timedelta(hours=2), T0.replace(second=0) - timedelta(seconds=1), False),
        ("vip", None, T0, True),
        ("vip", T0, T0 + timedelta(minutes=29), False),
        ("vip", T0, T0 + timedelta(minutes=30), True),
        ("vip", T0 - timedelta(hours=4), T0, True),
    ],
    ids=[
        "cron-never-run",
        "cron-just-run",
        "cron-run-on-its-fire-time",
        "cron-overdue",
        "cron-a-second-early",
        "every-never-run",
        "every-just-run",
        "every-one-interval-later",
        "every-overdue",
    ],
)
def test_due(
    tmp_path: Path, key: str, last: datetime | None, now: datetime, expected: bool
) -> None:
    h = Harness(tmp_path, [NIGHTLY, VIP])
    if last is not None:
        h.starts[key] = naive(last)
    daemon = h.daemon()
    assert (key in daemon.due(now)) is expected
    h.clock.now = now
    assert (key in daemon.due()) is expected


def test_run_due_syncs_exactly_the_due_audiences_once_and_writes_the_heartbeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "audience_sync.scheduler")
    h = Harness(tmp_path, [NIGHTLY, VIP, MANUAL, WEEKLY], heartbeat_file="beat.json")
    h.starts["vip"] = naive(T0 - timedelta(minutes=10))
    h.starts["weekly"] = datetime(2024, 4, 22, 3, 0, 1)  # missed Monday 29 April
    daemon = h.daemon()

    results = daemon.run_due()

    assert h.sync.calls == [["nightly", "weekly"]]
    assert [r.audience_key for r in results] == ["nightly", "weekly"]
    assert h.seen == [results]
    assert (
        "run nightly: succeeded entered=3 exited=1 resent=0 delivered=4 failed=0 rejected=0 "
        "in 1.5s" in caplog.messages
    )
    beat = json.loads((tmp_path / "beat.json").read_text())
    assert beat["pid"] == os.getpid()
    assert beat["updated_at"] == "2024-05-01T10:00:06Z"
    assert beat["running"] == []
    assert [(r["audience_key"], r["status"]) for r in beat["last_results"]] == [
        ("nightly", "succeeded"),
        ("weekly", "succeeded"),
    ]
    assert [p.name for p in tmp_path.iterdir() if "beat" in p.name] == ["beat.json"]


def test_run_due_with_nothing_due_does_not_sync(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP, MANUAL])
    h.starts["vip"] = naive(T0 - timedelta(minutes=1))
    assert h.daemon().run_due() == []
    assert h.sync.calls == []


def test_a_failing_sync_is_logged_recorded_and_does_not_propagate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, [NIGHTLY], heartbeat_file="beat.json")
    h.sync.error = RuntimeError("state database is down")
    daemon = h.daemon()

    results = daemon.run_due()

    assert [(r.status, r.error) for r in results] == [
        ("failed", "RuntimeError: state database is down")
    ]
    assert h.seen == [results]
    assert any(r.levelno == logging.ERROR and "nightly" in r.message for r in caplog.records)
    beat = json.loads((tmp_path / "beat.json").read_text())
    assert beat["last_results"][0]["status"] == "failed"


def test_a_failing_on_results_hook_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(results: list[RunResult]) -> None:
        raise ValueError("webhook exploded")

    h = Harness(tmp_path, [NIGHTLY])
    results = h.daemon(on_results=hook).run_due()
    assert [r.status for r in results] == ["succeeded"]
    assert any("on_results" in r.message for r in caplog.records)


def test_reload_adds_removes_and_reschedules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "audience_sync.scheduler")
    h = Harness(tmp_path, [NIGHTLY, VIP, MANUAL, WEEKLY])
    daemon = h.daemon()
    before = daemon.jobs()
    changed = {"name": "nightly", "schedule": "30 1 * * *"}
    added = {"name": "fresh", "every": "5m"}
    h.write([changed, VIP, {**MANUAL, "every": "1h"}, added], misfire_grace_seconds=60)

    daemon.reload()

    jobs = daemon.jobs()
    assert set(jobs) == {"nightly", "vip", "manual", "fresh"}
    assert jobs["vip"] is before["vip"]  # an unchanged trigger is left alone
    midnight = datetime(2024, 5, 1, tzinfo=UTC)
    assert jobs["nightly"].get_next_fire_time(None, midnight) == midnight.replace(hour=1, minute=30)
    assert jobs["fresh"].interval == timedelta(minutes=5)
    assert daemon.scheduler.get_job("vip").misfire_grace_time == 60
    assert [a.property_key for a in daemon.settings.audiences] == [
        "nightly", "vip", "manual", "fresh",
    ]  # fmt: skip
    assert "config reloaded: added manual, fresh; removed weekly; rescheduled nightly" in (
        caplog.messages
    )


@pytest.mark.parametrize(
    "broken",
    ["[[audiences]\n", '[gist]\napi_key = "k"\n[[audiences]]\nname = "x"\n', None],
    ids=["invalid-toml", "invalid-audience", "file-gone"],
)
def test_reload_keeps_the_old_config_when_the_new_one_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | None
) -> None:
    h = Harness(tmp_path, [NIGHTLY, VIP])
    daemon = h.daemon()
    before, settings = daemon.jobs(), daemon.settings
    if broken is None:
        h.config.unlink()
    else:
        h.config.write_text(broken)

    daemon.reload()

    assert daemon.jobs() == before
    assert daemon.settings is settings
    assert any("keeping the previous config" in r.message for r in caplog.records)


def test_serve_returns_0_after_request_stop_and_stops_the_running_sync(tmp_path: Path) -> None:
    started = threading.Event()
    saw_stop: list[bool] = []

    def slow_sync(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        started.set()
        saw_stop.append(stop.wait(WAIT))
        return [RunResult(k, k, "run", "interrupted") for k in keys]

    h = Harness(tmp_path, [VIP], heartbeat_file="beat.json")
    daemon = h.daemon(sync=slow_sync, clock=lambda: datetime.now(UTC))
    thread, codes = serve_in_thread(daemon)
    assert started.wait(WAIT), "the never-run audience should run as soon as the daemon starts"

    daemon.request_stop()
    thread.join(WAIT)

    assert not thread.is_alive()
    assert codes == [0]
    assert saw_stop == [True]
    beat = json.loads((tmp_path / "beat.json").read_text())
    assert [r["status"] for r in beat["last_results"]] == ["interrupted"]


def test_request_stop_before_serve_returns_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP])
    daemon = h.daemon()
    daemon.request_stop()
    thread, codes = serve_in_thread(daemon)
    thread.join(WAIT)
    assert codes == [0]
    assert h.sync.calls == []


def test_serve_catches_up_only_misses_within_the_grace_time(tmp_path: Path) -> None:
    hour = {"every": "1h"}
    names = ("fresh", "late", "stale", "recent", "down")
    h = Harness(tmp_path, [{"name": n, **hour} for n in names], misfire_grace_seconds=300)
    now = datetime.now(UTC)
    h.starts["late"] = naive(now - timedelta(hours=1, seconds=60))  # missed by 1 min
    h.starts["stale"] = naive(now - timedelta(hours=1, minutes=10))  # missed by 10 min
    h.starts["recent"] = naive(now - timedelta(minutes=10))
    # Down for three hours: the oldest miss is 2 h old, the newest only 2 min.
    h.starts["down"] = naive(now - timedelta(hours=3, minutes=2))
    calls: list[str] = []
    both = threading.Event()

    def sync(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        calls.extend(keys)
        if {"fresh", "late", "down"} <= set(calls):
            both.set()
        return [RunResult(k, k, "run", "succeeded") for k in keys]

    daemon = h.daemon(sync=sync, clock=lambda: datetime.now(UTC))
    thread, codes = serve_in_thread(daemon)
    try:
        assert both.wait(WAIT)
        for key in ("stale", "recent"):
            assert daemon.scheduler.get_job(key).next_run_time > now + timedelta(minutes=49)
    finally:
        daemon.request_stop()
        thread.join(WAIT)
    assert sorted(calls) == ["down", "fresh", "late"]
    assert codes == [0]


def test_reload_while_serving_runs_a_new_audience_and_reschedules(tmp_path: Path) -> None:
    ran = threading.Event()

    def sync(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        if keys == ["fresh"]:
            ran.set()
        return [RunResult(k, k, "run", "succeeded") for k in keys]

    h = Harness(tmp_path, [VIP])
    h.starts["vip"] = naive(datetime.now(UTC))
    daemon = h.daemon(sync=sync, clock=lambda: datetime.now(UTC))
    started = threading.Event()
    daemon.scheduler.add_listener(lambda _event: started.set(), EVENT_SCHEDULER_STARTED)
    thread, codes = serve_in_thread(daemon)
    try:
        assert started.wait(WAIT)
        h.write([{**VIP, "every": "2h"}, {"name": "fresh", "every": "1d"}])
        daemon.reload()
        assert ran.wait(WAIT)
        assert daemon.jobs()["vip"].interval == timedelta(hours=2)
    finally:
        daemon.request_stop()
        thread.join(WAIT)
    assert codes == [0]


def test_reload_from_the_scheduler_thread_is_applied(tmp_path: Path) -> None:
    """A SIGHUP handler runs in the thread serving the scheduler; reload must still apply."""
    ran = threading.Event()

    def sync(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        if keys == ["fresh"]:
            ran.set()
        return [RunResult(k, k, "run", "succeeded") for k in keys]

    h = Harness(tmp_path, [VIP])
    h.starts["vip"] = naive(datetime.now(UTC))
    daemon = h.daemon(sync=sync, clock=lambda: datetime.now(UTC))
    h.write([VIP, {"name": "fresh", "every": "1d"}])
    daemon.scheduler.add_listener(lambda _event: daemon.reload(), EVENT_SCHEDULER_STARTED)
    thread, codes = serve_in_thread(daemon)
    try:
        assert ran.wait(WAIT)
    finally:
        daemon.request_stop()
        thread.join(WAIT)
    assert codes == [0]


def fire_days(trigger: Any, start: datetime, days: int) -> list[str]:
    found: list[str] = []
    previous, now = None, start
    while True:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= start + timedelta(days=days):
            return found
        found.append(fire.strftime("%a"))
        previous = now = fire


@pytest.mark.parametrize(
    ("schedule", "days"),
    [
        ("0 9 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 9 * * 0", ["Sun"]),
        ("0 9 * * 7", ["Sun"]),
        ("0 9 * * sat,sun", ["Sat", "Sun"]),
    ],
    ids=["weekdays", "sunday-as-0", "sunday-as-7", "weekend-by-name"],
)
def test_daemon_jobs_fire_on_the_days_crontab_means(
    tmp_path: Path, schedule: str, days: list[str]
) -> None:
    h = Harness(tmp_path, [{"name": "job", "schedule": schedule}])
    trigger = h.daemon().jobs()["job"]
    assert fire_days(trigger, datetime(2024, 4, 29, tzinfo=UTC), 7) == days  # from a Monday


def test_start_up_runs_once_when_the_newest_missed_fire_is_within_the_grace(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, [{"name": "hourly", "every": "1h"}], misfire_grace_seconds=300)
    h.starts["hourly"] = naive(T0 - timedelta(hours=3, minutes=2))  # newest miss: 2 min ago
    assert h.daemon().missed() == ["hourly"]
    h.starts["hourly"] = naive(T0 - timedelta(hours=3, minutes=6))  # newest miss: 6 min ago
    assert h.daemon().missed() == []
    h.starts["hourly"] = naive(T0 - timedelta(minutes=59))  # nothing missed yet
    assert h.daemon().missed() == []


def test_start_up_catch_up_for_cron_looks_at_the_newest_missed_fire(tmp_path: Path) -> None:
    h = Harness(tmp_path, [NIGHTLY], misfire_grace_seconds=300)  # every 2 hours on the hour
    h.clock.now = datetime(2024, 5, 1, 10, 3, tzinfo=UTC)
    h.starts["nightly"] = naive(datetime(2024, 5, 1, 4, 0, 2, tzinfo=UTC))  # missed 6, 8, 10
    assert h.daemon().missed() == ["nightly"]
    h.clock.now = datetime(2024, 5, 1, 10, 6, tzinfo=UTC)
    assert h.daemon().missed() == []


class OnceEveryFiveMinutes:
    """``daemon --once`` from cron every 5 minutes through a night, on a fake clock."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.runs: list[datetime] = []

        def sync(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
            self.runs.append(h.clock.now)
            for key in keys:
                h.starts[key] = naive(h.clock.now)
            return [RunResult(k, k, "run", "succeeded") for k in keys]

        self.sync = sync

    def night(self, start: datetime, hours: int) -> list[str]:
        self.h.starts["nightly"] = naive(start - timedelta(hours=12))
        self.h.clock.now = start
        while self.h.clock.now < start + timedelta(hours=hours):
            self.h.daemon(sync=self.sync).run_due()
            self.h.clock.now += timedelta(minutes=5)
        return [r.astimezone(ZoneInfo("Europe/Berlin")).strftime("%d %H:%M") for r in self.runs]


def test_once_runs_a_daily_job_once_when_clocks_go_back(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "nightly", "schedule": "0 2 * * *"}], timezone="Europe/Berlin")
    cron = OnceEveryFiveMinutes(h)
    # 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:00 local comes twice.
    runs = cron.night(datetime(2026, 10, 24, 22, 0, tzinfo=UTC), hours=6)
    assert runs == ["25 02:00"]


def test_once_runs_a_daily_job_once_when_clocks_go_forward(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "nightly", "schedule": "0 2 * * *"}], timezone="Europe/Berlin")
    cron = OnceEveryFiveMinutes(h)
    # 2026-03-29: 02:00 CET becomes 03:00 CEST, so 02:00 local never comes.
    runs = cron.night(datetime(2026, 3, 28, 22, 0, tzinfo=UTC), hours=6)
    assert runs == ["29 03:00"]


def test_a_daemon_with_nothing_scheduled_is_a_config_error(tmp_path: Path) -> None:
    h = Harness(tmp_path, [MANUAL])
    with pytest.raises(ConfigError, match="no audience or trait has a `schedule` or `every`"):
        h.daemon()


def test_reload_that_schedules_nothing_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, [VIP])
    daemon = h.daemon()
    h.write([MANUAL])
    daemon.reload()
    assert set(daemon.jobs()) == {"vip"}
    assert "keeping the previous config" in caplog.text


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("state", "url", "sqlite:///elsewhere.db"),
        ("daemon", "metrics_port", 9999),
        ("daemon", "metrics_host", "127.0.0.2"),
    ],
    ids=["state-url", "metrics-port", "metrics-host"],
)
def test_reload_refuses_keys_that_need_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, section: str, key: str, value: Any
) -> None:
    h = Harness(tmp_path, [VIP])
    daemon = h.daemon()
    before = daemon.settings
    h.write([VIP, {"name": "fresh", "every": "5m"}])
    text = h.config.read_text()
    lines = text.replace("[daemon]\n", "")
    h.config.write_text(f"[{section}]\n{key} = {json.dumps(value)}\n" + lines)

    daemon.reload()

    assert daemon.settings is before
    assert set(daemon.jobs()) == {"vip"}  # nothing of the new config was applied
    [refusal] = [r.message for r in caplog.records if "reload refused" in r.message]
    assert f"{section}.{key} changed" in refusal
    assert "restart" in refusal


def test_reload_moves_the_heartbeat_file(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP], heartbeat_file="old.json")
    daemon = h.daemon()
    daemon.run_due()
    assert (tmp_path / "old.json").exists()
    h.write([VIP], heartbeat_file="new.json")

    daemon.reload()
    h.clock.now += timedelta(hours=1)
    daemon.run_due()

    assert not (tmp_path / "old.json").exists()
    assert json.loads((tmp_path / "new.json").read_text())["updated_at"] == "2024-05-01T11:00:08Z"


class Statuses:
    """An injectable ``recent_statuses`` over a dict, or raising like a database that is down."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[str]] = {}
        self.down = False

    def __call__(self, keys: list[str], n: int) -> dict[str, list[str]]:
        if self.down:
            raise OSError("connection refused")
        return {k: self.by_key.get(k, [])[:n] for k in keys}


def test_healthz_ok_while_the_daemon_works(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP, NIGHTLY])
    statuses = Statuses()
    statuses.by_key = {"vip": ["failed"] * 3, "nightly": ["succeeded", "failed", "failed"]}
    daemon = h.daemon(recent_statuses=statuses)
    daemon.check_state()
    healthy, info = daemon.health()
    assert healthy, info
    assert info["status"] == "ok"
    assert info["audiences"] == ["nightly", "vip"]


def test_healthz_fails_when_the_last_runs_of_every_audience_failed(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP, NIGHTLY], health_failed_runs=3)
    statuses = Statuses()
    statuses.by_key = {"vip": ["failed", "partial", "guarded"], "nightly": ["failed"] * 5}
    daemon = h.daemon(recent_statuses=statuses)
    assert daemon.health()[0]  # nothing checked yet: nothing known against it
    daemon.check_state()
    healthy, info = daemon.health()
    assert not healthy
    assert info["reasons"] == ["the last 3 runs of every audience failed"]
    statuses.by_key["vip"] = ["failed", "failed"]  # too few runs to tell
    daemon.check_state()
    assert daemon.health()[0]


def test_healthz_fails_when_the_state_database_cannot_be_reached(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP])
    statuses = Statuses()
    daemon = h.daemon(recent_statuses=statuses)
    statuses.down = True
    daemon.check_state()
    healthy, info = daemon.health()
    assert not healthy
    assert info["reasons"] == ["the state database cannot be reached: OSError: connection refused"]
    statuses.down = False
    daemon.check_state()
    assert daemon.health()[0]


def test_healthz_fails_when_the_sync_thread_makes_no_progress(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP], health_stall_seconds=600)
    in_sync = threading.Event()
    release = threading.Event()
    holder: list[Daemon] = []

    def stuck(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        holder[0].progress.loaded(keys[0], 5000)  # read some rows, then hang
        in_sync.set()
        release.wait(WAIT)
        return [RunResult(k, k, "run", "succeeded") for k in keys]

    daemon = h.daemon(sync=stuck, recent_statuses=Statuses())
    holder.append(daemon)
    thread = threading.Thread(target=daemon.run_due)
    thread.start()
    try:
        assert in_sync.wait(WAIT)
        h.clock.now += timedelta(seconds=599)
        assert daemon.health()[0]  # a long sync is not a stall
        h.clock.now += timedelta(seconds=2)
        healthy, info = daemon.health()
        assert not healthy
        assert info["reasons"] == [
            "the scheduler thread has made no progress for 601s (syncing vip)"
        ]
        assert info["running"] == ["vip"]
    finally:
        release.set()
        thread.join(WAIT)
    assert daemon.health()[0]  # the sync ended: the thread is free again


def test_healthz_fails_when_the_scheduler_loop_stops_ticking(tmp_path: Path) -> None:
    h = Harness(tmp_path, [VIP], health_stall_seconds=600)
    h.starts["vip"] = naive(T0)  # not due: the daemon just idles
    daemon = h.daemon(recent_statuses=Statuses())
    started = threading.Event()
    daemon.scheduler.add_listener(lambda _event: started.set(), EVENT_SCHEDULER_STARTED)
    thread, codes = serve_in_thread(daemon)
    try:
        assert started.wait(WAIT)
        assert daemon.health()[0]
        h.clock.now += timedelta(seconds=1000)  # no heartbeat job ran in 1000 s
        healthy, info = daemon.health()
        assert not healthy
        assert info["reasons"] == ["the scheduler loop has not ticked for 1000s"]
    finally:
        daemon.request_stop()
        thread.join(WAIT)
    assert codes == [0]


def test_healthz_answers_from_the_last_check_and_never_waits_on_the_database(
    tmp_path: Path,
) -> None:
    """A state database that stopped answering (a partition) held every /healthz request
    inside its query for ever; now the daemon's own check waits, and the answer says so."""
    h = Harness(tmp_path, [VIP])
    answer = threading.Event()
    asked = threading.Event()

    def silent(keys: list[str], n: int) -> dict[str, list[str]]:
        asked.set()
        answer.wait(WAIT)
        return {k: [] for k in keys}

    daemon = h.daemon(recent_statuses=silent)
    checking = threading.Thread(target=daemon.check_state)
    checking.start()
    try:
        assert asked.wait(WAIT)
        began = time.monotonic()
        assert daemon.health()[0]  # within its patience: no verdict yet
        h.clock.now += timedelta(seconds=11)
        healthy, info = daemon.health()
        assert time.monotonic() - began < 1  # answered at once, the check still waiting
        assert not healthy
        assert info["reasons"] == ["the state database has not answered for 11s"]
    finally:
        answer.set()
        checking.join(WAIT)
    assert daemon.health()[0]  # it answered: healthy again


def test_an_overrunning_sync_is_said_once_when_it_overruns_and_once_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """APScheduler logged a WARNING at every tick a sync overran (1,008 of 3,535 lines)."""
    caplog.set_level(logging.INFO)
    h = Harness(tmp_path, [{"name": "vip", "every": "1s"}, {"name": "fast", "every": "1s"}])
    release = threading.Event()
    calls: list[str] = []

    def slow_vip(settings: Settings, keys: list[str], stop: threading.Event) -> Any:
        calls.extend(keys)
        if keys == ["vip"] and calls.count("vip") == 1:
            release.wait(WAIT)  # the first vip run outlasts several ticks
        return [RunResult(k, k, "run", "succeeded") for k in keys]

    daemon = h.daemon(sync=slow_vip, clock=lambda: datetime.now(UTC))
    thread, codes = serve_in_thread(daemon)
    try:
        deadline = time.monotonic() + WAIT
        while sum("ticks are skipped" in m for m in caplog.messages) < 2:
            assert time.monotonic() < deadline, caplog.messages
            time.sleep(0.05)
        time.sleep(2.5)  # more ticks come and go, unsaid
        release.set()
        while not any("ended after" in m for m in caplog.messages):
            assert time.monotonic() < deadline + WAIT, caplog.messages
            time.sleep(0.05)
    finally:
        release.set()
        daemon.request_stop()
        thread.join(WAIT)
    assert codes == [0]
    overran = [m for m in caplog.messages if m.startswith("vip: still syncing since ")]
    assert len(overran) == 1, caplog.messages
    assert overran[0].endswith("; ticks are skipped until it ends")
    waiting = [m for m in caplog.messages if m.startswith("fast: waiting for the sync of vip")]
    assert len(waiting) == 1, caplog.messages
    ended = [m for m in caplog.messages if m.startswith("vip: the run that began at ")]
    assert len(ended) == 1, caplog.messages
    assert "ticks were skipped" in ended[0]
    assert not any("maximum number of running instances" in m for m in caplog.messages)


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_tick_failing_on_the_state_database_is_one_line_with_the_traceback_at_v(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, verbose: bool
) -> None:
    """A state database outage logged a full traceback at every tick (21 in 20 s)."""
    caplog.set_level(logging.INFO if verbose else logging.WARNING)
    caplog.set_level(logging.INFO, "audience_sync.scheduler")  # as the daemon command does
    h = Harness(tmp_path, [NIGHTLY])
    h.sync.error = OperationalError(
        "SELECT email FROM memberships WHERE user_id = %(u)s", {"u": "secret@example.com"},
        Exception("connection failed: server closed the connection unexpectedly\nDETAIL: x"),
    )  # fmt: skip
    daemon = h.daemon()

    for _ in range(3):
        daemon.run_due()

    lines = [r for r in caplog.records if r.name == "audience_sync.scheduler"]
    assert [r.getMessage() for r in lines] == [
        "sync of nightly failed: the state database: Exception: connection failed: server "
        "closed the connection unexpectedly"
    ] * 3
    assert all(bool(r.exc_info) is verbose for r in lines)
    assert h.seen[0][0].error == (
        "Exception: connection failed: server closed the connection unexpectedly"
    )
