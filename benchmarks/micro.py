"""Micro-benchmarks of the per-row hot path, in ns per row: ``split_chunk`` on audience and
trait rows, ``FileSource.read_chunks`` over a CSV and a JSONL file, ``FileSource.batches``
over a CSV (read and checked), and ``Staging`` of one chunk into SQLite. pyperf runs them
(worker processes, calibration, warm-ups, statistics); one JSON line per benchmark goes to
``--jsonl`` for compare.py."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyperf

from audience_sync.db import make_engine
from audience_sync.rows import CHUNK_SIZE, Batch, SourceRow, check_chunks, split_chunk
from audience_sync.sources import FileSource
from audience_sync.stage import Staging
from harness import REPO, checkout_commit
from report import JsonLines, fmt, table

FILE_ROWS = 50_000  # rows of the CSV and JSONL files read per loop
_folder: tempfile.TemporaryDirectory[str] | None = None


def audience_rows(count: int) -> list[SourceRow]:
    """Rows as a CSV audience gives them: text user id and email, no value."""
    return [(i + 1, f"u{i}", f"u{i}@example.com", None) for i in range(count)]


def trait_text_rows(count: int) -> list[SourceRow]:
    """Rows of a CSV computed trait: the value as text, typed ``int`` by the config."""
    return [(i + 1, f"u{i}", f"u{i}@example.com", str(i % 1000)) for i in range(count)]


def trait_json_rows(count: int) -> list[SourceRow]:
    """Rows of a JSONL computed trait: values as JSON gives them (int, float, text, bool)."""
    kinds: tuple[Callable[[int], Any], ...] = (
        lambda i: i, lambda i: i / 8, lambda i: f"tier-{i % 5}", lambda i: i % 2 == 0,
    )  # fmt: skip
    return [(i + 1, f"u{i}", f"u{i}@example.com", kinds[i % 4](i)) for i in range(count)]


def fixture(name: str, rows: int) -> Path:
    """A file of ``rows`` members in this worker's temporary folder, written once."""
    global _folder
    if _folder is None:
        _folder = tempfile.TemporaryDirectory(prefix="bench-micro-")
    path = Path(_folder.name) / f"{rows}-{name}"
    if not path.exists():
        with path.open("w", encoding="utf-8") as handle:
            if name.endswith(".csv"):
                handle.write("user_id,email\n")
                handle.writelines(f"u{i},u{i}@example.com\n" for i in range(rows))
            else:
                handle.writelines(
                    json.dumps({"user_id": f"u{i}", "email": f"u{i}@example.com"}) + "\n"
                    for i in range(rows)
                )
    return path


def time_split(loops: int, rows: list[SourceRow], with_value: bool, value_type: str) -> float:
    """Seconds for ``loops`` splits of one chunk."""
    kind = value_type or None
    start = time.perf_counter()
    for _ in range(loops):
        split_chunk(rows, with_value=with_value, value_type=kind)
    return time.perf_counter() - start


def rows_as_given(source: FileSource) -> Iterable[object]:
    return source.read_chunks()


def rows_checked(source: FileSource) -> Iterable[object]:
    return source.batches()


def time_read(
    loops: int, name: str, rows: int, read: Callable[[FileSource], Iterable[object]]
) -> float:
    """Seconds for ``loops`` full reads of a file: its rows as given (``read_chunks``), or
    read and checked, a CSV's plain lines a block at a time (``batches``)."""
    source = FileSource(fixture(name, rows))
    start = time.perf_counter()
    for _ in range(loops):
        for _part in read(source):
            pass
    return time.perf_counter() - start


class _OneChunk:
    """A source of one prepared chunk."""

    description = "micro-benchmark chunk"

    def __init__(self, rows: list[SourceRow]) -> None:
        self.rows = rows

    def read_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[list[SourceRow]]:
        yield self.rows

    def batches(self, value_type: str | None = None) -> Iterator[Batch]:
        return check_chunks(self.read_chunks())


def time_stage(loops: int, rows: int) -> float:
    """Seconds staging one chunk into a SQLite state file, ``loops`` times; creating the
    temporary table is part of it, dropping it is not."""
    with tempfile.TemporaryDirectory(prefix="bench-micro-stage-") as folder:
        engine = make_engine(f"sqlite:///{folder}/state.db")
        source = _OneChunk(audience_rows(rows))
        total = 0.0
        try:
            with engine.connect() as connection:
                staging = Staging(connection)
                for run_id in range(1, loops + 1):
                    start = time.perf_counter()
                    staging.stage(run_id, source)
                    total += time.perf_counter() - start
                    staging.drop()
        finally:
            engine.dispose()
    return total


def add_worker_args(command: list[str], args: Any) -> None:
    """pyperf's workers get our options too."""
    command.extend(["--file-rows", str(args.file_rows)])


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=add_worker_args)
    runner.argparser.add_argument(
        "--file-rows", type=int, default=FILE_ROWS,
        help=f"rows of the CSV and JSONL files read (default {FILE_ROWS:,})",
    )  # fmt: skip
    runner.argparser.add_argument(
        "--jsonl", default=str(REPO / "bench-out" / "micro.jsonl"), metavar="PATH",
        help="one JSON line per benchmark ('-': stdout; default bench-out/micro.jsonl)",
    )  # fmt: skip
    args = runner.parse_args()
    chunk, rows = CHUNK_SIZE, args.file_rows
    cases: list[tuple[str, int, Callable[..., float], tuple[Any, ...]]] = [
        ("split_chunk.audience", chunk, time_split, (audience_rows(chunk), False, "")),
        ("split_chunk.trait_csv_int", chunk, time_split, (trait_text_rows(chunk), True, "int")),
        ("split_chunk.trait_json", chunk, time_split, (trait_json_rows(chunk), True, "")),
        ("read_chunks.csv", rows, time_read, ("members.csv", rows, rows_as_given)),
        ("read_chunks.jsonl", rows, time_read, ("members.jsonl", rows, rows_as_given)),
        ("batches.csv", rows, time_read, ("members.csv", rows, rows_checked)),
        ("stage.sqlite_chunk", chunk, time_stage, (chunk,)),
    ]
    done: list[tuple[str, int, pyperf.Benchmark]] = []
    for name, per_loop, func, func_args in cases:
        bench = runner.bench_time_func(name, func, *func_args, inner_loops=per_loop)
        if bench is not None:
            done.append((name, per_loop, bench))
    if args.worker or not done:
        return  # a worker's results go to the main process, which reports them
    stream = JsonLines(args.jsonl)
    stream.write({"kind": "micro", "id": "micro", **checkout_commit(), "python": sys.version})
    rows_out = []
    for name, per_loop, bench in done:
        values = [v * 1e9 for v in bench.get_values()]
        median = statistics.median(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        stream.write({
            "kind": "measurement", "id": f"micro.{name}.ns_per_row", "scenario": "micro",
            "case": f"micro.{name}", "metric": "ns_per_row", "value": median, "unit": "ns",
            "stdev": spread, "values": len(values), "rows_per_loop": per_loop,
        })  # fmt: skip
        rows_out.append([name, fmt(per_loop, ","), fmt(median, ",.0f"), fmt(spread, ",.0f"),
                         fmt(1e9 / median, ",.0f"), fmt(len(values))])  # fmt: skip
    stream.close()
    out = sys.stderr if args.jsonl == "-" else sys.stdout
    print("\nPer-row hot path (median of pyperf's values):\n", file=out)
    headers = ["benchmark", "rows/loop", "ns/row", "+- stdev", "rows/s", "values"]
    print(table(headers, rows_out), file=out)


if __name__ == "__main__":
    main()
