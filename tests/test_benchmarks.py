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
    names = ("harness", "scenarios", "report", "compare", "targets")
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
    delivery.floor_per_s = samples([160.0])
    rate = s.RateResult("sqlite", 1, 50.0, 1500, ok_answers=1500, answers_429=0,
                        achieved_per_s=49.5)  # fmt: skip
    record = bench["targets"]._record
    return [
        *sizes,
        *r.store_records(sizes),
        r.warehouse_record(warehouse),
        r.delivery_record(delivery),
        r.rate_record(rate),
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
    assert checks["delivery.sqlite.latency=50ms.share_of_target"]  # 2000 / 13 s of 160/s
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
    (delivery,) = [rec for rec in _records(bench) if rec["scenario"] == "delivery"]
    assert delivery["share_of_floor"] == pytest.approx(2000 / 13 / 160)
    assert "% of floor" in bench["report"].delivery_table([delivery])


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
