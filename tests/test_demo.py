"""``audience-sync demo --keep DIR``: again and again on one folder, never on someone else's."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience_sync.cli import run_cli


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
