"""The wheel: a non-editable install carries its migrations and migrates from anywhere."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_wheel_migrates_a_new_state_file(tmp_path: Path) -> None:
    # Built from a copy, so setuptools' build/ folder never lands in the checkout.
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("audience_sync", "migrations"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    # `pip install .` as a user runs it (a real build, no editable link); the dependencies are
    # lent from this environment so the test needs no download beyond the build backend.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "."],
        cwd=tree,
        check=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "lent-dependencies.pth").write_text("\n".join(sorted(lent)) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "audience_sync.toml").write_text(
        '[state]\nurl = "sqlite:///state.db"\n[gist]\napi_key = "k"\n'
        '[[audiences]]\nname = "VIP"\nfile = "vip.csv"\n'
    )
    (elsewhere / "vip.csv").write_text("user_id,email\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    located = subprocess.run(
        [str(python), "-c", "import audience_sync.db as d; print(d.migrations_dir())"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(located).is_relative_to(Path(site)), located  # the wheel's copy, not the tree's

    done = subprocess.run(
        [str(target / "bin" / "audience-sync"), "db", "upgrade"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(elsewhere / "state.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"memberships", "member_changes", "sync_runs"} <= tables
    assert version == max(p.name[:4] for p in (ROOT / "migrations" / "versions").glob("0*.py"))
