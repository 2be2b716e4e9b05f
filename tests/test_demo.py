"""``audience-sync demo --keep DIR``: again and again on one folder, never on someone else's."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from audience_sync.cli import run_cli
from audience_sync.fakegist import DEFAULT_KEY, DEFAULT_PORT
from tests.conftest import run_process
from tests.helpers import FakeGistExitedError, fake_gist_process


def _first_sync(out: str) -> list[str]:
    lines = out.split("1. First sync")[1].splitlines()
    return [line for line in lines[1:4] if line.strip()]


def test_demo_keep_twice_on_one_folder_starts_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "demo"
    assert run_cli(["demo", "--keep", str(folder)]) == 0
    first = capsys.readouterr().out

    code = run_cli(["demo", "--keep", str(folder)])

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert f"Replaced the earlier demo in {folder}." in out
    # Step 1 sends every member again, to the new fake Gist: 12 VIPs entered, not 0.
    assert _first_sync(out) == _first_sync(first)
    vip = next(line.split() for line in _first_sync(out) if line.startswith("vip_customers"))
    assert vip[:4] == ["vip_customers", "succeeded", "12", "12"]  # members, entered
    assert "3. Nothing changed" in out


def test_demo_keep_refuses_a_folder_with_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")

    code = run_cli(["demo", "--keep", str(tmp_path)])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert "not an earlier demo's (notes.txt); give a new or empty folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_kept_demo_works_afterwards_with_fake_gist_as_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "demo"
    assert run_cli(["demo", "--keep", str(folder)]) == 0
    out = capsys.readouterr().out
    # The commands it prints, run as printed, against `audience-sync fake-gist` at its
    # defaults (port and key): the demo's own fake Gist is gone.
    steps = [line.strip() for line in out.split("another terminal, then:\n")[1].splitlines()]
    export, *commands = [step.split("   #")[0] for step in steps if step]
    assert export == f"export GIST_API_KEY={DEFAULT_KEY}"
    try:
        with fake_gist_process() as fake:
            assert fake.base_url == f"http://127.0.0.1:{DEFAULT_PORT}"
            for command in commands[:-1]:  # the backfills; the run follows an edit
                done = run_process(*shlex.split(command)[1:], env={"GIST_API_KEY": fake.api_key})
                assert done.returncode == 0, done.stdout + done.stderr
            contacts = fake.contacts()
            (folder / "vip.csv").write_text("user_id,email\nu99,user99@example.com\n")
            done = run_process(
                *shlex.split(commands[-1])[1:], "--allow-mass-exit",
                env={"GIST_API_KEY": fake.api_key},
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            after = fake.contacts()
    except FakeGistExitedError as exc:
        if "Address already in use" not in exc.stderr:
            raise
        pytest.skip(f"port {DEFAULT_PORT}, fake-gist's default, is in use on this machine")
    # Both audiences' members as the demo left them, sent again: u3-u19, u30 and u31.
    assert set(contacts) == {f"u{n}" for n in [*range(3, 20), 30, 31]}
    assert after["u99"]["custom_properties"]["vip_customers"] is True
    assert after["u3"]["custom_properties"]["vip_customers"] is False
