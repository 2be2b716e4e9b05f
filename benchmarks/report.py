"""Benchmark results as flat records: the thresholds table and its checks, one JSON line per
measurement, and the human tables."""

from __future__ import annotations

import json
import operator
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import IO, Any, Literal

from harness import Samples
from scenarios import DeliveryResult, RateResult, SizeResult, WarehouseResult

Record = dict[str, Any]
TARGET_N = 1_000_000  # issue 10's ratio targets are for 1M and 5M; small N is start-up
IDENTITY = ("scenario", "case", "store", "n", "latency_ms", "run")
NOT_METRICS = (*IDENTITY, "error", "error_detail", "skipped", "samples")


@dataclass(frozen=True)
class Threshold:
    """One target: ``metric op limit`` for every record of ``scenario`` it applies to."""

    scenario: str
    metric: str
    op: Literal["<=", ">=", "=="]
    limit: float
    label: str
    stores: tuple[str, ...] = ("sqlite", "postgresql")
    min_n: int = 0  # records with a smaller n are reported, not checked
    latency_ms: int | None = None  # delivery records at this latency only
    missing: str = "not measured"  # why the figure can be absent

    def applies(self, record: Record) -> bool:
        """Whether ``record`` is one this target judges."""
        return (
            record["scenario"] == self.scenario
            and record.get("store") in self.stores
            and (record.get("n") or 0) >= self.min_n
            and (self.latency_ms is None or record.get("latency_ms") == self.latency_ms)
        )

    def passes(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        compare: Callable[[float, float], bool] = {
            "<=": operator.le, ">=": operator.ge, "==": operator.eq
        }[self.op]  # fmt: skip
        return compare(value, self.limit)


# Every target the benchmark checks (issue 10's "Targets", plus exactness and scaling), in
# one place: the checks, the report and benchmarks/README.md's table all follow it.
THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("size", "churn_ratio", "<=", 1.5,
              "SQLite, file source, 1% churn: load+diff / bare-load floor",
              stores=("sqlite",), min_n=TARGET_N),
    Threshold("size", "nochange_ratio", "<=", 1.5,
              "SQLite, no change, full diff: load+diff / bare-load floor",
              stores=("sqlite",), min_n=TARGET_N),
    Threshold("size", "churn_ratio", "<=", 3.0,
              "PostgreSQL, file source, 1% churn: load+diff / bare-load floor",
              stores=("postgresql",), min_n=TARGET_N),
    Threshold("size", "churn_ratio_diff_floor", "<=", 1.7,
              "PostgreSQL, file source, 1% churn: load+diff / load+diff floor",
              stores=("postgresql",), min_n=TARGET_N),
    Threshold("size", "unchanged_ratio", "<=", 0.1,
              "unchanged file (real run): engine time / bare-load floor", min_n=TARGET_N),
    Threshold("size", "peak_rss_mb", "<=", 150, "peak RSS of the dry runs, MB"),
    Threshold("size", "churn_match", "==", 1,
              "1% churn sends exactly one update per changed user"),
    Threshold("size", "nochange_changes", "==", 0,
              "no change: nothing planned (full diff) and nothing sent (unchanged file)"),
    Threshold("store", "rss_growth", "<=", 1.1, "peak RSS at the largest N / at the smallest N"),
    Threshold("store", "churn_scaling_5m_1m", "<=", 5.5, "churn load+diff time 5M / 1M"),
    Threshold("warehouse", "native_speedup", ">=", 3.0,
              "warehouse-native vs the baseline revision's regular path (x faster)",
              stores=("postgresql",), min_n=TARGET_N,
              missing="no baseline figure (see the notes; --baseline-rev)"),
    Threshold("warehouse", "native_rows_python", "==", 0,
              "warehouse-native: source rows moved into Python (changed rows cross only when "
              "sent)", stores=("postgresql",),
              missing="the CLI wrote no audience_sync_source_rows_total{path} to --metrics-file"),
    # Issue 27's target 4: what this machine allows, the bare httpx floor of the same run
    # (its share of concurrency / latency, `share_of_target`, is reported, not checked).
    *(Threshold("delivery", "share_of_floor", ">=", 0.97,
                f"delivery at {ms} ms, max_concurrency 8: changes/s / the bare-httpx delivery "
                "floor's requests/s, same run", latency_ms=ms)
      for ms in (50, 200)),
    Threshold("rate", "share_of_limit", ">=", 0.97,
              "rate-limit hold at 50/s against a fake limiting at 50/s (every run)"),
    Threshold("rate", "answers_429", "==", 0, "429 answers in the rate-limit hold (every run)"),
    # Issue 27 (benchmarks/targets.py): whole processes against floors of the same run.
    Threshold("sql-sqlite", "ratio", "<=", 2.0,
              "SQL source on another SQLite database, first-sync dry run: whole process / "
              "bare read + executemany floor", stores=("sqlite",), min_n=TARGET_N),
    Threshold("sql-postgresql", "ratio", "<=", 2.0,
              "SQL source on another PostgreSQL database, first-sync dry run: whole process / "
              "bare COPY TO STDOUT -> COPY FROM STDIN floor", stores=("postgresql",),
              min_n=TARGET_N),
    Threshold("sql-sqlite", "churn_ratio", "<=", 1.5,
              "SQL source on another SQLite database, 1% churn dry run: whole process / the "
              "same floor", stores=("sqlite",), min_n=TARGET_N),
    Threshold("sql-postgresql", "churn_ratio", "<=", 1.5,
              "SQL source on another PostgreSQL database, 1% churn dry run: whole process / "
              "the same floor", stores=("postgresql",), min_n=TARGET_N),
    Threshold("sql-sqlite", "churn_match", "==", 1,
              "SQL source, 1% churn: the dry run plans exactly the changed members",
              stores=("sqlite",)),
    Threshold("sql-postgresql", "churn_match", "==", 1,
              "SQL source, 1% churn: the dry run plans exactly the changed members",
              stores=("postgresql",)),
    Threshold("startup", "ratio", "<=", 2.0,
              "history, audiences, run --dry-run (10 members, unchanged): whole process / "
              "python -c 'import sqlalchemy, httpx'", stores=("sqlite",)),
    Threshold("scale", "paper_deviation", "<=", 0.10,
              "first sync of 1M at 10 requests/s, batch_size 1 and 100: the measured "
              "projection's distance from 1M / (10 x batch_size) s, as a share of it"),
)  # fmt: skip


def targets_markdown() -> str:
    """THRESHOLDS as the Markdown table of benchmarks/README.md (kept in step there by cog)."""
    lines = ["| target | stores | from N | check |", "|---|---|---|---|"]
    for t in THRESHOLDS:
        where = f"{t.scenario} records" + (f" at {t.latency_ms} ms" if t.latency_ms else "")
        stores = ", ".join("SQLite" if s == "sqlite" else "PostgreSQL" for s in t.stores)
        start = f"{t.min_n:,}" if t.min_n else "any"
        lines.append(f"| {t.label} | {stores} | {start} | `{t.metric} {t.op} {t.limit:g}` "
                     f"({where}) |")  # fmt: skip
    return "\n".join(lines)


@dataclass
class Check:
    """One target judged on one record."""

    id: str
    name: str
    passed: bool
    detail: str


# --------------------------------------------------------------------------------- records


def _ratio(top: Any, bottom: Any) -> float | None:
    return top / bottom if top is not None and bottom else None


def flatten(result: Any, scenario: str, case: str) -> Record:
    """A result dataclass as a flat record: ``Samples`` become their statistic, with the
    values under ``samples``."""
    assert is_dataclass(result)
    record: Record = {"scenario": scenario, "case": case, "samples": {}}
    for item in fields(result):
        value = getattr(result, item.name)
        if isinstance(value, Samples):
            record[item.name] = value.value
            if value.values:
                record["samples"][item.name] = value.values
        else:
            record[item.name] = value
    return record


def size_record(r: SizeResult) -> Record:
    """A size measurement with its ratios."""
    rec = flatten(r, "size", f"size.{r.store}.n={r.n}")
    rec["floor_rows_per_s"] = _ratio(r.n, rec["floor_s"])
    rec["churn_rows_per_s"] = _ratio(r.n, rec["churn_s"])
    for name in ("churn", "nochange"):
        rec[f"{name}_ratio"] = _ratio(rec[f"{name}_s"], rec["floor_s"])
        rec[f"{name}_ratio_diff_floor"] = _ratio(rec[f"{name}_s"], rec["diff_floor_s"])
    rec["unchanged_ratio"] = _ratio(rec["unchanged_s"], rec["floor_s"])
    peaks = [p for p in (rec["churn_rss_mb"], rec["nochange_rss_mb"]) if p is not None]
    rec["peak_rss_mb"] = max(peaks) if peaks else None
    rec["churn_match"] = None if r.churn_match is None else int(r.churn_match)
    parts = (r.nochange_planned, r.unchanged_planned, r.unchanged_requests)
    rec["nochange_changes"] = None if None in parts else sum(p or 0 for p in parts)
    return rec


def warehouse_record(r: WarehouseResult) -> Record:
    """A warehouse-native measurement with its speed-ups."""
    rec = flatten(r, "warehouse", f"warehouse.{r.store}.n={r.n}")
    rec["native_speedup"] = _ratio(rec["baseline_s"], rec["native_s"])
    rec["native_vs_regular"] = _ratio(rec["regular_s"], rec["native_s"])
    return rec


def delivery_record(r: DeliveryResult) -> Record:
    """A delivery measurement with its changes/s."""
    rec = flatten(r, "delivery", f"delivery.{r.store}.latency={r.latency_ms}ms")
    rec["changes_per_s"] = _ratio(r.changes, rec["delivery_s"])
    rec["share_of_target"] = _ratio(rec["changes_per_s"], r.target_per_s)
    rec["share_of_floor"] = _ratio(rec["changes_per_s"], rec["floor_per_s"])
    return rec


def rate_record(r: RateResult) -> Record:
    """One rate-limit run with its share of the limit."""
    rec = flatten(r, "rate", f"rate.{r.store}.run={r.run}")
    rec["share_of_limit"] = _ratio(r.achieved_per_s, r.limit_per_s)
    return rec


def store_records(sizes: Sequence[Record]) -> list[Record]:
    """Per store, what compares sizes: RSS growth and 5M / 1M scaling."""
    out: list[Record] = []
    for store in sorted({r["store"] for r in sizes}):
        mine = sorted(
            (r for r in sizes if r["store"] == store and not (r["error"] or r["skipped"])),
            key=lambda r: r["n"],
        )
        if len(mine) < 2:
            continue
        rec: Record = {"scenario": "store", "case": f"store.{store}", "store": store}
        rec["smallest_n"], rec["largest_n"] = mine[0]["n"], mine[-1]["n"]
        rec["rss_growth"] = _ratio(mine[-1]["peak_rss_mb"], mine[0]["peak_rss_mb"])
        by_n = {r["n"]: r for r in mine}
        if 1_000_000 in by_n and 5_000_000 in by_n:
            rec["churn_scaling_5m_1m"] = _ratio(
                by_n[5_000_000]["churn_s"], by_n[1_000_000]["churn_s"]
            )
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------- checks


def derive_checks(records: Sequence[Record]) -> list[Check]:
    """Every applicable threshold on every record; a measurement that failed is a failed
    check of its own, and its figures are not judged."""
    checks: list[Check] = []
    for rec in records:
        if rec.get("error"):
            error = str(rec["error"])[:300]
            checks.append(
                Check(f"{rec['case']}.measured", f"{rec['case']}: measured", False, error)
            )
    for threshold in THRESHOLDS:
        for rec in records:
            if rec.get("error") or rec.get("skipped") or not threshold.applies(rec):
                continue
            if threshold.metric not in rec and rec["scenario"] == "store":
                continue  # e.g. no 5M / 1M scaling without both sizes
            value = rec.get(threshold.metric)
            ident = f"{rec['case']}.{threshold.metric}"
            name = f"{rec['case']}: {threshold.label}"
            target = f"target {threshold.op} {threshold.limit:g}"
            if value is None:
                checks.append(Check(ident, name, False, f"{threshold.missing} ({target})"))
                continue
            detail = f"{threshold.metric} = {value:.4g} ({target})"
            checks.append(Check(ident, name, threshold.passes(value), detail))
    return checks


def unchecked_targets(records: Sequence[Record]) -> list[str]:
    """Targets that no record of this run was large enough to judge."""
    notes = []
    for threshold in THRESHOLDS:
        present = [r for r in records if r["scenario"] == threshold.scenario]
        if threshold.min_n and present and not any(threshold.applies(r) for r in present):
            notes.append(f"{threshold.label} {threshold.op} {threshold.limit:g} "
                         f"(checked from N = {threshold.min_n:,})")  # fmt: skip
    return notes


# ------------------------------------------------------------------------------ JSON lines


def unit_of(metric: str) -> str | None:
    """The unit a metric's name implies."""
    for suffix, unit in (("_per_s", "1/s"), ("_s", "s"), ("_mb", "MB")):
        if metric.endswith(suffix):
            return unit
    if "ratio" in metric or "speedup" in metric or "growth" in metric or "scaling" in metric:
        return "x"
    if metric.startswith("share"):
        return "share"
    return None


def measurement_lines(record: Record) -> Iterator[Record]:
    """One JSON line per figure of ``record``, keyed by ``id`` = case + metric, so the lines
    of two commits join on ``id``."""
    ident = {k: record[k] for k in IDENTITY if record.get(k) is not None}
    samples = record.get("samples", {})
    for metric, value in record.items():
        if metric in NOT_METRICS:
            continue
        line: Record = {"kind": "measurement", "id": f"{record['case']}.{metric}", **ident}
        line.update(metric=metric, value=value, unit=unit_of(metric))
        if metric in samples:
            line["samples"] = samples[metric]
        yield line
    if record.get("error") or record.get("skipped"):
        yield {
            "kind": "error" if record.get("error") else "skipped",
            "id": f"{record['case']}.error",
            **ident,
            "error": record.get("error") or record.get("skipped"),
            "detail": record.get("error_detail"),
        }


class JsonLines:
    """A JSON-lines stream on a file or on stdout (``-``), flushed line by line, so the lines
    of a run that dies stay."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._handle: IO[str]
        if target == "-":
            self._handle = sys.stdout
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("w", encoding="utf-8")

    def write(self, line: Record) -> None:
        """One line."""
        self._handle.write(json.dumps(line, sort_keys=False, default=str) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file (stdout stays open)."""
        if self._handle is not sys.stdout:
            self._handle.close()


# ----------------------------------------------------------------------------- the tables


def fmt(value: Any, spec: str = "") -> str:
    """A cell: ``-`` for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _rows(
    records: Sequence[Record], width: int, cells: Callable[[Record], list[str]], lead: int = 2
) -> tuple[list[list[str]], list[str]]:
    rows, notes = [], []
    for r in records:
        if r.get("error") or r.get("skipped"):
            word = "ERROR" if r.get("error") else "skipped"
            notes.append(f"{r['case']}: {word}: {r.get('error') or r.get('skipped')}")
            rows.append([*cells(r)[:lead], word, *["-"] * (width - lead - 1)])
        else:
            rows.append(cells(r))
    return rows, notes


def _x(value: Any) -> str:
    return fmt(value, ".2f") + ("x" if value is not None else "")


def size_tables(records: Sequence[Record]) -> str:
    """Load + diff against both floors; then exactness and the extras."""
    headers = [
        "N", "store", "floor s", "l+d floor s", "churn s", "/floor", "/l+d",
        "no-chg s", "/floor", "/l+d", "unchanged s", "/floor", "rows/s", "RSS MB",
    ]  # fmt: skip
    rows, notes = _rows(records, len(headers), lambda r: [
        f"{r['n']:,}", r["store"], fmt(r["floor_s"], ".3f"), fmt(r["diff_floor_s"], ".3f"),
        fmt(r["churn_s"], ".3f"), _x(r["churn_ratio"]), _x(r["churn_ratio_diff_floor"]),
        fmt(r["nochange_s"], ".3f"), _x(r["nochange_ratio"]), _x(r["nochange_ratio_diff_floor"]),
        fmt(r["unchanged_s"], ".3f"), _x(r["unchanged_ratio"]),
        fmt(r["churn_rows_per_s"], ",.0f"), fmt(r["peak_rss_mb"], ".0f"),
    ])  # fmt: skip
    extra_headers = [
        "N", "store", "sent/expected", "match", "no-chg planned", "unchanged req",
        "--full-diff", "churn cli s", "naive s", "naive MB", "initial s",
    ]  # fmt: skip
    extra, _ = _rows(records, len(extra_headers), lambda r: [
        f"{r['n']:,}", r["store"], f"{fmt(r['churn_sent'])}/{fmt(r['churn_expected'])}",
        fmt(r["churn_match"] == 1 if r["churn_match"] is not None else None),
        fmt(r["nochange_planned"]), fmt(r["unchanged_requests"]), fmt(r["full_diff_flag"]),
        fmt(r["churn_cli_s"], ".2f"), fmt(r["naive_s"], ".2f"), fmt(r["naive_peak_mb"], ".0f"),
        fmt(r["initial_s"], ".1f"),
    ])  # fmt: skip
    parts = [table(headers, rows), *(f"  {n}" for n in notes), "", table(extra_headers, extra)]
    return "\n".join(parts)


def warehouse_table(records: Sequence[Record]) -> str:
    """Warehouse-native against the regular path, now and on the baseline revision."""
    headers = [
        "N", "native mode", "native s", "regular s", "baseline s", "x vs baseline",
        "x vs regular", "native rows->Python", "native rows in DB", "regular rows->Python",
        "changed",
    ]  # fmt: skip
    rows, notes = _rows(records, len(headers), lambda r: [
        f"{r['n']:,}", fmt(r["native_mode"]), fmt(r["native_s"], ".3f"),
        fmt(r["regular_s"], ".3f"), fmt(r["baseline_s"], ".3f"), _x(r["native_speedup"]),
        _x(r["native_vs_regular"]), fmt(r["native_rows_python"], ",.0f"),
        fmt(r["native_rows_database"], ",.0f"), fmt(r["regular_rows_python"], ",.0f"),
        fmt(r["churn_expected"], ","),
    ])  # fmt: skip
    return "\n".join([table(headers, rows), *(f"  {n}" for n in notes)])


def delivery_table(records: Sequence[Record]) -> str:
    """Delivery throughput per store and latency (medians of the runs)."""
    headers = [
        "store", "latency ms", "changes", "runs", "dry s", "real s", "delivery s",
        "changes/s", "fake-side/s", "floor/s", "% of floor", "target/s", "% of target",
    ]  # fmt: skip
    rows, notes = _rows(records, len(headers), lambda r: [
        r["store"], fmt(r["latency_ms"]), fmt(r["changes"]),
        fmt(len(r["samples"].get("delivery_s", []))), fmt(r["dry_s"], ".3f"),
        fmt(r["real_s"], ".3f"), fmt(r["delivery_s"], ".3f"), fmt(r["changes_per_s"], ",.0f"),
        fmt(r["fake_side_per_s"], ",.0f"), fmt(r["floor_per_s"], ",.0f"),
        fmt(None if r["share_of_floor"] is None else r["share_of_floor"] * 100, ".0f"),
        fmt(r["target_per_s"], ".0f"),
        fmt(None if r["share_of_target"] is None else r["share_of_target"] * 100, ".0f"),
    ])  # fmt: skip
    return "\n".join([table(headers, rows), *(f"  {n}" for n in notes)])


def rate_table(records: Sequence[Record]) -> str:
    """Every rate-limit run."""
    headers = ["store", "run", "changes", "200s", "429s", "achieved/s", "% of limit"]
    rows, notes = _rows(records, len(headers), lambda r: [
        r["store"], fmt(r["run"]), fmt(r["changes"]), fmt(r["ok_answers"]),
        fmt(r["answers_429"]), fmt(r["achieved_per_s"], ".1f"),
        fmt(None if r["share_of_limit"] is None else r["share_of_limit"] * 100, ".1f"),
    ])  # fmt: skip
    return "\n".join([table(headers, rows), *(f"  {n}" for n in notes)])


def floor_table(records: Sequence[Record]) -> str:
    """Issue 27's figures: the whole process, its floor of the same run, their ratio."""
    headers = ["case", "N", "audience-sync s", "floor s", "ratio", "1% churn s", "churn ratio",
               "load"]  # fmt: skip
    rows = [
        [r["case"], fmt(r.get("n"), ","), fmt(r.get("cli_s"), ".2f"), fmt(r.get("floor_s"), ".2f"),
         _x(r.get("ratio")), fmt(r.get("churn_cli_s"), ".2f"), _x(r.get("churn_ratio")),
         fmt(r.get("load_avg"), ".1f")]
        for r in records
    ]  # fmt: skip
    return table(headers, rows)


def duration(seconds: Any) -> str:
    """Seconds as a person reads them: ``27.9 h``, ``16.9 min``, ``42 s``."""
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def scale_table(records: Sequence[Record]) -> str:
    """A first sync at 10 requests/s per batch_size: what was measured, and 1M projected and
    on paper."""
    headers = [
        "store", "batch", "N", "requests", "delivery s", "contacts/s", "fake-side req/s",
        "busiest 1 s", "1M load+plan s", "1M projected", "1M on paper", "ratio", "load",
    ]  # fmt: skip
    rows, notes = _rows(records, len(headers), lambda r: [
        r["store"], fmt(r.get("batch_size")), fmt(r.get("n"), ","), fmt(r.get("http_requests")),
        fmt(r.get("delivery_s"), ".1f"), fmt(r.get("contacts_per_s"), ",.2f"),
        fmt(r.get("requests_per_s"), ".2f"), fmt(r.get("busiest_second")),
        fmt(r.get("load_plan_1m_s"), ".1f"), duration(r.get("projected_1m_s")),
        duration(r.get("paper_1m_s")), fmt(r.get("projection_ratio"), ".3f"),
        fmt(r.get("load_avg"), ".1f"),
    ])  # fmt: skip
    return "\n".join([table(headers, rows), *(f"  {n}" for n in notes)])


def print_report(
    machine: Record,
    notes: Sequence[str],
    records: Sequence[Record],
    checks: Sequence[Check],
    elapsed: float,
    out: IO[str],
) -> None:
    """The human report: machine, tables, checks."""

    def section(title: str, scenario: str, render: Callable[[Sequence[Record]], str]) -> None:
        mine = [r for r in records if r["scenario"] == scenario]
        if mine:
            print(f"\n{title}\n", file=out)
            print(render(mine), file=out)

    print(
        f"\nMachine: {machine['platform']}, {machine['cpu_count']} CPUs, {machine['python']}, "
        f"SQLite {machine['sqlite']}, PostgreSQL {machine['postgresql'] or 'n/a'}; "
        f"CLI startup {machine['cli_startup_s']:.2f} s; peak RSS via {machine['peak_rss_via']}; "
        f"commit {str(machine['commit'])[:12]}{' (dirty)' if machine['dirty'] else ''}",
        file=out,
    )
    for note in notes:
        print(f"Note: {note}", file=out)
    section(
        "Load + diff (engine time of dry runs, medians) against the bare-load floor and the "
        "load+diff floor; unchanged = a real run of the byte-identical file:",
        "size", size_tables,
    )  # fmt: skip
    section(
        "Warehouse-native (PostgreSQL; 1% churn dry runs, engine time, medians):",
        "warehouse", warehouse_table,
    )  # fmt: skip
    section(
        "Delivery throughput (max_concurrency 8, one request per change; delivery s = real s "
        "- dry s):", "delivery", delivery_table,
    )  # fmt: skip
    section("Rate-limit hold (50/s against a fake limiting at 50/s):", "rate", rate_table)
    for scenario, title in (
        ("sql-sqlite", "SQL source, SQLite warehouse -> SQLite state (first-sync dry run):"),
        ("sql-postgresql", "SQL source, PostgreSQL warehouse -> PostgreSQL state (another "
         "database; first-sync dry run):"),
        ("startup", "Start-up (10 members, unchanged) against python -c 'import sqlalchemy, "
         "httpx':"),
    ):  # fmt: skip
        section(title, scenario, floor_table)
    section(
        "At scale: a first sync at requests_per_second = 10 against the fake, projected to 1M "
        "members (load + plan of 1M extrapolated from the largest dry run):", "scale",
        scale_table,
    )  # fmt: skip
    print("\nChecks:\n", file=out)
    for check in checks:
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}", file=out)
    for target in unchecked_targets(records):
        print(f"  ----  not checked at these sizes: {target}", file=out)
    passed = sum(c.passed for c in checks)
    print(f"\n{passed} of {len(checks)} checks passed in {elapsed:.0f} s", file=out)
