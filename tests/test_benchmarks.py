"""The benchmark's pure parts: every target names a figure that is measured, ids are unique
and stable, and two runs' JSON lines compare."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    names = ("harness", "scenarios", "report", "compare", "targets", "bench_sync")
    return {name: importlib.import_module(name) for name in names}


def _records(bench: dict[str, ModuleType]) -> list[dict[str, Any]]:
    s, r = bench["scenarios"], bench["report"]
    samples = bench["harness"].Samples
    sizes = []
    for n, store in ((1_000_000, "sqlite"), (5_000_000, "sqlite"), (1_000_000, "postgresql")):
        size = s.SizeResult(n, store, n // 100, churn_match=True, nochange_planned=0,
                            unchanged_planned=0, unchanged_requests=0)  # fmt: skip
        for name in ("churn_s", "floor_s", "diff_floor_s", "nochange_s", "unchanged_s"):
            setattr(size, name, samples([1.0, 2.0, 3.0]))
        size.churn_rss_mb = samples([80.0], stat="max")
        sizes.append(r.size_record(size))
    warehouse = s.WarehouseResult(1_000_000, 10_000, native_rows_python=0.0)
    warehouse.native_s, warehouse.baseline_s = samples([1.0]), samples([4.0])
    delivery = s.DeliveryResult("sqlite", 50, 2000, target_per_s=160.0)
    delivery.delivery_s = samples([13.0])
    delivery.floor_per_s = samples([155.0])
    slow = s.DeliveryResult("sqlite", 200, 2000, target_per_s=40.0)
    slow.delivery_s = samples([52.0, 51.0, 53.0])
    slow.floor_per_s = samples([39.0, 40.0, 41.0])  # 2000 / 52 s = 38.5/s: 96% of 40/s
    rate = s.RateResult("sqlite", 1, 50.0, 1500, ok_answers=1500, answers_429=0,
                        achieved_per_s=49.5)  # fmt: skip
    record = bench["targets"]._record
    return [
        *sizes,
        *r.store_records(sizes),
        r.warehouse_record(warehouse),
        r.delivery_record(delivery),
        r.delivery_record(slow),
        r.rate_record(rate),
        *_scale_records(bench),
        {
            **record("sql-sqlite", "sql-sqlite.n1000000", "sqlite", 1_000_000, [2.0], [1.0]),
            "churn_ratio": 1.2,
            "churn_match": 1,
        },
        {
            **record("sql-postgresql", "sql-postgresql.n1", "postgresql", 1_000_000, [3.0], [1.0]),
            "churn_ratio": 1.7,
            "churn_match": 1,
        },
        record("startup", "startup.history", "sqlite", None, [0.4, 0.5], [0.3, 0.3]),
    ]


def _scale_records(bench: dict[str, ModuleType]) -> list[dict[str, Any]]:
    """Two ``scale`` runs of 60 s, one per batch_size, as measure_scale records them."""
    targets, sent = bench["targets"], bench["harness"].Sent
    runs = []
    for batch, n, dry_s, real_s in ((1, 600, 0.05, 60.35), (100, 60_000, 0.6, 61.0)):
        requests = n // batch
        fake = sent(http_requests=requests, contact_updates=n, distinct_users=n,
                    status_counts={"200": requests}, first_ok_at=0.0,
                    last_ok_at=(requests - 1) / 9.95)  # fmt: skip
        runs.append(targets.scale_record("sqlite", batch, n, (dry_s, real_s), fake, 10))
    result: list[dict[str, Any]] = targets.project_scale(runs)
    return result


def test_every_threshold_judges_a_measured_figure(bench: dict[str, ModuleType]) -> None:
    records = _records(bench)
    for threshold in bench["report"].THRESHOLDS:
        judged = [rec for rec in records if threshold.applies(rec)]
        assert judged, threshold
        assert all(rec.get(threshold.metric) is not None for rec in judged), threshold


def test_checks_pass_and_fail_by_the_table(bench: dict[str, ModuleType]) -> None:
    checks = {c.id: c.passed for c in bench["report"].derive_checks(_records(bench))}
    assert checks["size.sqlite.n=1000000.churn_ratio"]  # 2 s / 2 s <= 1.5
    assert not checks["size.sqlite.n=1000000.unchanged_ratio"]  # 2 s / 2 s > 0.1
    assert checks["warehouse.postgresql.n=1000000.native_speedup"]  # 4 s / 1 s >= 3
    assert checks["delivery.sqlite.latency=50ms.share_of_floor"]  # 2000 / 13 s of 155/s
    assert not checks["delivery.sqlite.latency=200ms.share_of_floor"]  # 38.5/s of 40/s
    assert "delivery.sqlite.latency=50ms.share_of_target" not in checks  # reported only
    assert checks["scale.sqlite.batch=1.paper_deviation"]
    assert checks["scale.sqlite.batch=100.paper_deviation"]
    assert checks["store.sqlite.churn_scaling_5m_1m"]
    assert checks["rate.sqlite.run=1.share_of_limit"]
    assert checks["sql-sqlite.n1000000.ratio"]  # 2 s / 1 s <= 2
    assert not checks["sql-postgresql.n1.ratio"]  # 3 s / 1 s > 2
    assert checks["sql-sqlite.n1000000.churn_ratio"]
    assert not checks["sql-postgresql.n1.churn_ratio"]
    assert checks["startup.history.ratio"]  # 0.45 s / 0.3 s <= 2


def test_the_delivery_record_reads_the_rate_against_the_floor(
    bench: dict[str, ModuleType],
) -> None:
    (delivery,) = [rec for rec in _records(bench) if rec.get("latency_ms") == 50]
    assert delivery["share_of_floor"] == pytest.approx(2000 / 13 / 155)
    assert delivery["share_of_target"] == pytest.approx(2000 / 13 / 160)  # reported
    assert "% of floor" in bench["report"].delivery_table([delivery])


def test_delivery_is_judged_against_the_floor_at_50_and_200_ms(
    bench: dict[str, ModuleType],
) -> None:
    judged = {
        t.latency_ms
        for t in bench["report"].THRESHOLDS
        if t.scenario == "delivery" and t.metric == "share_of_floor" and t.limit == 0.97
    }
    assert judged == {50, 200}
    assert not [t for t in bench["report"].THRESHOLDS if t.metric == "share_of_target"]
    assert {50, 200} <= set(bench["bench_sync"].DELIVERY_LATENCIES_MS)


def test_scale_projects_a_first_sync_of_1m_against_the_paper_figure(
    bench: dict[str, ModuleType],
) -> None:
    targets = bench["targets"]
    assert targets.scale_members(1, 60) == 600
    assert targets.scale_members(100, 60) == 60_000
    assert targets.paper_seconds(1) == 100_000  # 27.8 h
    assert targets.paper_seconds(100) == 1_000  # 16.7 min
    one, hundred = _scale_records(bench)
    # The load + plan of 1M comes from the largest dry run (0.6 s at 60k), for both.
    assert one["load_plan_1m_s"] == hundred["load_plan_1m_s"] == pytest.approx(10.0)
    assert one["contacts_per_s"] == pytest.approx(600 / 60.3)
    assert one["projected_1m_s"] == pytest.approx(1_000_000 / (600 / 60.3) + 10.0)
    assert hundred["projected_1m_s"] == pytest.approx(1_000_000 / (60_000 / 60.4) + 10.0)
    assert hundred["projection_ratio"] == pytest.approx(hundred["projected_1m_s"] / 1_000)
    assert hundred["paper_deviation"] == pytest.approx(abs(hundred["projection_ratio"] - 1))
    assert one["requests_per_s"] == pytest.approx(9.95)
    text = bench["report"].scale_table([one, hundred])
    assert "27.8 h" in text  # on paper, batch_size 1
    assert "16.7 min" in text  # on paper, batch_size 100


def test_a_failed_scale_run_is_kept_and_fails_its_check(bench: dict[str, ModuleType]) -> None:
    failed = {"scenario": "scale", "case": "scale.sqlite.batch=1", "store": "sqlite",
              "batch_size": 1, "error": "delivered 599 of 600"}  # fmt: skip
    (kept,) = bench["targets"].project_scale([failed])
    assert kept is failed
    checks = {c.id: c for c in bench["report"].derive_checks([kept])}
    assert not checks["scale.sqlite.batch=1.measured"].passed
    assert "ERROR" in bench["report"].scale_table([kept])


def test_the_delivery_floor_sends_every_update_to_the_fake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from audience_sync.fakegist import FakeGist

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    floor = importlib.import_module("delivery_floor")
    with FakeGist(api_key="bench-key") as gist:
        seconds = asyncio.run(floor.deliver(gist.url, "bench-key", 25, 4))
        assert seconds > 0
        assert len(gist.contacts()) == 25
        assert {r.status for r in gist.requests()} == {200}


def test_ids_are_unique_and_compare_joins_on_them(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    report, compare = bench["report"], bench["compare"]
    lines = [line for rec in _records(bench) for line in report.measurement_lines(rec)]
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids))
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps(line) + "\n" for line in lines))
    slower = [
        {**line, "value": line["value"] * 2} if line["id"].endswith(".churn_s") else line
        for line in lines
    ]
    new.write_text("".join(json.dumps(line) + "\n" for line in slower))
    text = compare.compare(
        compare.load_lines(old), compare.load_lines(new), tolerance=0.05, every=False
    )
    assert "size.sqlite.n=1000000.churn_s" in text
    assert "worse" in text
    assert "floor_s" not in text


def test_source_rows_reads_the_counter_by_path(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry, Counter, write_to_textfile

    registry = CollectorRegistry()
    rows = Counter(
        "audience_sync_source_rows_total", "rows", ["audience", "path"], registry=registry
    )
    rows.labels("bench", "python").inc(200)
    rows.labels("bench", "database").inc(20_000)
    rows.labels("other", "python").inc(5)
    path = tmp_path / "metrics.prom"
    write_to_textfile(str(path), registry)
    assert bench["harness"].source_rows(path) == {"python": 200.0, "database": 20_000.0}

    Counter("audience_sync_runs_total", "runs", registry=(bare := CollectorRegistry()))
    write_to_textfile(str(path), bare)
    assert bench["harness"].source_rows(path) is None  # a CLI without the counter
