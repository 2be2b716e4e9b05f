"""The test suite's own rules: a PostgreSQL test never passes CI by skipping."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests import conftest

TESTS = Path(__file__).parent
# tests/test_model.py decides its store inside one test; it fails first when PostgreSQL is
# required, and the report hook below covers it in any case.
OWN_CHECK = {"test_model.py"}


def test_postgresql_tests_ask_through_the_one_requirement() -> None:
    # A direct pytest.skip about PostgreSQL skips in CI too: 10 tests did (issue 29).
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(TESTS.glob("test_*.py"))
        if path.name not in OWN_CHECK
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"pytest\.skip\(.*postgres", line, re.IGNORECASE)
    ]
    assert offenders == [], "use tests.conftest.require_postgres() instead"


def _report(outcome: str, reason: str) -> pytest.TestReport:
    longrepr: Any = ("tests/test_x.py", 1, f"Skipped: {reason}") if outcome == "skipped" else None
    return pytest.TestReport("tests/test_x.py::test", ("tests/test_x.py", 1, "test"), {},
                             outcome, longrepr, "call")  # type: ignore[arg-type]  # fmt: skip


def _hook(report: pytest.TestReport) -> pytest.TestReport:
    wrapper = conftest.pytest_runtest_makereport(None, None)  # type: ignore[arg-type]
    next(wrapper)
    with pytest.raises(StopIteration) as done:
        wrapper.send(report)
    result = done.value.value
    assert isinstance(result, pytest.TestReport)
    return result


@pytest.mark.parametrize(
    ("required", "reason", "outcome"),
    [
        (True, "PostgreSQL is not reachable at 127.0.0.1:5432", "failed"),
        (True, "needs a postgres server", "failed"),
        (True, "no IPv6 loopback on this machine", "skipped"),
        (False, "PostgreSQL is not reachable at 127.0.0.1:5432", "skipped"),
    ],
    ids=["required-postgresql", "required-postgres", "required-other-reason", "not-required"],
)
def test_a_skip_for_postgresql_fails_when_it_is_required(
    monkeypatch: pytest.MonkeyPatch, required: bool, reason: str, outcome: str
) -> None:
    if required:
        monkeypatch.setenv(conftest.REQUIRE_POSTGRES, "1")
    else:
        monkeypatch.delenv(conftest.REQUIRE_POSTGRES, raising=False)

    report = _hook(_report("skipped", reason))

    assert report.outcome == outcome
    if outcome == "failed":
        assert reason in str(report.longrepr)
