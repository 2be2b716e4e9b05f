"""The no-change fast path: an unchanged file with nothing owed skips load and diff, and any
doubt gives a full diff that sends what is owed."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, text, update

from audience_sync import ledger
from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from audience_sync.history import load_run, load_runs, prune
from audience_sync.models import member_changes, memberships, sync_runs
from audience_sync.runs import utcnow
from audience_sync.sync import RunResult, run_once
from audience_sync.verify import verify_audience
from tests.conftest import API_KEY, Workspace, write_csv, write_members
from tests.helpers import KEY, acknowledged, in_gist, users

NAME = "Order Completed Last 30days"


def sync(workspace: Workspace, engine: Engine, **options: Any) -> RunResult:
    [result] = run_once(workspace.settings(), engine, **options)
    return result


def sync_key(workspace: Workspace, engine: Engine, **options: Any) -> RunResult:
    """Run every configured audience; the result of the file audience under test (KEY)."""
    [result] = [
        r for r in run_once(workspace.settings(), engine, **options) if r.audience_key == KEY
    ]
    return result


def rewrite(path: Path) -> None:
    """Write the file's own bytes again: a new mtime, the same content."""
    data = path.read_bytes()
    time.sleep(0.01)
    path.write_bytes(data)


@pytest.fixture
def synced(workspace: Workspace, engine: Engine, gist: FakeGist) -> Path:
    """An audience of u0..u9 fully acknowledged by a first run; the log cleared."""
    source = workspace.add_file_audience(NAME)
    write_members(source, range(10))
    first = sync(workspace, engine)
    assert (first.status, first.delivered, first.fast_path) == ("succeeded", 10, False)
    gist.clear_log()
    return source


def test_unchanged_file_after_a_clean_run_skips_load_and_diff(
    workspace: Workspace, engine: Engine, gist: FakeGist, synced: Path
) -> None:
    rewrite(synced)

    run = sync(workspace, engine)

    assert (run.status, run.fast_path, run.entered, run.exited) == ("succeeded", True, 0, 0)
    assert (run.members, run.source_rows) == (10, 10)  # what the unchanged file holds
    assert gist.requests() == []
    [recorded, first] = load_runs(engine, KEY, 2)
    assert (recorded["status"], recorded["fast_path"], first["fast_path"]) == (
        "succeeded", True, False,
    )  # fmt: skip
    with engine.connect() as connection:
        digests = list(connection.scalars(select(sync_runs.c.source_digest)))
    assert digests == [hashlib.sha256(synced.read_bytes()).hexdigest()] * 2
    # A further change of the file is a full diff that sends it.
    write_members(synced, range(1, 11))
    changed = sync(workspace, engine)
    assert (changed.fast_path, changed.entered, changed.exited) == (False, 1, 1)
    assert in_gist(gist) == acknowledged(engine) == users(*range(1, 11))


def test_show_and_run_output_tell_a_fast_path_run_apart(
    workspace: Workspace, engine: Engine, synced: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", str(workspace.config_path)]
    os.environ.setdefault("GIST_API_KEY", API_KEY)
    assert run_cli(["run", *config]) == 0
    out = capsys.readouterr().out
    assert "load and diff skipped (fast path; --full-diff forces them)" in out
    run_id = load_runs(engine, KEY, 1)[0]["run_id"]
    assert run_cli(["show", str(run_id), *config]) == 0
    assert "fast_path:       yes" in capsys.readouterr().out
    assert run_cli(["run", "--full-diff", *config]) == 0
    assert "fast path" not in capsys.readouterr().out
    assert load_run(engine, run_id + 1) is not None
    assert load_runs(engine, KEY, 1)[0]["fast_path"] is False


def _change_byte(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    data = source.read_bytes()
    stat = source.stat()
    source.write_bytes(data.replace(b"u3@example.com", b"u3@examplf.com"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    return {}


def _previous_run_failed(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    write_members(source, range(11))  # u10 enters, and Gist refuses it
    gist.fail_user("u10")
    assert sync(workspace, engine).status == "partial"
    gist.reset_faults()
    return {}


def _uncertain_member(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    write_members(source, range(11))  # u10 enters; its answer is lost after Gist applied it
    gist.drop_after_applying(1)
    workspace.gist_options.update(max_retries=0)
    workspace.write_config()
    assert sync(workspace, engine).status != "succeeded"
    gist.reset_faults()
    workspace.gist_options.update(max_retries=3)
    workspace.write_config()
    # The run after it is a full diff that settles u10 ...
    settled = sync(workspace, engine)
    assert (settled.status, settled.fast_path, settled.entered) == ("succeeded", False, 1)
    # ... and leaves nothing owed; now lose an answer of an exit and try the same file again.
    gist.drop_after_applying(1)
    workspace.gist_options.update(max_retries=0)
    workspace.write_config()
    write_members(source, range(10))
    assert sync(workspace, engine).status != "succeeded"
    gist.reset_faults()
    workspace.gist_options.update(max_retries=3)
    workspace.write_config()
    return {}


def _property_changed(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    # Same key, same file; what would be sent differs (events now owed for changes).
    workspace.audiences[0].update(key=KEY, send_track=True)
    workspace.write_config()
    return {}


def _file_path_changed(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    # The identity of the source: another file with the same bytes.
    copy = source.with_name("copy.jsonl")
    copy.write_bytes(source.read_bytes())
    workspace.audiences[0].update(file=copy.name)
    workspace.write_config()
    return {}


def _api_key_changed(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    workspace.env["GIST_API_KEY"] = API_KEY + "-rotated"
    return {}


def _full_diff_flag(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    return {"full_diff": True}


def _previous_dry_run(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    dry = sync(workspace, engine, dry_run=True)
    assert (dry.kind, dry.fast_path) == ("dry-run", False)  # a dry run always diffs
    return {}


def _previous_backfill(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    gist.fail_next(100, 503)
    workspace.gist_options.update(max_retries=0)
    workspace.write_config()
    assert sync(workspace, engine, mode="backfill").status == "failed"
    gist.reset_faults()
    workspace.gist_options.update(max_retries=3)
    workspace.write_config()
    return {}


def _verify_repair(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    gist.edit_contact("u4", {KEY: False})  # someone edits Gist; the source did not change
    report = verify_audience(workspace.settings(), engine, KEY, sample=100, repair=True)
    assert report.repaired == 1
    return {}


def _digest_of_an_older_hash(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    # A state written before file sources were hashed with SHA-256 (they were BLAKE2b-256).
    older = hashlib.blake2b(source.read_bytes(), digest_size=32).hexdigest()
    with engine.begin() as connection:
        connection.execute(update(sync_runs).values(source_digest=older))
    return {}


def _rejected_rows(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    with source.open("a") as handle:
        handle.write('{"user_id": "u99", "email": "not an email"}\n')
    ran = sync(workspace, engine)  # the file changed: a full diff, which rejects the row
    assert (ran.status, ran.fast_path, ran.rejected) == ("succeeded", False, 1)
    return {}


def _email_conflicts(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    # Another audience, configured first, gives u3 another email: the file's own email for
    # u3 is overruled, and the run records the conflict.
    other = workspace.root / "other.jsonl"
    write_members(other, [("u3", "u3@elsewhere.example.com")])
    workspace.audiences.insert(0, {"name": "VIP Customers", "file": other.name})
    workspace.write_config()
    ran = sync_key(workspace, engine)
    assert (ran.status, ran.fast_path, ran.email_conflicts) == ("succeeded", False, 1)
    return {}


def _owed_event(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    # A delivered change whose track event Gist refused: the event is still owed.
    workspace.audiences[0].update(send_track=True)
    workspace.write_config()
    write_members(source, range(11))  # u10 enters: its contact goes through, its event not
    gist.fail_after(1, 422, message="Event refused")
    ran = sync(workspace, engine)
    gist.reset_faults()
    assert (ran.status, ran.delivered, gist.events()) == ("succeeded", 1, [])
    with engine.connect() as connection:
        owed = connection.execute(
            select(
                member_changes.c.status, member_changes.c.event_status, member_changes.c.event_error
            ).where(member_changes.c.user_id == "u10")
        ).all()
    assert [tuple(row) for row in owed] == [("delivered", "failed", "HTTP 422: Event refused")]
    return {}


def _pending_change(
    workspace: Workspace, engine: Engine, source: Path, gist: FakeGist
) -> dict[str, Any]:
    # A change of the last (succeeded) run that was never sent: no public path leaves one,
    # so the state is written as a crash between planning and sending would have left it.
    with engine.begin() as connection:
        connection.execute(
            update(member_changes)
            .where(member_changes.c.user_id == "u3")
            .values(status="pending", delivered_at=None, http_status=None, attempts=0)
        )
        connection.execute(delete(memberships).where(memberships.c.user_id == "u3"))
    gist.edit_contact("u3", {KEY: False})
    return {}


Doubt = Callable[[Workspace, Engine, Path, FakeGist], dict[str, Any]]
DOUBTS: list[Any] = [
    pytest.param(_change_byte, id="one-byte-changed-same-size-and-mtime"),
    pytest.param(_previous_run_failed, id="previous-run-partial"),
    pytest.param(_uncertain_member, id="uncertain-member-left"),
    pytest.param(_property_changed, id="config-change-of-the-key-settings"),
    pytest.param(_file_path_changed, id="config-change-of-the-source-identity"),
    pytest.param(_api_key_changed, id="another-gist-api-key"),
    pytest.param(_full_diff_flag, id="full-diff-flag"),
    pytest.param(_previous_dry_run, id="previous-run-dry-run"),
    pytest.param(_previous_backfill, id="unfinished-backfill"),
    pytest.param(_verify_repair, id="verify-repair-replan"),
    pytest.param(_digest_of_an_older_hash, id="digest-recorded-by-blake2b"),
    pytest.param(_rejected_rows, id="last-run-rejected-rows"),
    pytest.param(_email_conflicts, id="last-run-had-email-conflicts"),
    pytest.param(_owed_event, id="track-event-owed-for-a-delivered-change"),
    pytest.param(_pending_change, id="change-pending"),
]
# Doubts that stay while their cause does: the full diff that follows them does not lift
# them (the next run of the same file diffs again, and sends nothing). A stopped backfill
# is no longer one once a run of its key came after it: the next backfill starts over
# (runs.unfinished_backfills), so that full diff lifts it.
LASTING = {"last-run-rejected-rows", "last-run-had-email-conflicts"}
# What the full diff records that the fast path would not have.
RECORDED = {"last-run-rejected-rows": {"rejected": 1}, "last-run-had-email-conflicts": {
    "email_conflicts": 1}}  # fmt: skip


@pytest.mark.parametrize("doubt", DOUBTS)
def test_any_doubt_means_a_full_diff_that_leaves_gist_equal_to_the_source(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    synced: Path,
    doubt: Doubt,
    request: pytest.FixtureRequest,
) -> None:
    [case] = [str(p.id) for p in DOUBTS if p.values[0] is doubt]
    options = doubt(workspace, engine, synced, gist)

    run = sync_key(workspace, engine, **options)

    assert (run.status, run.fast_path) == ("succeeded", False)
    for name, value in RECORDED.get(case, {}).items():
        assert getattr(run, name) == value, name
    members = {u for u in acknowledged(engine)}
    assert in_gist(gist) == members
    # Once that full diff settled everything, the same file takes the fast path again.
    gist.clear_log()
    again = sync_key(workspace, engine)
    spared = case not in LASTING
    assert (again.status, again.fast_path, again.members) == ("succeeded", spared, len(members))
    assert gist.requests() == []


def test_a_failed_delivery_is_sent_by_the_next_run_of_the_same_file(
    workspace: Workspace, engine: Engine, gist: FakeGist, synced: Path
) -> None:
    write_members(synced, range(12))
    gist.fail_next(1000, 503)
    workspace.gist_options.update(max_retries=0)
    workspace.write_config()
    failed = sync(workspace, engine)
    assert failed.status == "failed"
    gist.reset_faults()

    owed = sync(workspace, engine)  # the same bytes as the failed run read

    assert (owed.status, owed.fast_path, owed.entered, owed.delivered) == ("succeeded", False, 2, 2)
    assert in_gist(gist) == users(*range(12))


def test_a_run_killed_mid_delivery_never_lets_the_same_file_skip_what_is_owed(
    workspace: Workspace, engine: Engine, gist: FakeGist, synced: Path
) -> None:
    write_members(synced, range(300))
    gist.latency = 0.05
    workspace.gist_options.update(max_concurrency=1)
    workspace.write_config()
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(workspace.config_path)],
        env={**os.environ, **workspace.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while len(gist.requests("/contacts")) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(gist.requests("/contacts")) < 290, "the kill came too late to test anything"
    gist.latency = 0
    with engine.begin() as connection:  # the lease of a killed process: expired at once
        connection.exec_driver_sql("DELETE FROM leases")

    after = sync(workspace, engine)

    assert (after.status, after.fast_path) == ("succeeded", False)
    assert in_gist(gist) == acknowledged(engine) == users(*range(300))


def test_gist_edits_are_not_noticed_by_the_fast_path_but_by_verify_repair(
    workspace: Workspace, engine: Engine, gist: FakeGist, synced: Path
) -> None:
    gist.edit_contact("u2", {KEY: False})

    # The fast path is about the source: like a full diff, it does not read Gist back.
    fast = sync(workspace, engine)
    assert (fast.fast_path, gist.requests()) == (True, [])
    full = sync(workspace, engine, full_diff=True)
    assert (full.fast_path, full.entered, gist.requests()) == (False, 0, [])
    assert gist.properties(KEY)["u2"] is False

    report = verify_audience(workspace.settings(), engine, KEY, sample=100, repair=True)
    assert [d.user_id for d in report.drifted] == ["u2"]
    gist.clear_log()
    repaired = sync(workspace, engine)  # the repair disables the fast path once

    assert repaired.fast_path is False
    assert [r.body["user_id"] for r in gist.requests("/contacts")] == ["u2"]
    assert in_gist(gist) == users(*range(10))
    assert sync(workspace, engine).fast_path is True


def test_another_source_changing_a_members_email_disables_the_fast_path(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    first = workspace.add_file_audience("VIP Customers")  # configured first: its email wins
    second = workspace.add_file_audience("Newsletter Signups")
    write_members(first, [1, 2])
    write_members(second, [2, 3])
    run_once(workspace.settings(), engine)
    write_members(first, [1, (("u2", "new@example.com"))])
    gist.clear_log()

    _, news = run_once(workspace.settings(), engine)

    assert (news.fast_path, news.email_conflicts, news.resent) == (False, 1, 1)
    [request] = gist.requests("/contacts")
    assert request.body["email"] == "new@example.com"
    assert request.body["custom_properties"] == {
        "vip_customers": True,
        "newsletter_signups": True,
    }


def test_an_exit_elsewhere_carries_the_email_of_the_unread_file(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # u2 leaves the first audience; the second, unchanged, still has u2: the exit carries
    # its email. (Gist holds the first's email for u2 since the first ran alone, so the
    # second's stored email drifted from Gist's: it is read, not spared, and the full diff
    # that puts Gist right — sending u2 again in the same request, its contact's email
    # not the second's — takes the fast path's place until then.)
    first = workspace.add_file_audience("VIP Customers")
    second = workspace.add_file_audience("Newsletter Signups")
    write_members(first, [1])
    write_members(second, [(("u2", "second@example.com"))])
    run_once(workspace.settings(), engine)
    write_members(first, [1, (("u2", "first@example.com"))])
    run_once(workspace.settings(), engine, keys=["vip_customers"])  # u2 acked with first@
    write_members(first, [1])
    gist.clear_log()

    vip, news = run_once(workspace.settings(), engine)

    assert (vip.exited, news.fast_path, news.resent) == (1, False, 1)
    [request] = gist.requests("/contacts")
    assert request.body["email"] == "second@example.com"
    assert request.body["custom_properties"] == {"vip_customers": False, "newsletter_signups": True}
    assert [r.fast_path for r in run_once(workspace.settings(), engine)] == [True, True]


def test_schedule_changes_keep_the_fast_path_and_traits_never_take_it(
    workspace: Workspace, engine: Engine, gist: FakeGist, synced: Path
) -> None:
    workspace.audiences[0].update(every="15m")
    workspace.write_config()
    assert sync(workspace, engine).fast_path is True

    trait = workspace.root / "score.csv"
    write_csv(trait, [{"user_id": "u1", "email": "u1@example.com", "value": "5"}])
    workspace.traits.append({"name": "Score", "file": trait.name, "type": "int"})
    workspace.write_config()
    run_once(workspace.settings(), engine, keys=["score"])
    [again] = run_once(workspace.settings(), engine, keys=["score"])
    assert (again.status, again.fast_path) == ("succeeded", False)


def test_the_fingerprint_holds_no_secret_in_clear(
    workspace: Workspace, engine: Engine, synced: Path
) -> None:
    with engine.connect() as connection:
        stored = list(connection.execute(select(sync_runs)).mappings())
    assert stored
    assert not any(API_KEY in str(value) for row in stored for value in row.values())
    with engine.begin() as connection:
        connection.execute(update(sync_runs).values(config_fingerprint=None))
    assert sync(workspace, engine).fast_path is False  # a run from before the fingerprint


@pytest.mark.parametrize(
    "state_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_large_delivery_vacuums_the_uncertainty_it_settled_on_postgresql(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every change in flight had an uncertain_members row: left to a (possibly disabled)
    # autovacuum, a million dead index entries slowed every later fast-path check.
    monkeypatch.setattr(ledger, "VACUUM_AFTER", 5)
    source = workspace.add_file_audience(NAME)

    def vacuums() -> int:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            count = connection.scalar(
                text(
                    "SELECT vacuum_count FROM pg_stat_user_tables "
                    "WHERE schemaname = current_schema() AND relname = 'uncertain_members'"
                )
            )
        return int(count)

    write_members(source, range(4))
    assert sync(workspace, engine).delivered == 4
    assert vacuums() == 0  # fewer than VACUUM_AFTER settled: left to autovacuum
    write_members(source, range(4, 10))
    assert sync(workspace, engine).delivered == 10  # 6 entered, 4 exited
    assert vacuums() == 1
    assert sync(workspace, engine).fast_path
    assert in_gist(gist) == acknowledged(engine) == users(*range(4, 10))


def test_an_email_sent_by_one_audience_alone_is_corrected_when_both_run(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """Audiences A and B both hold u1; B's email for u1 changes and only B runs, so Gist gets
    B's email. A full diff of both then sends A's (the first configured source's): the fast
    path must plan exactly that, not keep B's for good."""
    first = workspace.add_file_audience("VIP Customers")
    second = workspace.add_file_audience("Newsletter Signups")
    write_members(first, [1, 2])
    write_members(second, [1, 3])
    run_once(workspace.settings(), engine)
    write_members(second, [(("u1", "second@example.com")), 3])
    [news] = run_once(workspace.settings(), engine, keys=["newsletter_signups"])
    assert (news.resent, gist.contacts()["u1"]["email"]) == (1, "second@example.com")
    gist.clear_log()

    vip, news = run_once(workspace.settings(), engine)

    assert (vip.fast_path, news.fast_path) == (False, False)
    assert gist.contacts()["u1"]["email"] == "u1@example.com"
    gist.clear_log()
    vip, news = run_once(workspace.settings(), engine)
    # The files still disagree on u1: the second's rows keep conflicting, so both are read
    # (a full diff each time, which sends nothing).
    assert (vip.fast_path, news.fast_path, news.email_conflicts) == (False, False, 1)
    assert gist.requests() == []


def test_a_refused_change_owes_no_event_and_the_fast_path_comes_back(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience(NAME, send_track=True)
    write_members(source, range(3))
    sync(workspace, engine)
    write_members(source, range(4))  # u3 enters; Gist refuses it
    gist.fail_user("u3")
    assert sync(workspace, engine).status == "partial"
    gist.reset_faults()
    assert sync(workspace, engine).delivered == 1  # u3 sent again, acknowledged
    gist.clear_log()

    again = sync(workspace, engine)

    assert (again.status, again.fast_path) == ("succeeded", True)
    assert gist.requests() == []
    with engine.connect() as connection:
        refused = connection.execute(
            select(member_changes.c.event_status).where(member_changes.c.status == "failed")
        ).scalar_one()
    assert refused is None  # nothing owed for what Gist never applied
    # And prune lets the refused change go with its run.
    deleted = prune(engine, utcnow() + timedelta(days=1))
    assert deleted["member_changes"] >= 1
