"""The recipes in examples/ work as written: the crontab's lines, run as cron runs them, let a
failure reach cron (a non-zero status and output to mail) and keep a success silent; the
systemd units pass `systemd-analyze verify` and stop within the daemon's SIGTERM bound."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from audience_sync.config import GistConfig
from audience_sync.fakegist import FakeGist
from audience_sync.scheduler import STOP_MARGIN_SECONDS
from tests.conftest import API_KEY, EXECUTABLE

ROOT = Path(__file__).resolve().parent.parent
CRONTAB = ROOT / "examples" / "cron" / "crontab"
UNITS = sorted((ROOT / "examples" / "systemd").glob("*.service"))
INSTALLED = "/srv/audience-sync/.venv/bin/audience-sync"  # where the crontab expects the tool
# Five time fields, then the command; `# ` before them: a variant, commented out.
JOB = re.compile(r"^(# )?((?:[\d*/,-]+\s+){5})(.+)$")


def crontab() -> tuple[dict[str, str], list[str]]:
    """The crontab's variables and its job commands, the active one and commented variants."""
    variables: dict[str, str] = {}
    jobs: list[str] = []
    for line in CRONTAB.read_text().splitlines():
        if re.match(r"^[A-Z_]+=", line):
            name, value = line.split("=", 1)
            variables[name] = value
        elif job := JOB.match(line):
            jobs.append(job[3].strip())
    return variables, jobs


def run_as_cron(
    command: str, tmp_path: Path, config: Path, **variables: str
) -> subprocess.CompletedProcess[str]:
    """``command`` as cron runs it: the crontab's SHELL with ``-c``, cron's bare environment
    plus the crontab's variables (``variables`` replace some), output captured (what cron
    would mail)."""
    written, _ = crontab()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LOGNAME": "audience-sync",
        **written,
        "AUDIENCE_SYNC_CONFIG": str(config),
        **variables,
    }
    command = command.replace(INSTALLED, EXECUTABLE).replace("/srv/audience-sync", str(tmp_path))
    assert "%" not in command  # cron would read a % as a new line
    return subprocess.run(
        [env["SHELL"], "-c", command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def write_config(tmp_path: Path, gist: FakeGist) -> Path:
    (tmp_path / "members.csv").write_text("user_id,email\n1,a@example.com\n2,b@example.com\n")
    config = tmp_path / "audience_sync.toml"
    config.write_text(
        '[state]\nurl = "sqlite:///state.db"\n\n[gist]\napi_key = "${GIST_API_KEY}"\n'
        f'base_url = "{gist.url}"\nmax_retries = 0\n\n'
        '[[audiences]]\nname = "Members"\nfile = "members.csv"\n'
    )
    return config


def test_the_crontab_has_one_active_job_and_a_variant_that_keeps_a_log() -> None:
    variables, jobs = crontab()
    assert variables["SHELL"] == "/bin/bash"  # `set -o pipefail` is bash's
    assert len(jobs) == 2
    assert jobs[0] == f"{INSTALLED} run --quiet"
    assert jobs[1].startswith("set -o pipefail; ")
    commented = [
        bool(job[1]) for line in CRONTAB.read_text().splitlines() if (job := JOB.match(line))
    ]
    assert commented == [False, True]  # two active lines would sync twice


@pytest.mark.slow
@pytest.mark.parametrize("job", [0, 1], ids=["quiet", "with-a-log"])
def test_a_failing_run_under_the_cron_recipe_reaches_cron(
    job: int, tmp_path: Path, gist: FakeGist
) -> None:
    command = crontab()[1][job]
    config = write_config(tmp_path, gist)
    # The crontab's placeholder key: Gist refuses it, and the run fails.
    failed = run_as_cron(command, tmp_path, config)

    assert failed.returncode == EXIT_FAILED, failed.stdout + failed.stderr
    mailed = failed.stdout + failed.stderr
    assert "error: members: " in mailed
    assert "Gist refused the API key" in mailed
    if job == 1:
        assert "Gist refused the API key" in (tmp_path / "cron.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("job", [0, 1], ids=["quiet", "with-a-log"])
def test_a_successful_run_under_the_cron_recipe_is_silent(
    job: int, tmp_path: Path, gist: FakeGist
) -> None:
    command = crontab()[1][job]
    config = write_config(tmp_path, gist)

    # The crontab's placeholder key replaced by a real one: here, the fake Gist's.
    done = run_as_cron(command, tmp_path, config, GIST_API_KEY=API_KEY)

    assert (done.returncode, done.stdout, done.stderr) == (EXIT_OK, "", "")  # nothing to mail
    assert set(gist.contacts()) == {"1", "2"}


@pytest.mark.slow
def test_without_pipefail_a_pipe_hides_the_failure_from_cron(
    tmp_path: Path, gist: FakeGist
) -> None:
    # Why the variant sets pipefail: the same pipe without it reports tee's status, 0.
    command = crontab()[1][1].removeprefix("set -o pipefail; ")
    config = write_config(tmp_path, gist)

    done = run_as_cron(command, tmp_path, config)

    assert done.returncode == EXIT_OK
    assert "Gist refused the API key" in done.stdout


def unit_settings(unit: Path) -> dict[str, str]:
    """``Key=value`` lines of a unit (the last one wins, as systemd reads single values)."""
    found: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if re.match(r"^[A-Za-z]+=", line):
            key, value = line.split("=", 1)
            found[key] = value
    return found


def test_the_daemon_unit_stops_within_the_sigterm_bound_and_restarts_on_failure() -> None:
    unit = unit_settings(ROOT / "examples" / "systemd" / "audience-sync.service")
    assert unit["ExecStart"].endswith("audience-sync daemon")
    # The daemon stops within gist.timeout_seconds + 10 s of SIGTERM; systemd must wait that
    # long before its SIGKILL (with the default timeout; the unit says to raise both).
    bound = GistConfig.model_fields["timeout_seconds"].default + STOP_MARGIN_SECONDS
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["KillMode"] == "mixed"  # SIGTERM to the daemon alone, SIGKILL to all
    assert float(unit["TimeoutStopSec"]) > bound
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == str(EXIT_USAGE)  # config errors: no loop
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_the_systemd_units_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here, so the unit cannot be verified")
    # verify checks that ExecStart's program exists: this checkout's, in the unit's place.
    copy = tmp_path / unit.name
    copy.write_text(
        unit.read_text().replace("/opt/audience-sync/.venv/bin/audience-sync", EXECUTABLE)
    )

    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "audience-sync" not in done.stderr, done.stderr  # no warning about our unit
