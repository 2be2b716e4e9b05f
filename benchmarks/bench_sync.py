"""Benchmark audience-sync's load + diff, warehouse-native path, delivery and rate limit
against the loopback fake Gist; print the tables and checks, write one JSON line per figure."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harness import (
    CURRENT,
    REPO,
    TIME_BIN,
    Cli,
    baseline_cli,
    checkout_commit,
    pg_version,
    postgres_problem,
    say,
    write_source,
)
from report import (
    JsonLines,
    Record,
    delivery_record,
    derive_checks,
    measurement_lines,
    print_report,
    rate_record,
    size_record,
    store_records,
    warehouse_record,
)
from scenarios import (
    BATCH_SIZE,
    NATIVE_STATE,
    RATE_LIMIT,
    DeliveryResult,
    RateResult,
    SizeResult,
    WarehouseResult,
    measure_delivery,
    measure_naive,
    measure_rate,
    measure_size,
    measure_warehouse,
)
from targets import (
    SCALE_BATCHES,
    measure_scale,
    measure_sql_postgresql,
    measure_sql_sqlite,
    measure_startup,
    project_scale,
)

SCENARIOS = (
    "size", "warehouse", "delivery", "rate", "sql-sqlite", "sql-postgresql", "startup", "scale",
)  # fmt: skip
DELIVERY_LATENCIES_MS = (0, 50, 200)  # issue 27's target 4 is judged at 50 and 200
BASELINE_REV = "e3b5e42"  # main before issue 10's load path and warehouse-native mode


def parse_sizes(text: str) -> list[int]:
    """``"100000,1e6,5_000_000"`` -> sorted distinct ints."""
    sizes = sorted({int(float(part.replace("_", ""))) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 200:
        raise argparse.ArgumentTypeError("sizes must be integers >= 200")
    return sizes


def parse_choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma-separated subset of ``allowed``, in the order given."""

    def parse(text: str) -> list[str]:
        chosen = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}, not {unknown}")
        return chosen

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes("100000,1000000,5000000"),
        help="comma-separated member counts N (default 100000,1000000,5000000)",
    )  # fmt: skip
    parser.add_argument(
        "--stores", type=parse_choices(("sqlite", "postgresql")), default=["sqlite", "postgresql"],
        help="comma-separated state stores: sqlite, postgresql (default both)",
    )  # fmt: skip
    parser.add_argument(
        "--scenarios", type=parse_choices(SCENARIOS), default=list(SCENARIOS),
        help=f"comma-separated scenarios to run (default {','.join(SCENARIOS)})",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=3, choices=range(1, 11), metavar="R",
        help="runs of every timed figure, summed up by their median (default 3)",
    )  # fmt: skip
    parser.add_argument(
        "--delivery-changes", type=int, default=2000,
        help="changes sent by each delivery-throughput run (default 2000)",
    )  # fmt: skip
    parser.add_argument(
        "--rate-seconds", type=float, default=30.0,
        help="length of each rate-limit hold run at 50/s (default 30 s = 1500 changes)",
    )  # fmt: skip
    parser.add_argument(
        "--scale-seconds", type=float, default=60.0,
        help="length of each scale run at 10 requests/s (default 60 s: 10 x batch_size x "
        "seconds members)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the churned snapshot")
    parser.add_argument(
        "--baseline-rev", default=BASELINE_REV, metavar="REV",
        help=f"revision whose CLI gives the warehouse scenario's baseline (default "
        f"{BASELINE_REV}, main before issue 10); '' to skip it",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=str(REPO / "bench-out" / "results.jsonl"), metavar="PATH",
        help="JSON lines, one per measurement ('-': stdout, and the report goes to stderr; "
        "default bench-out/results.jsonl)",
    )  # fmt: skip
    return parser


def machine_info() -> Record:
    """The machine, the versions and the commit measured."""
    version = subprocess.run(
        [sys.executable, "--version"], capture_output=True, text=True, check=False
    )
    startups = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "audience_sync", "--version"], capture_output=True, check=False
        )
        startups.append(time.perf_counter() - start)
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": (version.stdout or version.stderr).strip(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version(),
        "cli_startup_s": statistics.median(startups),
        "peak_rss_via": "/usr/bin/time -f %M" if os.access(TIME_BIN, os.X_OK) else "VmHWM poll",
        **checkout_commit(),
    }


def failed(result: Any, exc: Exception, what: str) -> None:
    """Keep a measurement's failure on its result (what was measured before stays)."""
    say(f"{what}: FAILED: {exc}")
    result.error = str(exc) if str(exc) else type(exc).__name__
    if hasattr(result, "error_detail"):
        result.error_detail = getattr(exc, "detail", None)


def missing_features(result: SizeResult | WarehouseResult) -> list[str]:
    """What the measured CLI lacks that a figure depends on, said once per feature."""
    found = []
    if isinstance(result, SizeResult) and result.full_diff_flag is False:
        found.append(
            "`run --full-diff` does not exist in this version: the no-change dry runs ran "
            "without it (a full diff, as long as there is no no-change fast path)"
        )
    if isinstance(result, WarehouseResult) and result.native_mode and not result.error:
        if result.native_mode != NATIVE_STATE:
            found.append(
                '`source = "state"` is not accepted by this version\'s config: the native '
                "figure is a [sources] URL equal to state.url, in the database only if this "
                "version does that"
            )
        if result.native_rows_python is None:
            found.append(
                "`run --metrics-file` writes no audience_sync_source_rows_total{audience,path}: "
                "rows moved into Python are not known"
            )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stores: list[str] = list(args.stores)
    scenarios: list[str] = list(args.scenarios)
    notes: list[str] = []
    if "postgresql" in stores and (problem := postgres_problem()) is not None:
        notes.append(f"postgresql skipped: {problem}")
        stores.remove("postgresql")
    say("machine info")
    machine = machine_info()
    stream = JsonLines(args.out)
    params = {k: v for k, v in vars(args).items() if k != "out"}
    stream.write({"kind": "run", "id": "run", **machine, "params": params})
    records: list[Record] = []

    def emit(record: Record) -> None:
        records.append(record)
        for line in measurement_lines(record):
            stream.write(line)

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp, ExitStack() as stack:
            root = Path(tmp)
            baseline: Cli | None = None
            if "warehouse" in scenarios and "postgresql" in stores and args.baseline_rev:
                try:
                    baseline = stack.enter_context(baseline_cli(args.baseline_rev, root))
                    say(f"baseline: {args.baseline_rev} = {baseline.commit}")
                except Exception as exc:
                    notes.append(f"warehouse baseline not measured: {exc}")
            for n in args.sizes if {"size", "warehouse"} & set(scenarios) else []:
                folder = root / f"n{n}"
                folder.mkdir()
                say(f"N={n:,}: writing sources")
                v0, v1 = folder / "v0.csv", folder / "v1.csv"
                write_source(v0, n)
                expected = write_source(v1, n, seed=args.seed + n)
                naive: tuple[float | None, float | None] = (None, None)
                if "size" in scenarios:
                    say(f"N={n:,}: naive baseline")
                    naive = measure_naive(folder, v0, v1)
                for store in stores if "size" in scenarios else []:
                    result = SizeResult(n, store, expected, batch_size=BATCH_SIZE)
                    result.naive_s, result.naive_peak_mb = naive
                    store_folder = folder / store
                    store_folder.mkdir()
                    try:
                        measure_size(result, store_folder, (v0, v1), args.repeat, CURRENT)
                    except Exception as exc:
                        failed(result, exc, f"{store} N={n:,}")
                    emit(size_record(result))
                    notes += [m for m in missing_features(result) if m not in notes]
                if "warehouse" in scenarios and "postgresql" in stores:
                    wh = WarehouseResult(n, expected)
                    wh_folder = folder / "warehouse"
                    wh_folder.mkdir()
                    try:
                        measure_warehouse(wh, wh_folder, args.repeat, args.seed + n, baseline)
                    except Exception as exc:
                        failed(wh, exc, f"warehouse N={n:,}")
                    emit(warehouse_record(wh))
                    notes += [m for m in missing_features(wh) if m not in notes]
                shutil.rmtree(folder, ignore_errors=True)
            for n in args.sizes:
                for scenario in ("sql-sqlite", "sql-postgresql"):
                    store = scenario.removeprefix("sql-")
                    if scenario not in scenarios or store not in stores:
                        continue
                    folder = root / f"{scenario}-n{n}"
                    folder.mkdir()
                    try:
                        if store == "sqlite":
                            emit(measure_sql_sqlite(n, folder, args.repeat))
                        else:
                            emit(measure_sql_postgresql(n, args.repeat, folder))
                    except Exception as exc:
                        say(f"{scenario} N={n:,}: FAILED: {exc}")
                        emit({"scenario": scenario, "case": f"{scenario}.n{n}", "store": store,
                              "n": n, "error": str(exc) or type(exc).__name__})  # fmt: skip
                    shutil.rmtree(folder, ignore_errors=True)
            if "startup" in scenarios:
                folder = root / "startup"
                folder.mkdir()
                try:
                    for record in measure_startup(folder, args.repeat):
                        emit(record)
                except Exception as exc:
                    say(f"startup: FAILED: {exc}")
                    emit({"scenario": "startup", "case": "startup", "store": "sqlite",
                          "error": str(exc) or type(exc).__name__})  # fmt: skip
            for store in stores:
                for latency_ms in DELIVERY_LATENCIES_MS if "delivery" in scenarios else ():
                    delivery = DeliveryResult(store, latency_ms, args.delivery_changes)
                    try:
                        measure_delivery(delivery, root, args.repeat, store)
                    except Exception as exc:
                        failed(delivery, exc, f"{store} delivery at {latency_ms} ms")
                    emit(delivery_record(delivery))
                for run in range(1, args.repeat + 1) if "rate" in scenarios else ():
                    changes = max(10, round(RATE_LIMIT * args.rate_seconds))
                    rate = RateResult(store, run, RATE_LIMIT, changes)
                    say(f"{store}: rate-limit hold, run {run}/{args.repeat} ({changes} changes)")
                    try:
                        measure_rate(rate, root)
                    except Exception as exc:
                        failed(rate, exc, f"{store} rate-limit run {run}")
                    emit(rate_record(rate))
                scaled: list[Record] = []
                for batch_size in SCALE_BATCHES if "scale" in scenarios else ():
                    try:
                        scaled.append(measure_scale(store, batch_size, args.scale_seconds, root))
                    except Exception as exc:
                        say(f"{store} scale, batch_size {batch_size}: FAILED: {exc}")
                        scaled.append({"scenario": "scale", "store": store,
                                       "case": f"scale.{store}.batch={batch_size}",
                                       "batch_size": batch_size,
                                       "error": str(exc) or type(exc).__name__})  # fmt: skip
                for record in project_scale(scaled):
                    emit(record)
        for record in store_records([r for r in records if r["scenario"] == "size"]):
            emit(record)
        checks = derive_checks(records)
        for check in checks:
            stream.write({"kind": "check", **vars(check), "id": f"check.{check.id}"})
        stream.write({"kind": "notes", "id": "notes", "notes": notes})
    finally:
        stream.close()
    out = sys.stderr if args.out == "-" else sys.stdout
    print_report(machine, notes, records, checks, time.perf_counter() - started, out)
    if args.out != "-":
        print(f"JSON lines: {args.out}", file=out)
    return 0 if checks and all(c.passed for c in checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
