"""Compare two benchmark runs (JSON lines of bench_sync.py or micro.py) joined on ``id``:
figures side by side with new / old, and checks whose outcome changed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from report import fmt, table

# Figures where more is better; for every other timed figure less is better.
HIGHER_IS_BETTER = ("_per_s", "speedup", "vs_regular", "share")


def load_lines(path: Path) -> dict[str, dict[str, Any]]:
    """The lines of one run by ``id``."""
    lines: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError as exc:
                raise SystemExit(f"{path}:{number}: not JSON: {exc}") from None
            lines[str(line.get("id"))] = line
    return lines


def verdict(metric: str, ratio: float, tolerance: float) -> str:
    """``better``/``worse`` when ``new / old`` moved past ``tolerance``, else empty."""
    if abs(ratio - 1) <= tolerance:
        return ""
    higher = any(part in metric for part in HIGHER_IS_BETTER)
    return "better" if (ratio > 1) == higher else "worse"


def compare(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], *, tolerance: float, every: bool
) -> str:
    """The comparison as text: numeric figures with a unit, then changed checks."""
    rows = []
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        if a.get("kind") != "measurement" or a.get("unit") is None:
            continue
        if not all(isinstance(x.get("value"), int | float) for x in (a, b)):
            continue
        ratio = b["value"] / a["value"] if a["value"] else float("inf")
        word = verdict(str(a.get("metric", key)), ratio, tolerance)
        if every or word:
            rows.append([key, fmt(a["value"], ".4g"), fmt(b["value"], ".4g"), a["unit"],
                         f"{ratio:.2f}", word])  # fmt: skip
    parts = [
        f"{len(rows)} figures " + ("" if every else f"moved more than {tolerance:.0%}") + ":\n",
        table(["id", "old", "new", "unit", "new/old", ""], rows) if rows else "(none)",
    ]
    flipped = [
        [key, "PASS" if old[key]["passed"] else "FAIL", "PASS" if new[key]["passed"] else "FAIL"]
        for key in sorted(old.keys() & new.keys())
        if old[key].get("kind") == "check" and old[key]["passed"] != new[key].get("passed")
    ]
    parts += ["\nChecks whose outcome changed:\n"]
    parts += [table(["check", "old", "new"], flipped) if flipped else "(none)"]
    only = sorted(
        (key, "old" if key in old else "new")
        for key in old.keys() ^ new.keys()
        if (old.get(key) or new.get(key) or {}).get("kind") == "measurement"
    )
    if only:
        parts += ["\nIn one run only:\n", "\n".join(f"  {where}: {key}" for key, where in only)]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("old", type=Path, help="JSON lines of the earlier commit")
    parser.add_argument("new", type=Path, help="JSON lines of the later commit")
    parser.add_argument(
        "--tolerance", type=float, default=0.05,
        help="show figures whose new/old moved more than this (default 0.05 = 5%%)",
    )  # fmt: skip
    parser.add_argument("--all", action="store_true", help="show every figure both runs have")
    args = parser.parse_args(argv)
    old, new = load_lines(args.old), load_lines(args.new)
    for label, lines in (("old", old), ("new", new)):
        head = lines.get("run") or lines.get("micro") or {}
        print(f"{label}: {head.get('commit', '?')} {'(dirty)' if head.get('dirty') else ''}")
    print(compare(old, new, tolerance=args.tolerance, every=args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
