"""The wheel: a non-editable install carries its migrations and migrates from anywhere, and
its pages' templates and style sheet, which it serves."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

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

    # The pages from the wheel's own templates and style sheet, not the checkout's.
    port = free_port()
    ui = subprocess.Popen(
        [str(target / "bin" / "audience-sync"), "ui", "--port", str(port)],
        cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        page = _get_when_up(f"http://127.0.0.1:{port}/", ui)
        style = httpx.get(f"http://127.0.0.1:{port}/static/style.css", timeout=5)
    finally:
        ui.terminate()
        _, err = ui.communicate(timeout=20)
    assert ui.returncode == 0, err
    assert page.status_code == 200
    assert "No runs yet" in page.text
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert style.text == (ROOT / "audience_sync" / "web" / "static" / "style.css").read_text()
    served_from = subprocess.run(
        [str(python), "-c", "import audience_sync.web.app as a; print(a.HERE)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(served_from).is_relative_to(Path(site)), served_from


def _get_when_up(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)
