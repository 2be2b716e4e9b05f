"""A newcomer's walk: the README's quick start, command by command, in a fresh folder: the
demo, a starter config, a dry run, a run against `audience-sync fake-gist`, then against
Gist (another fake standing in for it). If the README stops being true, this fails."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, EXECUTABLE, assert_no_traceback
from tests.helpers import fake_gist_process

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
INSTALL = re.compile(r"^pip install [^&]+&& ")


def quick_start_blocks() -> list[list[str]]:
    """The ``sh`` blocks of the README's "Quick start" (its subsections included), as lines
    without comments."""
    section = README.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [
        [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


def run_shell(lines: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``lines`` in one bash, stopping at the first that fails; each is echoed first."""
    script = "set -e\n" + "".join(
        f"echo {shlex.quote('$ ' + line)}; echo {shlex.quote('$ ' + line)} >&2\n{line}\n"
        for line in lines
    )
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def newcomer_env(home: Path) -> dict[str, str]:
    """A clean shell: this checkout's `audience-sync` on PATH, no API key, no config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GIST_API_KEY", "AUDIENCE_SYNC_CONFIG", "COLUMNS")
    }
    return {**env, "HOME": str(home), "PATH": f"{Path(EXECUTABLE).parent}:{env['PATH']}"}


def test_the_quick_start_is_two_commands_that_work(tmp_path: Path) -> None:
    run_block, test_block, *_ = quick_start_blocks()
    assert len(run_block) == len(test_block) == 1
    # The install halves are what .ci/run does first on a fresh machine (`pip install -e
    # '.[test]' && python -m pytest`, which runs this very test); here the tool is installed.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test]' && python -m pytest" in ci
    assert test_block[0] == "pip install -e '.[test]' && pytest"
    assert INSTALL.match(run_block[0]), run_block[0]
    # A fresh clone's files, in a folder of their own.
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "config.example.toml", clone)
    shutil.copytree(ROOT / "examples", clone / "examples")

    done = run_shell([INSTALL.sub("", run_block[0])], clone, newcomer_env(tmp_path))

    assert done.returncode == 0, done.stdout + done.stderr
    assert_no_traceback(done.stderr)
    assert "Dry run: nothing was sent to Gist." in done.stdout
    assert "order_completed_last_30days" in done.stdout
    assert (clone / "audience_sync.db").exists()


def first_hour_to_gist() -> list[str]:
    """The README's steps after the fake Gist, "then against Gist": its commands in order."""
    section = README.split("\n### The first hour\n", 1)[1].split("\n## ", 1)[0]
    prose = section.split("Then against Gist:", 1)[1].split("Coming from Segment", 1)[0]
    return re.findall(r"`((?:export |rm |audience-sync )[^`]+)`", prose.replace("\n", " "))


def test_the_first_hour_runs_as_written_with_fake_gist_then_gist(
    tmp_path: Path, gist: FakeGist
) -> None:
    *_, first_hour = quick_start_blocks()
    # The fake Gist as the README starts it, on a free port: `audience-sync fake-gist &`.
    start = next(i for i, line in enumerate(first_hour) if line.startswith("audience-sync fake-"))
    assert first_hour[start] == "audience-sync fake-gist &"
    folder = next(line.split()[2] for line in first_hour if line.startswith("audience-sync init "))
    config = f"{folder}/audience_sync.toml"
    with fake_gist_process("--port", "0") as fake:
        lines = list(first_hour)
        # Pasting what it printed: its base_url into [gist], its export line as written.
        lines[start] = f"sed -i 's|^base_url = .*|base_url = \"{fake.base_url}\"|' {config}"
        assert f"export GIST_API_KEY={fake.api_key}" in first_hour
        # Then against Gist, here another fake standing in for it, and its key for yours.
        for line in first_hour_to_gist():
            if line.startswith("export GIST_API_KEY="):
                lines.append(f"export GIST_API_KEY={API_KEY}")
                lines.append(f"sed -i 's|^base_url = .*|base_url = \"{gist.url}\"|' {config}")
            else:
                lines.append(line)
        work = tmp_path / "work"
        work.mkdir()

        done = run_shell(lines, work, newcomer_env(tmp_path))

        in_the_fake = fake.contacts()
    assert done.returncode == 0, done.stdout + done.stderr
    assert_no_traceback(done.stderr)
    assert "3. Nothing changed" in done.stdout  # the demo ran its whole cycle
    assert "Dry run: nothing was sent to Gist." in done.stdout
    members = {"1001", "1002", "1003"}
    # The run against the fake Gist sent every member, and history and show say so.
    assert set(in_the_fake) == members
    assert {c["custom_properties"]["example_members"] for c in in_the_fake.values()} == {True}
    assert "succeeded" in done.stdout.split("$ audience-sync history")[1]
    assert "delivered" in done.stdout.split("$ audience-sync show 2")[1]
    # From a fresh state, the run against Gist sent every member again.
    assert set(gist.contacts()) == members


def test_the_getting_started_walk_is_the_readmes() -> None:
    page = (ROOT / "docs" / "getting-started.md").read_text()
    walk = page.split("The whole walk as commands", 1)[1]
    block = re.findall(r"```sh\n(.*?)```", walk, re.DOTALL)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
    *_, first_hour = quick_start_blocks()
    assert lines == first_hour[: len(lines)]
