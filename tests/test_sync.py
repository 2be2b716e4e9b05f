"""The sync engine end to end: sources → state DB → the loopback fake Gist → history."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, inspect, select

from audience_sync import delivery, lease
from audience_sync.fakegist import FakeGist
from audience_sync.models import (
    member_changes,
    memberships,
    rejected_rows,
    sync_runs,
    uncertain_members,
)
from audience_sync.rows import Batch, SourceRow, check_chunks, encode_value
from audience_sync.runs import open_run, utcnow
from audience_sync.stage import Staging, analyze_state
from audience_sync.statuses import RunStatus
from audience_sync.sync import RunResult, exit_code, run_once
from tests.conftest import Workspace, plant_lease, write_members
from tests.helpers import KEY, acknowledged, in_gist, users


def sync(workspace: Workspace, engine: Engine, **options: Any) -> list[RunResult]:
    return run_once(workspace.settings(), engine, **options)


def test_first_run_sends_every_member_then_only_changes(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))

    [first] = sync(workspace, engine)
    assert (first.status, first.entered, first.exited, first.delivered) == ("succeeded", 10, 0, 10)
    assert len(gist.requests("/contacts")) == 10
    body = gist.requests("/contacts")[0].body
    assert set(body) == {"user_id", "email", "custom_properties"}
    assert body["custom_properties"] == {KEY: True}

    gist.clear_log()
    [unchanged] = sync(workspace, engine)
    assert (unchanged.status, unchanged.entered, unchanged.exited) == ("succeeded", 0, 0)
    assert gist.requests() == []

    write_members(source, [*range(2, 10), 10, 11])  # u0, u1 leave; u10, u11 join
    [changed] = sync(workspace, engine)
    assert (changed.entered, changed.exited, changed.delivered) == (2, 2, 4)
    sent = {r.body["user_id"]: r.body["custom_properties"][KEY] for r in gist.requests()}
    assert sent == {"u0": False, "u1": False, "u10": True, "u11": True}
    assert acknowledged(engine) == in_gist(gist) == users(*range(2, 12))


def test_user_changed_in_several_audiences_gets_one_request(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    vip = workspace.add_file_audience("VIP Customers")
    news = workspace.add_file_audience("Newsletter Signups")
    write_members(vip, [1, 2])
    write_members(news, [2, 3])

    results = sync(workspace, engine)

    assert [r.status for r in results] == ["succeeded", "succeeded"]
    bodies = {r.body["user_id"]: r.body["custom_properties"] for r in gist.requests()}
    assert len(gist.requests()) == 3
    assert bodies["u2"] == {"vip_customers": True, "newsletter_signups": True}
    gist.clear_log()
    write_members(vip, [1])
    write_members(news, [3])
    sync(workspace, engine)
    [request] = gist.requests()
    assert request.body["custom_properties"] == {
        "vip_customers": False,
        "newsletter_signups": False,
    }


@pytest.mark.parametrize("page_rows", [1, 2, 3])
def test_pages_hold_a_users_changes_together_however_small(
    workspace: Workspace, engine: Engine, gist: FakeGist, page_rows: int, monkeypatch: Any
) -> None:
    """Delivery reads pending changes a page at a time, grouped by user, one page ahead of
    what it sends. Before: a page filled by one user's changes left that user's others
    behind (they stayed pending, unsent, in a run that succeeded)."""
    monkeypatch.setattr(delivery, "PAGE_ROWS", page_rows)
    sources = [workspace.add_file_audience(name) for name in ("VIP", "Newsletter", "Churned")]
    for source in sources:
        write_members(source, range(5))

    results = sync(workspace, engine)

    assert [(r.status, r.delivered) for r in results] == [("succeeded", 5)] * 3
    assert len(gist.requests("/contacts")) == 5  # one request per user, all three values
    assert all(
        r.body["custom_properties"] == {"vip": True, "newsletter": True, "churned": True}
        for r in gist.requests("/contacts")
    )
    with engine.connect() as connection:
        open_changes = connection.scalar(
            select(func.count()).where(member_changes.c.status == "pending")
        )
    assert open_changes == 0


def test_a_stop_leaves_a_page_read_ahead_as_gist_holds_it(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: Any
) -> None:
    """Gist refuses the key on the first request while the next page is already read and
    marked uncertain: that page's members are taken back (Gist holds what it held), so
    nothing is left uncertain and the next run sends exactly what is owed."""
    monkeypatch.setattr(delivery, "PAGE_ROWS", 2)
    workspace.gist_options["max_concurrency"] = 1
    workspace.write_config()
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(6))
    gist.fail_after(0, 401)

    [refused] = sync(workspace, engine)

    assert refused.status == "failed"
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(uncertain_members)) == 0
    gist.reset_faults()
    gist.clear_log()
    [fine] = sync(workspace, engine)
    assert (fine.status, fine.delivered) == ("succeeded", 6)
    assert acknowledged(engine) == in_gist(gist) == users(*range(6))


def test_failure_half_way_loses_nothing(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(40))
    gist.fail_after(15, 503)  # Gist goes down after 15 acknowledged updates

    [broken] = sync(workspace, engine)

    assert broken.status == "failed"
    assert "Gist unavailable" in (broken.error or "")
    # The invariant: memberships holds exactly what Gist acknowledged, nothing more.
    assert acknowledged(engine) == in_gist(gist)
    assert len(in_gist(gist)) == 15

    gist.reset_faults()
    [repaired] = sync(workspace, engine)

    assert repaired.status == "succeeded"
    assert repaired.entered == 25
    assert acknowledged(engine) == in_gist(gist) == users(*range(40))
    gist.clear_log()
    [idle] = sync(workspace, engine)
    assert (idle.entered, idle.exited, gist.requests()) == (0, 0, [])


def test_permanent_error_fails_that_member_only_and_is_retried_next_run(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(5))
    gist.fail_user("u3", 422, "Email is invalid")

    [partial] = sync(workspace, engine)

    assert (partial.status, partial.delivered, partial.failed) == ("partial", 4, 1)
    assert exit_code([partial]) == 1
    with engine.connect() as connection:
        change = connection.execute(
            select(member_changes).where(member_changes.c.status == "failed")
        ).one()
    assert (change.user_id, change.http_status) == ("u3", 422)
    assert "Email is invalid" in change.last_error
    assert change.attempts == 1  # a 4xx is not retried
    assert acknowledged(engine) == users(0, 1, 2, 4)

    gist.reset_faults()
    [retried] = sync(workspace, engine)
    assert (retried.status, retried.entered, retried.delivered) == ("succeeded", 1, 1)
    assert acknowledged(engine) == in_gist(gist) == users(*range(5))


@pytest.mark.parametrize("status", [401, 403], ids=["unauthorized", "forbidden"])
def test_auth_failure_stops_the_run_at_once(
    workspace: Workspace, engine: Engine, gist: FakeGist, status: int
) -> None:
    workspace.gist_options["max_concurrency"] = 1
    workspace.write_config()
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(30))
    gist.fail_after(5, status, message="Invalid API key")

    [run] = sync(workspace, engine)

    assert run.status == "failed"
    assert "API key" in (run.error or "")
    assert len(gist.requests()) == 6  # five acknowledged, one refused, then nothing
    assert (run.delivered, run.failed) == (5, 1)
    assert acknowledged(engine) == in_gist(gist)
    with engine.connect() as connection:
        by_status: dict[str, int] = dict(
            connection.execute(
                select(member_changes.c.status, func.count()).group_by(member_changes.c.status)
            ).all()
        )
        refused = connection.scalar(
            select(member_changes.c.http_status).where(member_changes.c.status == "failed")
        )
    assert by_status == {"delivered": 5, "failed": 1, "pending": 24}
    assert refused == status


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(lambda g: g.fail_next(2, 429, retry_after="0"), id="429-retry-after"),
        pytest.param(lambda g: g.fail_next(3, 503), id="503-burst"),
        pytest.param(lambda g: g.drop_next(2), id="dropped-connections"),
    ],
)
def test_transient_faults_are_retried(
    workspace: Workspace, engine: Engine, gist: FakeGist, fault: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(6))
    fault(gist)

    [run] = sync(workspace, engine)

    assert (run.status, run.delivered) == ("succeeded", 6)
    assert in_gist(gist) == acknowledged(engine) == users(*range(6))


def test_timeouts_are_retried(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    workspace.gist_options.update(timeout_seconds=0.2, max_retries=1)
    workspace.write_config()
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    gist.latency = 0.5

    [run] = sync(workspace, engine)

    assert run.status == "failed"
    assert "timed out" in (run.error or "")
    assert acknowledged(engine) == set()
    gist.latency = 0
    [again] = sync(workspace, engine)
    assert again.status == "succeeded"
    assert acknowledged(engine) == users(1)


def test_mass_exit_guard_stops_one_audience_and_not_the_others(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    big = workspace.add_file_audience("Order Completed Last 30days")
    other = workspace.add_file_audience("Newsletter Signups")
    write_members(big, range(120))
    write_members(other, [1])
    sync(workspace, engine)
    gist.clear_log()

    write_members(big, range(50))  # 70 of 120 would leave: 58% > 50%
    write_members(other, [1, 2])
    guarded, synced = sync(workspace, engine)

    assert guarded.status == "guarded"
    assert "--allow-mass-exit" in (guarded.error or "")
    assert synced.status == "succeeded"
    assert exit_code([guarded, synced]) == 1
    assert [r.body["user_id"] for r in gist.requests()] == ["u2"]
    assert len(acknowledged(engine)) == 120

    [allowed] = sync(workspace, engine, keys=[KEY], allow_mass_exit=True)
    assert (allowed.status, allowed.exited) == ("succeeded", 70)
    assert acknowledged(engine) == in_gist(gist) == users(*range(50))


def test_guard_threshold_is_configurable(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience(
        "Order Completed Last 30days", mass_exit_threshold=0.1, mass_exit_min_members=5
    )
    write_members(source, range(10))
    sync(workspace, engine)
    write_members(source, range(8))  # 20% > 10%
    [run] = sync(workspace, engine)
    assert run.status == "guarded"


def test_small_audience_may_shrink_but_not_empty_without_permission(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))
    sync(workspace, engine)
    write_members(source, [9])  # 90% leave, but the audience is under 100: no guard
    [shrunk] = sync(workspace, engine)
    assert (shrunk.status, shrunk.exited) == ("succeeded", 9)
    write_members(source, [])  # an empty source is guarded at any size
    [empty] = sync(workspace, engine)
    assert (empty.status, empty.exited) == ("guarded", 1)
    assert in_gist(gist) == users(9)
    [allowed] = sync(workspace, engine, allow_mass_exit=True)
    assert (allowed.status, allowed.exited) == ("succeeded", 1)
    assert in_gist(gist) == acknowledged(engine) == set()


def test_duplicates_collapse_and_bad_rows_are_recorded(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    rows: list[Any] = [1, 1, 2, ("u2", "second@example.com"), 3]
    rows += [("", "x@example.com"), ("u9", None), ("u8", "nope"), (None, None)]
    write_members(source, rows)

    [run] = sync(workspace, engine)

    assert (run.source_rows, run.members, run.rejected, run.delivered) == (9, 3, 4, 3)
    assert run.status == "succeeded"
    assert gist.contacts()["u2"]["email"] == "u2@example.com"  # the first row wins
    with engine.connect() as connection:
        reasons = dict(
            connection.execute(select(rejected_rows.c.row_number, rejected_rows.c.reason)).all()
        )
    assert reasons == {
        6: "missing user_id",
        7: "missing email",
        8: "invalid email",
        9: "missing user_id",
    }


def test_dry_run_sends_and_records_nothing_acknowledged(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    [run] = sync(workspace, engine, dry_run=True)
    assert (run.kind, run.status, run.entered) == ("dry-run", "succeeded", 3)
    assert gist.requests() == []
    assert acknowledged(engine) == set()
    [real] = sync(workspace, engine)
    assert real.delivered == 3


def test_source_error_fails_that_audience_and_sends_nothing_for_it(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    sync(workspace, engine)
    source.write_text('{"user_id": "u1", "email": "u1@example.com"}\n{broken\n')

    [run] = sync(workspace, engine)

    assert run.status == "failed"
    assert "line 2" in (run.error or "")
    assert acknowledged(engine) == users(0, 1, 2)  # never `false` because of a broken source


def test_held_lease_skips_the_audience(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    lease.acquire(engine, KEY, "other-host:1:abcd")

    [run] = sync(workspace, engine)

    assert run.status == "skipped"
    assert "other-host:1:abcd" in (run.error or "")
    assert exit_code([run]) == 3
    assert gist.requests() == []


def test_lease_of_a_dead_process_expires(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    plant_lease(engine, KEY, "dead-host:1:abcd", -1)

    [run] = sync(workspace, engine)

    assert (run.status, run.delivered) == ("succeeded", 1)


def test_run_left_running_by_a_crash_is_marked_interrupted(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    [first] = sync(workspace, engine)
    with engine.begin() as connection:
        connection.execute(sync_runs.update().values(status="running", finished_at=None))
    sync(workspace, engine)
    with engine.connect() as connection:
        status = connection.scalar(select(sync_runs.c.status).where(sync_runs.c.id == first.run_id))
    assert status == "interrupted"


def test_sql_source(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    warehouse = workspace.root / "warehouse.db"
    import sqlite3

    connection = sqlite3.connect(warehouse)
    connection.executescript(
        "CREATE TABLE users (id INTEGER, mail TEXT);"
        "INSERT INTO users VALUES (1, 'a@example.com'), (2, 'b@example.com'), (3, NULL);"
    )
    connection.commit()
    connection.close()
    workspace.add_sql_audience(
        "Order Completed Last 30days",
        f"sqlite:///{warehouse}",
        "SELECT id AS user_id, mail AS email FROM users",
    )

    [run] = sync(workspace, engine)

    assert (run.members, run.rejected, run.delivered) == (2, 1, 2)
    assert in_gist(gist) == {"1", "2"}


def test_exit_codes() -> None:
    def result(status: RunStatus) -> RunResult:
        return RunResult("k", "K", "run", status)

    assert exit_code([result("succeeded")]) == 0
    assert exit_code([]) == 0
    assert exit_code([result("succeeded"), result("skipped")]) == 3
    assert exit_code([result("skipped"), result("partial")]) == 1
    for status in ("partial", "failed", "guarded", "interrupted"):
        assert exit_code([result(status)]) == 1


def test_a_run_killed_while_staging_leaves_nothing_a_later_run_misreads(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    sync(workspace, engine)
    # A run killed while staging: its row stays `running`, its snapshot (user x) is written,
    # and its connection goes away without a drop, a rollback or a commit.
    dead = open_run(engine, KEY, "Order Completed Last 30days", str(source), "run", utcnow())
    connection = engine.connect()
    Staging(connection).stage(dead, _Rows([(1, "x", "x@example.com", None)]))
    connection.invalidate()
    connection.close()
    gist.clear_log()

    [after] = sync(workspace, engine)

    assert (after.status, after.entered, after.exited, after.members) == ("succeeded", 0, 0, 1)
    assert gist.requests() == []
    assert acknowledged(engine) == {"u1"}
    with engine.connect() as connection:
        status = connection.scalar(select(sync_runs.c.status).where(sync_runs.c.id == dead))
        assert status == "interrupted"
        # No snapshot outlives its connection: nothing persistent to clear, nor to misread.
        tables = set(inspect(connection).get_table_names())
    assert not {t for t in tables if t.startswith("staged")}


class _Rows:
    """A source of fixed rows (``with_value``: a computed trait's)."""

    description = "rows"

    def __init__(
        self, rows: list[SourceRow], *, with_value: bool = False, chunk: int = 5000
    ) -> None:
        self.rows = rows
        self.with_value = with_value
        self.chunk = chunk

    def read_chunks(self, chunk_size: int = 5000) -> Iterator[list[SourceRow]]:
        for start in range(0, len(self.rows), self.chunk):
            yield self.rows[start : start + self.chunk]

    def batches(self, value_type: str | None = None) -> Iterator[Batch]:
        return check_chunks(self.read_chunks(), with_value=self.with_value, value_type=value_type)


@pytest.mark.parametrize("with_value", [False, True], ids=["audience", "trait"])
def test_staging_keeps_every_character_a_usable_row_may_hold(
    engine: Engine, with_value: bool
) -> None:
    # Backslashes (COPY's escape), "\\N" (its NULL), quotes, commas and non-ASCII text
    # arrive as they were; a trait's values (canonical JSON, with its escapes) likewise.
    given = [
        (1, "a\\b", "x\\y@example.com", None),
        (2, "\\N", "q,r@example.com", "tab\there"),
        (3, 'ü "7"', "ß@例え.jp", ""),
        (4, "\\", "b@c.de", '{"k": "\\\\N"}'),
    ]
    with engine.connect() as connection:
        staging = Staging(connection)
        snapshot = staging.stage(1, _Rows(given, with_value=with_value))
        with connection.begin():
            staged = connection.execute(select(snapshot.table)).all()
        staging.drop()

    expected = {
        (user, email, encode_value(value) if with_value else None)
        for _, user, email, value in given
    }
    assert set(staged) == expected
    assert snapshot.source_rows == 4


_run_ids = iter(range(1, 1_000_000))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    picks=st.lists(
        st.tuples(st.sampled_from(["a", "b", "B", "a1", "b\\", "ü", "10", "9"]), st.integers(0, 3)),
        max_size=40,
    ),
    chunk=st.integers(1, 7),
)
def test_the_first_row_of_a_user_wins_in_any_order_across_batches(
    engine: Engine, picks: list[tuple[str, int]], chunk: int
) -> None:
    rows: list[SourceRow] = [
        (i + 1, user, f"{user}.{tag}@example.com", None) for i, (user, tag) in enumerate(picks)
    ]
    first: dict[str, str] = {}
    for _, user, email, _ in rows:
        first.setdefault(user, email)
    with engine.connect() as connection:
        staging = Staging(connection)
        snapshot = staging.stage(next(_run_ids), _Rows(rows, chunk=chunk))
        with connection.begin():
            staged = connection.execute(select(snapshot.table.c.user_id, snapshot.table.c.email))
            assert dict(staged.all()) == first
        staging.drop()
    assert snapshot.source_rows == len(rows)


def test_rate_limit_and_concurrency_bound_delivery(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options.update(requests_per_second=20, max_concurrency=8)
    workspace.write_config()
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(21))

    started = time.monotonic()
    sync(workspace, engine)
    paced = time.monotonic() - started

    # 21 requests at 20/s: the first goes at once, the last no sooner than 1 s later.
    stamps = [r.at for r in gist.requests()]
    assert max(stamps) - min(stamps) >= 0.95
    assert paced >= 0.95

    workspace.gist_options.update(requests_per_second=1000, max_concurrency=2)
    workspace.write_config()
    write_members(source, range(27))
    gist.latency = 0.2
    started = time.monotonic()
    sync(workspace, engine)
    # 6 new members, 2 at a time, 0.2 s each: at least three rounds.
    assert time.monotonic() - started >= 0.6


def test_retry_after_is_honoured(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    gist.fail_next(1, 429, retry_after="1")

    [run] = sync(workspace, engine)

    first, second = gist.requests()
    assert (first.status, second.status, run.status) == (429, 200, "succeeded")
    assert second.at - first.at >= 0.95


# PostgreSQL's planner statistics (SQLite plans from its indexes alone).
@pytest.mark.postgres
@pytest.mark.parametrize("state_url", ["postgresql"], indirect=True)
def test_state_statistics_are_refreshed_where_stale_by_autovacuums_measure(
    engine: Engine,
) -> None:

    def add_members(first: int, count: int) -> None:
        with engine.begin() as connection:
            connection.execute(
                memberships.insert(),
                [
                    {
                        "audience_key": KEY,
                        "user_id": f"u{n}",
                        "email": f"u{n}@example.com",
                        "since": utcnow(),
                        "last_run_id": 0,
                    }
                    for n in range(first, first + count)
                ],
            )
            connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")

    def analyzed() -> tuple[int, float]:
        with engine.connect() as connection:
            count, rows = connection.exec_driver_sql(
                "SELECT s.analyze_count, c.reltuples FROM pg_stat_user_tables s "
                "JOIN pg_class c ON c.oid = s.relid WHERE s.relid = 'memberships'::regclass"
            ).one()
        return int(count), float(rows)

    def refresh() -> tuple[int, float]:
        with engine.connect() as connection:
            analyze_state(connection)
        return analyzed()

    add_members(0, 1000)
    count, rows = refresh()  # never analyzed: it is
    assert rows == 1000
    add_members(1000, 140)  # 140 < 50 + 10% of 1,000
    assert refresh() == (count, 1000)
    add_members(1140, 20)  # 160 since the last ANALYZE
    assert refresh() == (count + 1, 1160)
