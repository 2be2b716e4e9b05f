"""``audience-sync demo``: a whole sync cycle against the bundled fake Gist, no account needed."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import IO

from audience_sync import db
from audience_sync.config import load_settings
from audience_sync.errors import ConfigError
from audience_sync.fakegist import DEFAULT_KEY, DEFAULT_PORT, FakeGist
from audience_sync.history import load_runs
from audience_sync.render import render_table
from audience_sync.sync import RunResult, run_once

DEMO_KEY = DEFAULT_KEY  # the fake Gist's key; never a real one
# The demo's config reads its key from the environment, as every config should: the variable
# `audience-sync fake-gist` says to export, so a kept demo works with it afterwards.
KEY_ENV = "GIST_API_KEY"
DEMO_KEY_ENV = "AUDIENCE_SYNC_DEMO_KEY"  # what demos before 0.2 read; still marks their folders
FAKE_GIST_URL = f"http://127.0.0.1:{DEFAULT_PORT}"  # where `audience-sync fake-gist` serves
RUN_COLUMNS = ("audience_key", "status", "members", "entered", "exited", "delivered", "failed")
# Everything a demo writes into its folder (SQLite adds -wal/-shm beside its file).
DEMO_FILES = (
    "audience_sync.toml", "vip.csv", "newsletter.jsonl", "state.db", "state.db-wal",
    "state.db-shm",
)  # fmt: skip


def run_demo(out: IO[str], keep: Path | None = None) -> int:
    """Seed two audiences, sync, change them, sync again, show the history. Returns 0."""
    folder = Path(tempfile.mkdtemp(prefix="audience-sync-demo-")) if keep is None else keep
    replaced = _clear_earlier_demo(folder) if keep is not None else False
    folder.mkdir(parents=True, exist_ok=True)
    tty = out.isatty()
    try:
        with FakeGist(api_key=DEMO_KEY) as gist:
            config = _seed(folder, gist.url)
            settings = load_settings(config, {KEY_ENV: DEMO_KEY})
            engine = db.make_engine(settings.state.url)
            try:
                db.ensure_schema(engine, migrate=True)
                if replaced:
                    out.write(f"Replaced the earlier demo in {folder}.\n")
                out.write(f"Fake Gist at {gist.url}; files in {folder}\n\n")
                out.write("1. First sync: every member is sent `true`.\n")
                _show(out, run_once(settings, engine), tty)
                out.write(
                    f"   Gist now holds {len(gist.contacts())} contacts; one of them:\n   "
                    + json.dumps(gist.contacts()["u3"])
                    + "\n\n"
                )
                _write_members(folder / "vip.csv", [*range(3, 12), 30, 31])
                out.write("2. u0-u2 leave VIP Customers, u30 and u31 join; sync again:\n")
                gist.clear_log()
                _show(out, run_once(settings, engine), tty)
                sent = [r.body for r in gist.requests("/contacts")]
                out.write(f"   {len(sent)} requests, only for the members who changed:\n")
                for body in sent:
                    out.write(f"   {json.dumps(body)}\n")
                out.write("\n3. Nothing changed; a third sync sends nothing:\n")
                gist.clear_log()
                _show(out, run_once(settings, engine), tty)
                out.write(f"   {len(gist.requests())} requests.\n\n4. The history:\n")
                columns = ("run_id", "audience_key", "status", "entered", "exited", "delivered")
                render_table(load_runs(engine), columns, out, tty=tty)
            finally:
                engine.dispose()
        if keep is not None:
            # The demo's fake Gist is gone: point the kept config at the one a user can start.
            _write_config(config, FAKE_GIST_URL)
            out.write(_kept_note(config))
        else:
            out.write("\nRun `audience-sync demo --keep DIR` to keep the files and explore them.\n")
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def _clear_earlier_demo(folder: Path) -> bool:
    """Make ``folder`` ready for a fresh demo: remove an earlier demo's files (each demo
    starts a new, empty fake Gist, so its old state would be wrong), refuse anything else."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise ConfigError(f"demo --keep {folder}: not a folder")
    present = {p.name for p in folder.iterdir()}
    if not present:
        return False
    config = folder / "audience_sync.toml"
    others = present - set(DEMO_FILES)
    text = config.read_text(errors="replace") if config.is_file() else ""
    is_demo = DEMO_KEY_ENV in text or DEMO_KEY in text  # this demo's, or an older one's
    if others or not is_demo:
        raise ConfigError(
            f"demo --keep {folder}: the folder holds files that are not an earlier demo's "
            f"({', '.join(sorted(others or present))}); give a new or empty folder"
        )
    for name in present:
        (folder / name).unlink()
    return True


def _kept_note(config: Path) -> str:
    flag = f"--config {shlex.quote(str(config))}"
    return (
        f"\nThe files are kept: audience-sync history {flag}\n"
        f"Its config now points at `audience-sync fake-gist` ({FAKE_GIST_URL}). Start that in "
        "another terminal, then:\n"
        f"  export {KEY_ENV}={DEMO_KEY}\n"
        # A new fake Gist starts empty, while the state remembers what the demo's held.
        + "".join(
            f"  audience-sync backfill {key} {flag}   # send every member again\n"
            for key in ("vip_customers", "newsletter_signups")
        )
        + f"  audience-sync run {flag}   # after editing vip.csv or newsletter.jsonl\n"
    )


def _seed(folder: Path, gist_url: str) -> Path:
    _write_members(folder / "vip.csv", range(12))
    with (folder / "newsletter.jsonl").open("w") as handle:
        for n in range(8, 20):
            handle.write(json.dumps({"user_id": f"u{n}", "email": f"user{n}@example.com"}) + "\n")
    config = folder / "audience_sync.toml"
    _write_config(config, gist_url)
    return config


def _write_config(config: Path, gist_url: str) -> None:
    config.write_text(
        f"""[state]
url = "sqlite:///state.db"

[gist]
api_key = "${{{KEY_ENV}}}"  # the fake Gist's key: {DEMO_KEY}
base_url = "{gist_url}"
requests_per_second = 50

[[audiences]]
name = "VIP Customers"
file = "vip.csv"

[[audiences]]
name = "Newsletter Signups"
file = "newsletter.jsonl"
"""
    )


def _write_members(path: Path, numbers: range | list[int]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "email"])
        writer.writerows([f"u{n}", f"user{n}@example.com"] for n in numbers)


def _show(out: IO[str], results: list[RunResult], tty: bool) -> None:
    rows = [
        {"audience_key": r.audience_key, **{c: getattr(r, c) for c in RUN_COLUMNS[1:]}}
        for r in results
    ]
    render_table(rows, RUN_COLUMNS, out, tty=tty)
