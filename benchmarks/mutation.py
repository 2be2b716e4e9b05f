"""Mutation testing of the modules that decide what is sent: which small breakages of them
(a ``>`` for a ``>=``, a dropped condition, a changed constant) the fast test subset
still lets pass. Prints the mutation score per module and every surviving mutant.

    pip install -e '.[test,mutation]'
    python benchmarks/mutation.py --modules lease.py,fastpath.py   # every mutant of two modules
    python benchmarks/mutation.py --max-mutants 25                 # a seeded sample per module
    python benchmarks/mutation.py --tests-from 936a3d4 ...         # the same, with older tests

It runs mutmut 3 in a scratch copy of the working tree (never in the repository), so the
repository's files, its ``mutants/`` and its caches are left alone. Not part of the test
command: a full run takes hours on two cores (see benchmarks/README.md, "Mutation testing").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "audience_sync"

# The modules that decide what is sent: staging, the row checks, planning (with the
# mass-exit guard and the emails), the fast path, delivery and its acknowledgements, the
# answer classification, leases, events and the shared rate budget. One list, to update as
# modules split (delivery.py is about to become several).
MODULES = (
    "stage.py",
    "rows.py",
    "plaincsv.py",
    "plan.py",
    "fastpath.py",
    "delivery.py",
    "gist.py",
    "lease.py",
    "events.py",
    "budget.py",
)

# The fast subset: in-process tests of those modules' rules (no child processes, whose code
# mutmut does not mutate, and none of the multi-second volume cases). About 3 minutes on
# both stores, 1.5 on SQLite; mutmut runs, for each mutant, only the tests that reach it.
FAST_TESTS = (
    "tests/test_plan.py",
    "tests/test_exactness.py",
    "tests/test_sync.py",
    "tests/test_traits.py",
    "tests/test_backfill.py",
    "tests/test_native.py",  # warehouse-native staging: PostgreSQL only (--stores both)
    "tests/test_fastpath.py::test_any_doubt_means_a_full_diff_that_leaves_gist_equal_to_the_source",
    "tests/test_fastpath.py::test_unchanged_file_after_a_clean_run_skips_load_and_diff",
    "tests/test_fastpath.py::test_gist_edits_are_not_noticed_by_the_fast_path_but_by_verify_repair",
    "tests/test_faults.py::test_a_3xx_answer_acknowledges_nothing",
    "tests/test_batch.py",
    "tests/test_bad_input.py",
    "tests/test_plaincsv.py",
    "tests/test_gist.py",
)
SLOW_CASES = "not 10k and not 200/s"  # volume cases of test_bad_input and test_delivery

# mutmut's exit codes per mutant, as its `results` names them.
STATUS = {
    0: "survived",
    1: "killed",
    3: "killed",
    -11: "killed",
    -9: "killed",
    33: "no tests",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    37: "caught by type check",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    5: "no tests",
    2: "check was interrupted by user",
}


@dataclass
class Mutant:
    name: str
    module: str
    status: str
    line: int | None = None
    diff: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--modules",
        default=",".join(MODULES),
        help="file names under audience_sync/, comma-separated",
    )
    add(
        "--max-mutants",
        type=int,
        default=0,
        help="a seeded sample of this many per module (0: all)",
    )
    add("--seed", type=int, default=29)
    add("--stores", choices=["sqlite", "both"], default="sqlite", help="which cases of the subset")
    add("--tests-from", metavar="REV", help="take tests/ from this git revision (a score before)")
    add("--from-dir", type=Path, help="report on a scratch copy kept by --keep (a run cut short)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--json", type=Path, help="also write the mutants as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args()
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if not (ROOT / PACKAGE / m).is_file()]
    if unknown:
        parser.error(f"no such module: {', '.join(unknown)}")

    started = time.monotonic()
    if args.from_dir:
        # The same modules, sample and seed pick the same mutants; those mutmut did not
        # get to are reported as not run.
        names = listed(args.from_dir, modules)
        chosen = sample(names, args.max_mutants, args.seed)
        report(collect(args.from_dir, chosen), names, 0.0, args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="audience-sync-mutation-"))
    try:
        prepare(work, modules, args.stores, args.tests_from)
        names = generate(work, modules)
        chosen = sample(names, args.max_mutants, args.seed)
        log(f"testing {sum(map(len, chosen.values()))} of {sum(map(len, names.values()))} mutants")
        every = sorted(n for ns in chosen.values() for n in ns)
        mutmut(work, "run", "--max-children", str(args.jobs), *every)
        mutants = collect(work, chosen)
    finally:
        if args.keep:
            log(f"scratch copy kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    report(mutants, names, elapsed, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in mutants], indent=1) + "\n")
    return 0


def log(message: str) -> None:
    print(f"[mutation] {message}", file=sys.stderr, flush=True)


def git(*args: str) -> bytes:
    done = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True)  # noqa: S603, S607
    return done.stdout


def prepare(work: Path, modules: list[str], stores: str, tests_from: str | None) -> None:
    """Copy the tracked files of the working tree (uncommitted edits included) to ``work``,
    optionally with ``tests/`` of another revision, and configure mutmut there."""
    tracked = git("ls-files", "-z").split(b"\0")
    for raw in filter(None, tracked):
        path = Path(raw.decode())
        if (ROOT / path).is_file():
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, work / path)
    if tests_from:
        shutil.rmtree(work / "tests")
        archive = git("archive", tests_from, "tests")
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)  # noqa: S603, S607
    # Older tests may lack a file or a test of the subset: run what exists.
    present = [t for t in FAST_TESTS if _exists(work, t)]
    cases = SLOW_CASES if stores == "both" else f"{SLOW_CASES} and not postgresql"
    selection = [*present, "-k", cases]
    config = ["[mutmut]", f"source_paths = {PACKAGE}"]
    config += ["only_mutate ="] + [f"    {PACKAGE}/{m}" for m in modules]
    config += ["pytest_add_cli_args_test_selection ="] + [f"    {a}" for a in selection]
    config += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider"]
    config += ["also_copy =", "    migrations", "    alembic.ini"]
    # A mutant's tests stop at the first failure; one whose tests run past 10x their clean
    # time (a mutant that loops) counts as killed, by timeout.
    config += ["timeout_multiplier = 10.0", "use_git_change_detection = False"]
    (work / "setup.cfg").write_text("\n".join(config) + "\n")


def _exists(work: Path, test: str) -> bool:
    path, _, name = test.partition("::")
    file = work / path
    return file.is_file() and (not name or f"def {name}(" in file.read_text())


def mutmut(work: Path, *args: str, quiet: bool = False) -> str:
    env = {**os.environ, "CI": "true"}
    done = subprocess.run(  # noqa: S603 - our own mutmut, our own arguments
        [str(Path(sys.executable).with_name("mutmut")), *args],
        cwd=work, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 and not quiet:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        log(f"mutmut {args[0]} exited {done.returncode}:\n{output}")
    return done.stdout


def generate(work: Path, modules: list[str]) -> dict[str, list[str]]:
    """Generate every mutant (no test run: a pattern that names none) and list them by
    module."""
    mutmut(work, "run", "--max-children", "1", f"{PACKAGE}.no_such_module.*", quiet=True)
    return listed(work, modules)


def listed(work: Path, modules: list[str]) -> dict[str, list[str]]:
    """The mutants generated in ``work``, by module."""
    names: dict[str, list[str]] = {}
    for module in modules:
        stem = f"{PACKAGE}.{module.removesuffix('.py')}."
        meta = work / "mutants" / PACKAGE / f"{module}.meta"
        keys = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        names[module] = sorted(k for k in keys if k.startswith(stem))
    return names


def sample(names: dict[str, list[str]], limit: int, seed: int) -> dict[str, list[str]]:
    if limit <= 0:
        return names
    rng = random.Random(seed)
    return {m: sorted(rng.sample(n, min(limit, len(n)))) for m, n in names.items()}


def collect(work: Path, chosen: dict[str, list[str]]) -> list[Mutant]:
    mutants = []
    for module, names in chosen.items():
        meta = work / "mutants" / PACKAGE / f"{module}.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        for name in names:
            code = codes.get(name)
            status = "not checked" if code is None else STATUS.get(code, f"exit {code}")
            mutant = Mutant(name, module, status)
            if status in ("survived", "no tests", "timeout", "suspicious"):
                mutant.diff = mutmut(work, "show", name)
                mutant.line = source_line(work, module, mutant.diff)
            mutants.append(mutant)
    return mutants


def source_line(work: Path, module: str, diff: str) -> int | None:
    """The line of the original module that the mutant changes."""
    removed = [
        line[1:]
        for line in diff.splitlines()
        if line.startswith("-") and not line.startswith("---")
    ]
    if not removed:
        return None
    original = (ROOT / PACKAGE / module).read_text().splitlines()
    hunk = re.search(r"^@@ -(\d+)", diff, re.MULTILINE)
    near = int(hunk.group(1)) if hunk else 0
    matches = [i + 1 for i, text in enumerate(original) if text.strip() == removed[0].strip()]
    return min(matches, key=lambda n: abs(n - near), default=None)


def report(
    mutants: list[Mutant], names: dict[str, list[str]], elapsed: float, args: argparse.Namespace
) -> None:
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for mutant in mutants:
        by_module[mutant.module][mutant.status] += 1
    tests = f"tests from {args.tests_from}" if args.tests_from else "tests of the working tree"
    print(f"mutation testing: {tests}, stores: {args.stores}, seed {args.seed}, "
          f"{elapsed / 60:.1f} min wall")  # fmt: skip
    print()
    print("| module | mutants | tested | killed | survived | no tests | other | not run | score |")
    print("|---|---|---|---|---|---|---|---|---|")
    total: Counter[str] = Counter()
    for module in names:
        counts = by_module[module]
        total.update(counts)
        print(row(module, len(names[module]), counts))
    print(row("all", sum(map(len, names.values())), total))
    print()
    print("Survivors (file:line, the mutation):")
    for mutant in mutants:
        if mutant.status not in ("killed", "not checked"):
            change = " | ".join(
                line[1:].strip()
                for line in mutant.diff.splitlines()
                if line[:1] in "+-" and line[:3] not in ("+++", "---")
            )
            print(
                f"- {PACKAGE}/{mutant.module}:{mutant.line or '?'} [{mutant.status}] {change[:200]}"
            )


def row(module: str, generated: int, counts: Counter[str]) -> str:
    not_run = counts["not checked"]
    tested = sum(counts.values()) - not_run
    killed = counts["killed"]
    other = tested - killed - counts["survived"] - counts["no tests"]
    # The score counts a mutant no test reaches as surviving: nothing would catch it.
    score = f"{killed / tested:.1%}" if tested else "-"
    return (f"| {module} | {generated} | {tested} | {killed} | {counts['survived']} | "
            f"{counts['no tests']} | {other} | {not_run} | {score} |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
