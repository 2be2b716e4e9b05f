"""``audience-sync init``: a starter config that works as written, and never an overwrite."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, EXECUTABLE, assert_no_traceback, run_process


def test_init_writes_a_config_that_runs_and_prints_the_next_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "my-sync"

    code = run_cli(["init", str(folder)])

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    config = folder / "audience_sync.toml"
    assert config.read_text().startswith("# audience-sync configuration")
    assert (folder / "members.csv").read_text().startswith("user_id,email\n")
    commands = [line.split("#")[0].strip() for line in out.splitlines()[1:]]
    assert commands == [
        f"GIST_API_KEY=placeholder audience-sync run --config {config} --dry-run",
        f"export GIST_API_KEY=...; audience-sync run --config {config}",
    ]
    # The first printed command works as printed.
    # The command line init printed, run by a shell as a user would.
    done = subprocess.run(  # noqa: S602
        commands[0].replace("audience-sync", EXECUTABLE, 1),
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "example_members" in done.stdout
    assert "nothing was sent" in done.stdout


def test_init_in_the_current_folder_needs_no_config_flag(tmp_path: Path, gist: FakeGist) -> None:
    done = run_process("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--config" not in done.stdout

    # Pointed at (a fake) Gist, the starter syncs its example members.
    config = tmp_path / "audience_sync.toml"
    config.write_text(config.read_text().replace("https://api.getgist.com", gist.url))
    done = run_process("run", cwd=tmp_path, env={"GIST_API_KEY": API_KEY})
    assert done.returncode == 0, done.stderr
    assert set(gist.contacts()) == {"1001", "1002", "1003"}
    assert gist.contacts()["1001"]["custom_properties"] == {"example_members": True}


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "members.csv").write_text("mine\n")

    code = run_cli(["init", str(tmp_path)])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    existing = tmp_path / "members.csv"
    assert err == f"error: {existing} already exists; init never overwrites a file\n"
    assert (tmp_path / "members.csv").read_text() == "mine\n"
    assert not (tmp_path / "audience_sync.toml").exists()  # nothing half-written
    assert_no_traceback(err)
