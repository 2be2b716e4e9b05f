"""The proof of exactness: a Hypothesis state machine drives the real engine (real state
database, real HTTP to the fake Gist) through interleavings nobody wrote down, against a
simple model of the sources, and checks after every clean run that Gist holds exactly the
source, the state database holds exactly what Gist holds, a further run sends nothing, and
every acknowledged entry and exit produced its event.

Rules: members enter, leave and re-enter; emails change, for every source at once or in one
source only (so audiences sharing a user disagree on its email); duplicate rows of a user
with another email (and value); trait values change type, go null and disappear
(``on_missing`` null and keep); numeric user ids arrive as ``42``, ``"42"`` or ``42.0``;
runs of all keys or a subset, of unchanged files too (the no-change fast path), and with
``--full-diff``; faults per request (5xx, 429, 401, a per-user 422, each user's next
event refused with a 422, a batch answer naming a failed contact, the answer lost after Gist
applied the change, the connection dropped before); a kill at a chosen step (loading,
planned, after some answers); a real ``run`` process stopped (SIGSTOP) past a short lease
while another takes over, then woken; backfill; retire and re-adding a key as the other
kind; Gist losing an audience's values then ``backfill`` (stopped and run again until it
succeeds); an edit made in Gist behind the tool's back followed by ``verify --repair``; Gist
changed behind the tool's back and read back by ``reconcile``, which may stop half-way and
be continued after a run of its keys; prune. Keys with and without ``send_track``, turned
on and off by a rule.
Delivery reads its pages of changes (one page ahead of what it sends) at the default size,
or at 1 or 3 changes, fewer than a user's can fill.

Every key reads one of the source kinds the tool reads, drawn per key and switched by a rule:
a JSONL or CSV file, a SQL query on a SQLite warehouse (attached to the state database and
staged there on a SQLite store, read through Python on a PostgreSQL store), a
warehouse-native query (PostgreSQL store: staged by SQL in the state database), or a
Segment Engage export. (Traits read JSONL or Engage exports: the others cannot hold a
value's JSON type.) Every code path that decides what is sent joins this machine in the
commit that adds it.

CI runs a fixed, seeded profile on SQLite and PostgreSQL; ``HYPOTHESIS_PROFILE=long`` runs
a thousand examples per store.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from audience_sync import db, delivery, lease
from audience_sync.config import load_settings
from audience_sync.fakegist import FakeGist
from audience_sync.history import prune
from audience_sync.models import (
    audiences,
    member_changes,
    memberships,
    trait_values,
    uncertain_members,
)
from audience_sync.models import contacts as contacts_table
from audience_sync.reconcile import reconcile
from audience_sync.runs import utcnow
from audience_sync.statuses import Mode
from audience_sync.sync import RunResult, run_once
from audience_sync.verify import verify_audience
from audience_sync.workers import Presence
from tests.conftest import API_KEY, require_postgres

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", 1000 if LONG else 25))
STEPS = 30 if LONG else 18

USERS = ("u0", "u1", "u2", "40", "41")
NUMERIC = {"40": 40, "41": 41}
ABSENT = object()

trait_values_strategy = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.sampled_from([0.5, 1.0, -2.25]),
    st.booleans(),
    st.sampled_from(["", "gold", "1", "é"]),
)
faults = st.sampled_from(
    [
        "none",
        "5xx-burst",
        "5xx-for-good",
        "429",
        "401",
        "refuse-user",
        "refuse-events",
        "batch-error",
        "lost-after-apply",
        "lost-before",
        "lost-then-refused",
    ]
)
kills = st.sampled_from([None, None, "loading", "planned", "sending"])
# Source kinds each key may read; "native" only where the state is PostgreSQL.
AUDIENCE_SOURCES = ("jsonl", "csv", "sql", "native", "engage")
TRAIT_SOURCES = ("jsonl", "engage")
PAUSED_LEASE_SECONDS = 2


class SimulatedKill(BaseException):
    """A ``kill -9`` at a chosen step, in-process: nothing after it runs, and the
    acknowledgements not yet saved are lost (tests/test_crash.py does it with real kills)."""


class KillAt:
    """A ``Progress`` that kills the run at a step."""

    def __init__(self, point: str, after: int) -> None:
        self.point, self.after, self.answers = point, after, 0

    def loaded(self, audience_key: str, rows: int) -> None:
        if self.point == "loading":
            raise SimulatedKill("loading")

    def planned(self, changes: int) -> None:
        if self.point == "planned":
            raise SimulatedKill("planned")

    def sent(self, changes: int) -> None:
        self.answers += 1
        if self.point == "sending" and self.answers >= self.after:
            raise SimulatedKill("sending")


@dataclass
class Key:
    """The model of one configured key: its kind and what its source says."""

    kind: str  # "audience" | "trait"
    track: bool = False
    on_missing: str = "null"
    source: str = "jsonl"  # one of AUDIENCE_SOURCES / TRAIT_SOURCES
    # Users whose email in this source is its own (a variant number), not the shared one.
    emails: dict[str, int] = field(default_factory=dict)
    # Users with a second row after theirs (an earlier event, for Engage) carrying another
    # email (and value): the first row (the latest event) must win.
    decoys: set[str] = field(default_factory=set)
    # Users whose row carries an email no request may carry: the row is rejected, and its
    # user left as Gist holds them (a glitch is no departure), until the row is mended.
    broken: set[str] = field(default_factory=set)
    ever: set[str] = field(default_factory=set)  # members ever: an Engage export's exits
    epoch: int = 0  # events Gist had before this key was (re)configured belong to no one
    members: set[str] = field(default_factory=set)
    values: dict[str, Any] = field(default_factory=dict)
    # on_missing = "keep": canonical values Gist may hold for a user gone from the source.
    possible: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Users holding the `false` that retiring the key's old audience kind left in Gist,
    # which the trait's state never tracked.
    leftover: set[str] = field(default_factory=set)
    # When send_track was last turned on: how many events Gist had then, and the values
    # Gist acknowledged by then, which stand for the events before them (changes made while
    # it was off owe none): a user with no event since holds the value acknowledged then.
    baseline_at: int = -1
    baseline: dict[str, Any] = field(default_factory=dict)


def wait_until_stopped(pid: int) -> None:
    """Return once every thread of ``pid`` is stopped (a signal is delivered, not awaited)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        with contextlib.suppress(OSError):  # a process already reaped has no tasks left
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if all(state in "TtZX" for state in states):  # stopped, or gone
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def canonical(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value, sort_keys=True, separators=(",", ":"))


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (1, 1.0 and true differ)."""
    return canonical(a) == canonical(b)


def machine_for(store: str) -> type[RuleBasedStateMachine]:
    sources = {
        "audience": tuple(k for k in AUDIENCE_SOURCES if store == "postgresql" or k != "native"),
        "trait": TRAIT_SOURCES,
    }

    class SyncMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.root = Path(tempfile.mkdtemp(prefix="audience-sync-model-"))
            self.schema: str | None = None
            self.warehouse = self.root / "warehouse.db"  # SQL sources: attached or via Python
            if store == "sqlite":
                self.state_url = f"sqlite:///{self.root / 'state.db'}"
            else:
                admin = require_postgres()
                self.schema = f"m_{uuid.uuid4().hex[:12]}"
                self.admin = create_engine(admin, poolclass=NullPool)
                with self.admin.begin() as connection:
                    connection.execute(text(f'CREATE SCHEMA "{self.schema}"'))
                self.state_url = f"{admin}?options=-csearch_path%3D{self.schema}"
            self.engine: Engine = db.make_engine(self.state_url)
            db.upgrade(self.engine)
            self.gist = FakeGist(api_key=API_KEY).start()
            # In-process runs are one long-lived worker's, as a daemon's are.
            self.worker = Presence(self.engine, "daemon").__enter__()
            self.unreleased: set[str] = set()  # keys whose lease release went unrecorded
            self.keys: dict[str, Key] = {
                "a1": Key("audience", track=True),
                "a2": Key("audience"),
                "t1": Key("trait", track=True),
                "t2": Key("trait", on_missing="keep"),
            }
            self.retired: set[str] = set()
            self.emails = dict.fromkeys(USERS, 0)
            self.batch_size = 1
            self.may_duplicate = 0  # events Gist may have twice: lost answers and kills
            self.evented_pruned = 0
            self.pauses = 0
            self.paging: Any = None  # delivery.PAGE_ROWS, as drawn

        def teardown(self) -> None:
            if self.paging is not None:
                self.paging.stop()
            self.worker.__exit__(None, None, None)
            self.gist.stop()
            self.engine.dispose()
            if self.schema is not None:
                with self.admin.begin() as connection:
                    connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
                self.admin.dispose()
            shutil.rmtree(self.root, ignore_errors=True)

        # ------------------------------------------------------------- the sources

        def email(self, user: str, key: str | None = None) -> str:
            """The user's email in ``key``'s source (its own variant, else the shared one)."""
            variant = self.keys[key].emails.get(user) if key is not None else None
            if variant is not None:
                return f"{user}.{key}.{variant}@example.com"
            return f"{user}.{self.emails[user]}@example.com"

        def expected_email(self, user: str) -> str | None:
            """The email a run of every key sends for ``user``: the first configured source
            that has the user decides (audiences before traits, each in config order)."""
            for kind in ("audience", "trait"):
                for key in self.configured_in_order(kind):
                    if user in self.present(key) - self.keys[key].broken:
                        return self.email(user, key)
            return None

        def present(self, key: str) -> set[str]:
            """The users ``key``'s source has a row for."""
            model = self.keys[key]
            return model.members if model.kind == "audience" else set(model.values)

        def left_alone(self, key: str) -> set[str]:
            """The users whose row in ``key``'s source is rejected: no run changes them."""
            return self.present(key) & self.keys[key].broken

        def clean(self, result: RunResult) -> bool:
            """A run that went through: succeeded, or failed for a source whose every row
            is rejected (every user it has is broken)."""
            if result.status == "succeeded":
                return True
            key = result.audience_key
            everyone = self.present(key)
            return (
                bool(everyone)
                and everyone <= self.keys[key].broken
                and ("were rejected" in (result.error or ""))
            )

        def configured_in_order(self, kind: str) -> list[str]:
            return [k for k, m in self.keys.items() if m.kind == kind]

        def rows(self, key: str, form: str) -> list[tuple[Any, str, Any, bool]]:
            """``key``'s source rows in order: (user id as ``form`` gives numeric ones,
            email, value, is a decoy); a decoy row follows its user's own row."""

            def user_id(user: str) -> Any:
                if user not in NUMERIC:
                    return user
                return {"int": NUMERIC[user], "float": float(NUMERIC[user]), "str": user}[form]

            model = self.keys[key]
            present = self.present(key)
            rows: list[tuple[Any, str, Any, bool]] = []
            for user in USERS:
                if user not in present:
                    continue
                value = model.values.get(user) if model.kind == "trait" else None
                if user in model.broken:  # alone: a decoy after it would be the user's row
                    rows.append((user_id(user), "not an email", value, False))
                    continue
                rows.append((user_id(user), self.email(user, key), value, False))
                if user in model.decoys:
                    decoy = "decoy" if model.kind == "trait" else None
                    rows.append((user_id(user), f"{user}.decoy@example.com", decoy, True))
            return rows

        def write(self, form: str, *, paused: bool = False) -> Path:
            """The config and every configured key's source; numeric ids in ``form``.
            ``paused``: the config of a ``run`` process that will be stopped mid-delivery
            (a short lease, a slow pace), written beside the usual one."""
            url = self.state_url
            if paused and self.schema is not None:  # its connections, told apart
                url += f"&application_name={self.schema}-paused"
            lines = [
                "[state]",
                f"url = {json.dumps(url)}",
                *([f"lease_seconds = {PAUSED_LEASE_SECONDS}"] if paused else []),
                "[gist]",
                f'api_key = "{API_KEY}"',
                f"base_url = {json.dumps(self.gist.url)}",
                f"requests_per_second = {20 if paused else 2000}",
                f"max_concurrency = {1 if paused else 2}",
                f"timeout_seconds = {0.5 if paused else 2}",
                "max_retries = 1",
                "retry_backoff_seconds = 0.001",
                f"batch_size = {self.batch_size}",
                "[sources.warehouse]",
                f"url = {json.dumps(f'sqlite:///{self.warehouse}')}",
            ]
            for key, model in self.keys.items():
                section = "audiences" if model.kind == "audience" else "traits"
                lines += [
                    f"[[{section}]]",
                    f'name = "{key}"',
                    f'key = "{key}"',
                    f"send_track = {str(model.track).lower()}",
                    *self.write_source(key, form),
                ]
                if model.kind == "trait":
                    lines.append(f'on_missing = "{model.on_missing}"')
            config = self.root / ("paused.toml" if paused else "audience_sync.toml")
            config.write_text("\n".join(lines) + "\n")
            return config

        def write_source(self, key: str, form: str) -> list[str]:
            """Write ``key``'s source as its kind reads it; returns its config lines."""
            model = self.keys[key]
            rows = self.rows(key, form)
            if model.source == "jsonl":
                path = self.root / f"{key}.jsonl"
                records = [
                    {"user_id": u, "email": e, **({"value": v} if model.kind == "trait" else {})}
                    for u, e, v, _ in rows
                ]
                path.write_text("".join(json.dumps(r) + "\n" for r in records))
                return [f'file = "{path.name}"']
            if model.source == "csv":
                path = self.root / f"{key}.csv"
                with path.open("w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(["user_id", "email"])
                    writer.writerows([str(u), e] for u, e, _, _ in rows)
                return [f'file = "{path.name}"']
            if model.source == "engage":
                path = self.root / f"{key}.engage.jsonl"
                path.write_text("".join(json.dumps(e) + "\n" for e in self.engage(key, rows)))
                return [f'file = "{path.name}"', 'format = "engage"']
            table = f"wh_{key}"
            if model.source == "sql":
                with sqlite3.connect(self.warehouse) as warehouse:
                    warehouse.execute(f"DROP TABLE IF EXISTS {table}")
                    warehouse.execute(f"CREATE TABLE {table} (seq, user_id, email)")
                    warehouse.executemany(
                        f"INSERT INTO {table} VALUES (?, ?, ?)",
                        [(n, u, e) for n, (u, e, _, _) in enumerate(rows)],
                    )
                warehouse.close()
                query = f"SELECT user_id, email FROM {table} ORDER BY seq"
                return ['source = "warehouse"', f"query = {json.dumps(query)}"]
            assert model.source == "native"
            assert self.schema is not None
            qualified = f'"{self.schema}".{table}'
            with self.admin.begin() as connection:
                connection.execute(text(f"DROP TABLE IF EXISTS {qualified}"))
                connection.execute(
                    text(f"CREATE TABLE {qualified} (seq int, user_id text, email text)")
                )
                if rows:
                    connection.execute(
                        text(f"INSERT INTO {qualified} VALUES (:n, :u, :e)"),
                        [{"n": n, "u": str(u), "e": e} for n, (u, e, _, _) in enumerate(rows)],
                    )
            query = f"SELECT user_id, email FROM {qualified} ORDER BY seq"
            return ['source = "state"', f"query = {json.dumps(query)}"]

        def engage(self, key: str, rows: list[tuple[Any, str, Any, bool]]) -> list[dict[str, Any]]:
            """An Engage export of ``key``: an identify per member (or trait value), its
            decoy as an earlier event (the latest decides), an exit for members gone."""
            model = self.keys[key]
            klass = model.kind
            context = {"personas": {"computation_key": key, "computation_class": klass}}

            def identify(user: Any, email: str, value: Any) -> dict[str, Any]:
                return {
                    "type": "identify",
                    "userId": user,
                    "traits": {key: value, "email": email},
                    "context": context,
                }

            events: list[dict[str, Any]] = []
            for user, email, value, decoy in rows:
                shown = True if klass == "audience" else value
                event = identify(user, email, shown)
                if decoy:
                    events.insert(len(events) - 1, event)  # before its user's own event
                else:
                    events.append(event)
            if klass == "audience":
                for user in sorted(model.ever - model.members, key=USERS.index):
                    events.append(
                        {
                            "type": "track",
                            "event": "Audience Exited",
                            "userId": user,
                            "properties": {"audience_key": key, key: False},
                            "context": context,
                        }
                    )
            return events

        def sync(
            self,
            keys: tuple[str, ...] = (),
            *,
            mode: Mode = "run",
            fault: str = "none",
            kill: str | None = None,
            kill_after: int = 1,
            form: str = "str",
            full_diff: bool = False,
            resume: bool = False,
        ) -> list[RunResult] | None:
            config = self.write(form)
            self.inject(fault)
            progress = KillAt(kill, kill_after) if kill else None
            self.gist.clear_log()
            unrecorded = (
                mock.patch.object(
                    lease, "release", side_effect=OperationalError("UPDATE leases", {}, OSError())
                )
                if fault == "release-unrecorded"
                else contextlib.nullcontext()
            )
            try:
                with unrecorded:
                    results = run_once(
                        load_settings(config, {}),
                        self.engine,
                        keys,
                        mode=mode,
                        allow_mass_exit=True,
                        full_diff=full_diff,
                        resume=resume,
                        progress=progress,
                        worker=self.worker,
                    )
                ran = {r.audience_key for r in results if r.status != "skipped"}
                self.unreleased -= ran
                if fault == "release-unrecorded":
                    self.unreleased |= ran
                applied = [r for r in self.gist.requests("/events") if r.status == 200]
                if any("timed out" in (r.error or "") for r in results):
                    # A request that ran past its deadline (a loaded machine) may have been
                    # applied all the same, its answer unread: its event may come again.
                    self.may_duplicate += len(applied)
                else:  # ... or retried within the run, once its deadline passed
                    self.may_duplicate += len(applied) - len({canonical(r.body) for r in applied})
                return results
            except SimulatedKill:
                if fault == "release-unrecorded":
                    self.unreleased |= set(keys or self.configured())
                # At most every event of the run was sent but its acknowledgement unsaved.
                self.may_duplicate += len(USERS) * len(self.keys)
                return None
            finally:
                self.gist.reset_faults()
                self.may_duplicate += sum(
                    1 for r in self.gist.requests("/events") if not r.answered and r.status
                )

        def inject(self, fault: str) -> None:
            if fault == "5xx-burst":
                self.gist.fail_next(1, 503)
            elif fault == "5xx-for-good":
                self.gist.fail_after(2, 503)
            elif fault == "429":
                self.gist.fail_next(1, 429, retry_after="0")
            elif fault == "401":
                self.gist.fail_after(1, 401)
            elif fault == "refuse-user":
                self.gist.fail_user("u1", 422)
            elif fault == "refuse-events":  # each user's first event of the run
                for user in USERS:
                    self.gist.refuse_events(user, 1)
            elif fault == "batch-error":
                self.gist.fail_in_batch("u2")
            elif fault == "lost-after-apply":
                self.gist.drop_after_applying(3)
            elif fault == "lost-before":
                self.gist.drop_next(3)
            elif fault == "lost-then-refused":  # u1's first try applied unanswered, then 409s
                self.gist.lose_then_refuse("u1", 409)

        def configured(self, kind: str | None = None) -> list[str]:
            return sorted(k for k, m in self.keys.items() if kind in (None, m.kind))

        # ----------------------------------------------------------------- rules

        @initialize(
            batch=st.sampled_from([1, 1, 3]),
            page_rows=st.sampled_from([delivery.PAGE_ROWS, 1, 3]),
            data=st.data(),
        )
        def choose_batches_sources_and_members(
            self, batch: int, page_rows: int, data: st.DataObject
        ) -> None:
            """Every key starts with its source kind (files twice as likely: only they have
            a fast path) and some members or values, so that short runs reach the states
            where audiences share users. Delivery reads its pages of changes (one page
            ahead of what it sends) at the default size or at one smaller than a user's
            changes can fill, so a run's plan spans pages."""
            self.batch_size = batch
            self.paging = mock.patch.object(delivery, "PAGE_ROWS", page_rows)
            self.paging.start()
            for model in self.keys.values():
                kinds = sources[model.kind]
                model.source = data.draw(st.sampled_from(kinds[:2] + kinds))
                if model.kind == "audience":
                    model.members = set(data.draw(st.sets(st.sampled_from(USERS))))
                    model.ever = set(model.members)
                else:
                    model.values = data.draw(
                        st.dictionaries(st.sampled_from(USERS), trait_values_strategy, max_size=2)
                    )
                    for user, value in model.values.items():
                        model.possible[user].add(canonical(value))

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def enter(self, data: st.DataObject, user: str) -> None:
            key = data.draw(st.sampled_from(self.configured("audience") or ["-"]))
            if key in self.keys:
                self.keys[key].members.add(user)
                self.keys[key].ever.add(user)

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def leave(self, data: st.DataObject, user: str) -> None:
            key = data.draw(st.sampled_from(self.configured("audience") or ["-"]))
            if key in self.keys:
                self.keys[key].members.discard(user)

        @rule(user=st.sampled_from(USERS))
        def change_email(self, user: str) -> None:
            self.emails[user] += 1

        @rule(data=st.data(), user=st.sampled_from(USERS), own=st.booleans())
        def change_email_in_one_source(self, data: st.DataObject, user: str, own: bool) -> None:
            """One source gives the user an email of its own (or the shared one again)."""
            model = self.keys[data.draw(st.sampled_from(self.configured()))]
            if own:
                model.emails[user] = model.emails.get(user, 0) + 1
            else:
                model.emails.pop(user, None)

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def toggle_duplicate_row(self, data: st.DataObject, user: str) -> None:
            """A second row of the user, with another email (and value), after theirs."""
            model = self.keys[data.draw(st.sampled_from(self.configured()))]
            model.decoys ^= {user}

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def toggle_broken_row(self, data: st.DataObject, user: str) -> None:
            """The user's row in one source gets an email no request may carry (or is
            mended): it is rejected, and the user left as Gist holds them — no exit, no
            change — by runs and backfills alike, until it is mended."""
            model = self.keys[data.draw(st.sampled_from(self.configured()))]
            model.broken ^= {user}

        @rule(data=st.data())
        def switch_source(self, data: st.DataObject) -> None:
            model = self.keys[data.draw(st.sampled_from(self.configured()))]
            model.source = data.draw(st.sampled_from(sources[model.kind]))

        @rule(data=st.data(), user=st.sampled_from(USERS), value=trait_values_strategy)
        def set_value(self, data: st.DataObject, user: str, value: Any) -> None:
            key = data.draw(st.sampled_from(self.configured("trait") or ["-"]))
            if key in self.keys:
                model = self.keys[key]
                model.values[user] = value
                model.possible[user].add(canonical(value))

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def drop_value(self, data: st.DataObject, user: str) -> None:
            key = data.draw(st.sampled_from(self.configured("trait") or ["-"]))
            if key in self.keys:
                self.keys[key].values.pop(user, None)

        @rule(
            data=st.data(),
            fault=faults,
            kill=kills,
            kill_after=st.integers(1, 4),
            form=st.sampled_from(["int", "float", "str"]),
        )
        def run(
            self, data: st.DataObject, fault: str, kill: str | None, kill_after: int, form: str
        ) -> None:
            keys = tuple(data.draw(st.sets(st.sampled_from(self.configured()), max_size=2)))
            self.sync(keys, fault=fault, kill=kill, kill_after=kill_after, form=form)

        @rule(data=st.data())
        def run_whose_lease_release_goes_unrecorded(self, data: st.DataObject) -> None:
            """The state database cannot record the end of the run's leases (it went down
            as the run ended): they stay live for other processes until they expire, and
            this worker's next run of them takes them back at once, as a daemon's must."""
            keys = tuple(data.draw(st.sets(st.sampled_from(self.configured()), max_size=2)))
            self.sync(keys, fault="release-unrecorded")

        @rule(data=st.data())
        def run_some_keys_cleanly(self, data: st.DataObject) -> None:
            """A run of one or two keys that goes through: what it sends (emails included)
            is what those sources alone say, and a later run of every key must mend it."""
            chosen = st.sets(st.sampled_from(self.configured()), min_size=1, max_size=2)
            results = self.sync(tuple(data.draw(chosen)))
            assert results is not None
            assert all(self.clean(r) for r in results), results

        @rule(data=st.data(), fault=faults, resume=st.booleans())
        def backfill(self, data: st.DataObject, fault: str, resume: bool) -> None:
            """A backfill, resuming an unfinished one or not: either way, Gist not having
            been reset since, the next clean run must leave Gist equal to the sources."""
            key = data.draw(st.sampled_from(self.configured()))
            self.sync((key,), mode="backfill", fault=fault, resume=resume)

        @rule(data=st.data(), fault=faults, earlier=st.booleans())
        def reset_gist_then_backfill(self, data: st.DataObject, fault: str, earlier: bool) -> None:
            """Gist loses a key's values (a workspace reset), and ``backfill`` — what it is
            for — sends them again, run until it succeeds (the first try under a fault, the
            tries after it resuming it): an audience's members, a trait's values, and the
            values an ``on_missing = "keep"`` trait keeps for users gone from its source.
            With ``earlier``, a backfill under that fault and a run of the key came before
            the reset: a backfill that stopped then must not be "resumed" across the run
            since, its users left without the property. A backfill that stopped before the
            reset with no run since (a ``backfill`` rule just before) is not resumed either:
            only ``--resume`` does that."""
            key = data.draw(st.sampled_from(self.configured()))
            model = self.keys[key]
            if earlier:
                self.sync((key,), mode="backfill", fault=fault)
                self.sync((key,))
            for user, contact in self.users_in_gist().items():
                if key in contact["custom_properties"]:
                    self.gist.drop_property(user, key)
            results = self.sync((key,), mode="backfill", fault="none" if earlier else fault)
            for _ in range(3):
                if results is not None and all(self.clean(r) for r in results):
                    break
                results = self.sync((key,), mode="backfill", resume=True)
            else:
                raise AssertionError(f"the backfill of {key} never succeeded: {results}")
            held = {
                u: c["custom_properties"].get(key, ABSENT) for u, c in self.users_in_gist().items()
            }
            alone = self.left_alone(key)  # held as before: check_state compares the ledger
            if model.kind == "audience":
                members = {u for u, v in held.items() if v is True} - alone
                assert members == model.members - alone, (key, members)
                return
            for user in set(USERS) - alone:
                value = canonical(held.get(user, ABSENT))
                if user in model.values:
                    assert value == canonical(model.values[user]), (key, user, value)
                elif model.on_missing == "keep" and model.possible[user]:
                    # A kept null may be absent (nothing is sent for it); a value may not.
                    kept = model.possible[user]
                    allowed = kept | ({"absent"} if "null" in kept else set())
                    assert value in allowed, (key, user, value, allowed)

        @rule(data=st.data())
        def retire_and_add_back_as_the_other_kind(self, data: st.DataObject) -> None:
            key = data.draw(st.sampled_from(self.configured()))
            old = self.keys.pop(key)
            with self.engine.connect() as connection:
                known = connection.scalar(select(func.count()).where(audiences.c.key == key))
            for _ in range(3 if known else 0):  # until it went through (a run like any other)
                results = self.sync((key,), mode="retire")
                assert results is not None
                [result] = results
                if result.status == "succeeded":
                    break
            else:
                if known:  # a key no run ever opened has nothing in Gist (retire refuses it)
                    raise AssertionError(f"retiring {key} never succeeded: {result}")
            cleared = set()
            for user, contact in self.users_in_gist().items():
                assert contact["custom_properties"].get(key) in (None, False)
                if contact["custom_properties"].get(key) is False:
                    cleared.add(user)
            self.retired.add(key)
            kind = "trait" if old.kind == "audience" else "audience"
            self.keys[key] = Key(
                kind,
                track=data.draw(st.booleans()),
                epoch=len(self.gist.events()),
                source=data.draw(st.sampled_from(sources[kind])),
            )
            if kind == "trait":
                self.keys[key].leftover = cleared
            for user in USERS:  # what the retire left: a cleared value of the old kind
                self.keys[key].possible[user] |= {"absent", "null", "false"}
            self.retired.discard(key)

        @rule(data=st.data(), flips=st.sets(st.sampled_from(USERS), max_size=3))
        def events_refused_across_a_change(self, data: st.DataObject, flips: set[str]) -> None:
            """A run of an audience whose events Gist refuses (each user's first of the
            run), members coming and going, and another such run: a user's refused event
            stays owed and must still arrive before the ones after it."""
            key = data.draw(st.sampled_from(self.configured("audience") or ["-"]))
            if key not in self.keys:
                return
            self.sync((key,), fault="refuse-events")
            self.keys[key].members ^= flips
            self.keys[key].ever |= flips
            self.sync((key,), fault="refuse-events")

        @rule(
            data=st.data(),
            spell=st.booleans(),
            flips=st.sets(st.sampled_from(USERS), max_size=3),
        )
        def toggle_send_track(self, data: st.DataObject, spell: bool, flips: set[str]) -> None:
            """``send_track`` turned off or on for a key. Turned on, events describe the
            changes from then: a user with no event since holds what Gist acknowledged by
            then, and an event owed from before it went off must not arrive after a
            change made while it was off. With ``spell``, a tracked audience is off for a
            while: a run whose events Gist refuses, ``send_track`` off, members coming and
            going and a run of the key, then on again."""
            key = data.draw(st.sampled_from(self.configured()))
            model = self.keys[key]
            if spell and model.track and model.kind == "audience":
                self.sync((key,), fault="refuse-events")
                model.track = False
                model.members ^= flips
                model.ever |= flips
                self.sync((key,))
            model.track = not model.track
            if not model.track:
                return
            with self.engine.connect() as connection:
                if model.kind == "audience":
                    held = connection.scalars(
                        select(memberships.c.user_id).where(memberships.c.audience_key == key)
                    )
                    acknowledged: dict[str, Any] = dict.fromkeys(held, True)
                else:
                    rows = connection.execute(
                        select(trait_values.c.user_id, trait_values.c.value).where(
                            trait_values.c.trait_key == key
                        )
                    )
                    acknowledged = {user: json.loads(value) for user, value in rows}
            model.baseline_at = len(self.gist.events())
            model.baseline = acknowledged

        @precondition(lambda self: bool(self.configured("audience")))
        @rule(data=st.data(), user=st.sampled_from(USERS))
        def edit_in_gist_then_verify_repair(self, data: st.DataObject, user: str) -> None:
            key = data.draw(st.sampled_from(self.configured("audience")))
            # No draw may depend on what the run did (timing makes that vary): the user is
            # drawn from all, and only edited when Gist acknowledged them as a member.
            with self.engine.connect() as connection:
                acked = connection.scalar(
                    select(func.count()).where(
                        memberships.c.audience_key == key, memberships.c.user_id == user
                    )
                )
                unsure = connection.scalar(
                    select(func.count()).where(
                        uncertain_members.c.audience_key == key,
                        uncertain_members.c.user_id == user,
                    )
                )
            if not acked:
                return
            self.gist.edit_contact(user, {key: False})
            config = self.write("str")
            report = verify_audience(
                load_settings(config, {}), self.engine, key, sample=100, repair=True,
                worker=self.worker,
            )  # fmt: skip
            # An uncertain member is re-sent by the next run anyway: verify leaves it out.
            found = any(d.user_id == user for d in report.drifted)
            assert found != bool(unsure), report

        @rule(
            data=st.data(),
            edits=st.lists(
                st.tuples(
                    st.sampled_from(USERS),
                    st.sampled_from(["flip", "drop", "email", "no-email", "remove", "lead"]),
                ),
                max_size=4,
            ),
            per_page=st.integers(1, 4),
            stopped_after=st.sampled_from([None, None, 1, 2]),
            killed=st.sets(st.sampled_from(USERS), max_size=3),
            others=st.booleans(),
        )
        def tamper_with_gist_then_reconcile(
            self,
            data: st.DataObject,
            edits: list[tuple[str, str]],
            per_page: int,
            stopped_after: int | None,
            killed: set[str],
            others: bool = False,
        ) -> None:
            """Gist is changed behind the tool's back in any way (values flipped or dropped,
            emails changed or lost, contacts deleted, leads added), then ``reconcile`` reads
            it back as the ledger for the keys it was changed on: the next clean run must
            leave Gist equal to the sources again. With ``stopped_after``, a first reconcile stops
            when Gist goes down after that many pages, a run of its keys (with ``others``,
            of the other keys, whose requests may carry a contact's new email) sends what
            the ledger says is owed, and the reconcile is run again (it would continue the
            reading it left, were its pages not stale). With ``killed``, those users moved in
            the keys' sources (in or out, a new value) and a run of the keys was killed while
            sending them (one key's, at its first answer), before, as a switch-over may
            follow a run that died: what Gist
            applied of it without the tool knowing must still fire its events."""
            keys = sorted(data.draw(st.sets(st.sampled_from(self.configured()), min_size=1)))
            if any(edit in ("remove", "email", "no-email") for _, edit in edits):
                keys = self.configured()  # a contact's removal or email is every key's
            if killed:  # one key's, so that the first answer, the one Gist applied, is its
                killed_key = data.draw(st.sampled_from(keys))
                model = self.keys[killed_key]
                if model.kind == "audience":
                    model.members ^= killed
                    model.ever |= killed
                else:
                    for user in killed:
                        value = data.draw(trait_values_strategy)
                        model.values[user] = value
                        model.possible[user].add(canonical(value))
                self.sync((killed_key,), kill="sending", kill_after=1)
            contacts = self.gist.contacts()
            for n, (user, edit) in enumerate(edits):
                key = data.draw(st.sampled_from(keys))
                model = self.keys[key]
                if edit == "lead":
                    self.gist.add_contact(None, f"lead{n}.{user}@example.com", {key: True})
                    continue
                if user not in contacts:
                    continue
                if edit == "remove":
                    self.gist.remove_contact(user)
                    contacts.pop(user)
                elif edit == "email":
                    self.gist.add_contact(user, f"{user}.elsewhere@example.com")
                elif edit == "no-email":  # the contact again, by user id alone
                    self.gist.remove_contact(user)
                    self.gist.add_contact(user, None, contacts[user]["custom_properties"])
                elif edit == "drop":
                    self.gist.drop_property(user, key)
                elif model.kind == "audience":
                    held = contacts[user]["custom_properties"].get(key)
                    self.gist.edit_contact(user, {key: held is not True})
                else:
                    self.gist.edit_contact(user, {key: "tampered"})
                    model.possible[user].add(canonical("tampered"))
            config = self.write("str")
            if stopped_after is not None:
                self.gist.fail_after(stopped_after, 503)
                try:
                    reconcile(
                        load_settings(config, {}), self.engine, keys, per_page=per_page,
                        worker=self.worker,
                    )  # fmt: skip
                finally:
                    self.gist.reset_faults()
                rest = tuple(k for k in self.configured() if k not in keys)
                self.sync(rest if others and rest else tuple(keys))
            report = reconcile(
                load_settings(config, {}), self.engine, keys, per_page=per_page, worker=self.worker
            )
            assert report.error is None, report
            assert all(r.status == "succeeded" for r in report.results), report
            held = self.users_in_gist()
            with self.engine.connect() as connection:
                for key in keys:  # the ledger now says what Gist holds
                    if self.keys[key].kind == "audience":
                        ledger = set(
                            connection.scalars(
                                select(memberships.c.user_id).where(
                                    memberships.c.audience_key == key
                                )
                            )
                        )
                        members = {
                            u for u, c in held.items() if c["custom_properties"].get(key) is True
                        }
                        assert ledger == members, (key, ledger, members)
                known = select(contacts_table.c.user_id, contacts_table.c.email)
                emails = {user: email for user, email in connection.execute(known)}
            for user, contact in held.items():  # and each contact's email, what Gist holds
                if user in emails and contact["email"] is not None:  # (none: the last known)
                    assert emails[user] == contact["email"], (user, emails[user], contact)
            # No baseline for events: a value read back that the tool had sent owes the
            # event a run would have sent (an entry Gist applied without answering, an event
            # refused), and one changed behind its back is re-sent by the next run, event
            # and all, or agrees with the source and the event trail already.

        @rule()
        def prune_history(self) -> None:
            evented = select(func.count()).where(member_changes.c.event_status == "delivered")
            with self.engine.connect() as connection:
                before = connection.scalar(select(func.count()).select_from(member_changes))
                evented_before = connection.scalar(evented) or 0
            deleted = prune(self.engine, utcnow())
            with self.engine.connect() as connection:
                after = connection.scalar(select(func.count()).select_from(member_changes))
                self.evented_pruned += evented_before - (connection.scalar(evented) or 0)
            assert (before or 0) - (after or 0) == deleted["member_changes"]

        @rule()
        def clean_run(self) -> None:
            announced = len(self.gist.events())
            results = self.sync()
            for _ in range(3):
                # A loaded machine may stall a request past its deadline (2 s): a run that
                # failed only for that is retried, as the scheduler would; any other
                # failure is one.
                assert results is not None
                if not any(r.failure == "unavailable" for r in results):
                    break
                note(f"clean run retried: {[(r.audience_key, r.error) for r in results]}")
                results = self.sync()
            assert results is not None
            outcomes = [(r.audience_key, r.status, r.failure, r.error) for r in results]
            assert all(self.clean(r) for r in results), outcomes
            self.check_gist()
            self.check_state()
            self.check_events()
            # Its events came after its contacts, which it left as they are now: each event
            # carries its contact's email (an owed one too, planned under an older email).
            contacts = self.users_in_gist()
            for event in self.gist.events()[announced:]:
                contact = contacts.get(event["user_id"])
                if contact is not None:
                    assert (event.get("email") or None) == (contact["email"] or None), event
            for key, model in self.keys.items():
                for user, value in model.values.items():
                    if user not in self.left_alone(key):  # Gist holds what it held
                        model.possible[user] = {canonical(value)}
            # The same sources again: unchanged files may take the fast path, and it must
            # plan what a full diff plans, which is nothing.
            again = self.sync()
            assert again is not None
            assert self.gist.requests() == [], "a run after a clean run sent something"
            assert all((r.entered, r.exited, r.resent) == (0, 0, 0) for r in again), again
            full = self.sync(full_diff=True)
            assert full is not None
            assert self.gist.requests() == [], "a full diff after a clean run sent something"
            assert all((r.entered, r.exited, r.resent) == (0, 0, 0) for r in full), full

        # Another process meets a live lease this one could not release: it waits it out
        # (a minute), which is availability, not what the rule is about.
        @precondition(lambda self: self.pauses < (3 if LONG else 1) and not self.unreleased)
        @rule(data=st.data(), users=st.sets(st.sampled_from(USERS), max_size=3))
        def pause_a_run_past_its_lease(self, data: st.DataObject, users: set[str]) -> None:
            """A real ``run`` process is stopped (SIGSTOP) mid-delivery, with requests queued,
            for longer than its lease; another run takes over with newer sources (members
            leave and enter); the first is woken. It must send nothing more, and end."""
            if not data.draw(st.booleans()):  # half the time: the process is slow to start
                return
            self.pauses += 1
            config = self.write("str", paused=True)
            self.gist.clear_log()
            self.gist.latency = 0.05
            process = subprocess.Popen(
                [sys.executable, "-m", "audience_sync", "run", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                deadline = time.monotonic() + 30
                while not self.gist.requests() and process.poll() is None:
                    assert time.monotonic() < deadline, "the run never sent anything"
                    time.sleep(0.005)
                if not self.stop_between_transactions(process):
                    # No moment to stop it in (a loaded machine): the run goes on unpaused,
                    # and must still end as any run does.
                    note("the run could not be stopped between its transactions")
                    out, err = process.communicate(timeout=120)
                    assert process.returncode in (0, 1), out + err
                    return
                stopped_with = len(self.gist.requests())
                self.gist.latency = 0
                for user in users:  # newer sources for the taker
                    for model in self.keys.values():
                        if model.kind == "audience":
                            model.members ^= {user}
                            model.ever |= model.members
                time.sleep(PAUSED_LEASE_SECONDS + 0.5)
                self.sync()  # the taker (it may meet the paused one's lease still live)
                self.may_duplicate += len(self.gist.requests("/events"))
                woke = time.monotonic()
                process.send_signal(signal.SIGCONT)
                out, err = process.communicate(timeout=60)
            finally:
                self.gist.latency = 0
                process.kill()
                process.communicate()
            late = [r for r in self.gist.requests() if r.at >= woke]
            if stopped_with and process.returncode != 0:
                assert late == [], f"{late} sent after the lease was lost\n{err}"
            assert process.returncode in (0, 1), out + err

        def stop_between_transactions(self, process: subprocess.Popen[str]) -> bool:
            """SIGSTOP ``process`` while its one request in flight waits for its answer and
            it holds no lock in the state database. A process stopped inside a transaction
            blocks every other writer (SQLite's write lock, PostgreSQL's row locks) until it
            wakes: availability, not what this rule is about. And one stopped in the instant
            between the fence's last check and the write of a request's bytes sends that
            request when it wakes: the one request no client-side fence can stop (docs:
            "Guarantees"), which this rule leaves to that statement. False when no such
            moment came within a minute (the process left running)."""
            deadline = time.monotonic() + 60  # a loaded machine needs more tries than an idle one
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return True  # it ended first: nothing left to stop
                if not self.gist.in_flight:
                    time.sleep(0.001)
                    continue
                process.send_signal(signal.SIGSTOP)
                wait_until_stopped(process.pid)
                if self.gist.in_flight and self.is_free_to_write():
                    return True
                process.send_signal(signal.SIGCONT)
                time.sleep(0.003)
            return False

        def is_free_to_write(self) -> bool:
            if self.schema is None:
                probe = sqlite3.connect(self.root / "state.db", timeout=0)
                try:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.rollback()
                    return True
                except sqlite3.OperationalError:
                    return False
                finally:
                    probe.close()
            with self.admin.connect() as connection:
                busy = connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = :name AND state <> 'idle'"
                    ),
                    {"name": f"{self.schema}-paused"},
                )
            return not busy

        # ------------------------------------------------------------- checks

        def check_gist(self) -> None:
            contacts = self.gist.contacts()
            for key, model in self.keys.items():
                for user in set(USERS) - self.left_alone(key):  # theirs: see check_state
                    props = contacts.get(user, {}).get("custom_properties", {})
                    value = props.get(key, ABSENT)
                    where = f"{key}/{user}: Gist holds {value!r}"
                    if model.kind == "audience":
                        if user in model.members:
                            assert value is True, where
                        else:
                            assert value in (ABSENT, False, None), where
                    elif user in model.values:
                        assert same_json(value, model.values[user]), where
                    elif model.on_missing == "null":
                        assert value in (ABSENT, None, False), where
                    else:
                        allowed = model.possible[user] | {"absent"}
                        assert canonical(value) in allowed, f"{where}, may hold {allowed}"
            for key in self.retired:
                for contact in self.users_in_gist().values():
                    assert contact["custom_properties"].get(key) in (None, False)
            for user in USERS:
                expected = self.expected_email(user)
                if expected is not None:
                    assert contacts[user]["email"] == expected, (user, contacts[user])

        def users_in_gist(self) -> dict[str, dict[str, Any]]:
            """Gist's contacts but leads (no user_id), which the tool never touches."""
            return {u: c for u, c in self.gist.contacts().items() if c["user_id"] is not None}

        def check_state(self) -> None:
            contacts = self.users_in_gist()
            with self.engine.connect() as connection:
                unsure = connection.execute(
                    select(uncertain_members.c.audience_key, uncertain_members.c.user_id)
                ).all()
                # Only a user whose row is rejected may stay uncertain: no run sends them.
                assert all(u in self.left_alone(k) for k, u in unsure), unsure
                for key, model in self.keys.items():
                    held = {
                        u: c["custom_properties"][key]
                        for u, c in contacts.items()
                        if key in c["custom_properties"]
                    }
                    acked = set(
                        connection.scalars(
                            select(memberships.c.user_id).where(memberships.c.audience_key == key)
                        )
                    )
                    members = {u for u, v in held.items() if v is True}
                    assert acked == (members if model.kind == "audience" else set()), key
                    values = dict(
                        connection.execute(
                            select(trait_values.c.user_id, trait_values.c.value).where(
                                trait_values.c.trait_key == key,
                                trait_values.c.value != "null",
                            )
                        ).all()
                    )
                    if model.kind == "trait":
                        # `false` left by retiring the key as an audience is no value, unless
                        # the trait's state took the user on since. (A `false` kept for a
                        # user gone from an on_missing = "keep" source is one: the long
                        # profile's counterexample to the looser "not in the source".)
                        gist_values = {
                            u: canonical(v)
                            for u, v in held.items()
                            if v is not None
                            and not (v is False and u in model.leftover and u not in values)
                        }
                        assert values == gist_values, key

        def check_events(self) -> None:
            """Every acknowledged change of a tracked key's value produced its event: the
            last event of each user says what Gist holds, none is owed, and duplicates stay
            within what lost answers and kills allow."""
            events = self.gist.events()
            tracked = {k for k, m in self.keys.items() if m.track}
            with self.engine.connect() as connection:
                owed = connection.scalar(
                    select(func.count()).where(
                        member_changes.c.audience_key.in_(tracked),
                        member_changes.c.status == "delivered",
                        member_changes.c.event_status.in_(["pending", "failed"]),
                    )
                )
                evented = connection.scalar(
                    select(func.count()).where(member_changes.c.event_status == "delivered")
                )
            assert owed == 0
            assert len(events) <= (evented or 0) + self.evented_pruned + self.may_duplicate
            last: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
            for index, event in enumerate(events):
                props = event["properties"]
                key = props.get("audience_key", props.get("trait_key"))
                if key in self.keys and index >= self.keys[key].epoch:
                    last[(key, event["user_id"])] = (index, event)
            for key in tracked:
                model = self.keys[key]
                for user in set(USERS) - self.left_alone(key):  # held as before
                    index, latest = last.get((key, user), (-1, None))
                    if index < model.baseline_at:
                        # No event since send_track went on: the value then is the last word.
                        value = model.baseline.get(user, ABSENT)
                        where = (key, user, value, latest)
                        if model.kind == "audience":
                            assert (value is True) == (user in model.members), where
                        elif user in model.values and model.values[user] is not None:
                            assert same_json(value, model.values[user]), where
                    elif model.kind == "audience":
                        entered = latest is not None and latest["event_name"] == "Audience Entered"
                        assert entered == (user in model.members), (key, user, latest)
                    elif user in model.values and latest is not None:
                        assert same_json(latest["properties"][key], model.values[user])

        @invariant()
        def no_run_left_running(self) -> None:
            with self.engine.connect() as connection:
                running = connection.scalar(
                    text("SELECT count(*) FROM sync_runs WHERE status = 'running'")
                )
            assert running == 0

    SyncMachine.__name__ = f"SyncMachine_{store}"
    return SyncMachine


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600 if LONG else 600)
@pytest.mark.parametrize(
    "store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_gist_converges_under_every_interleaving(store: str) -> None:
    if store == "postgresql":
        require_postgres()
    run_state_machine_as_test(
        machine_for(store),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=not LONG,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )


class Draws:
    """A ``DataObject`` stand-in answering each draw from a list, in order: drives the
    machine's rules by hand through a sequence its search does not reliably reach, so that
    the model's own checks hold the rule the sequence breaks (each is a named test below)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)

    def draw(self, strategy: Any, label: Any = None) -> Any:
        return self.answers.pop(0)


# Every key from a JSONL file, no member nor value yet: what the sequences start from.
START: tuple[Any, ...] = ("jsonl", set(), "jsonl", set(), "jsonl", {}, "jsonl", {})


def _reconcile_after_a_run_killed_mid_send(machine: Any) -> None:
    """u0 enters a tracked audience; the run sending it is killed at its answer (Gist
    applied it, the tool never saved it); a reconcile reads it back: the next run must send
    its ``Audience Entered`` (``reconcile._settle_applied``)."""
    machine.clean_run()
    machine.tamper_with_gist_then_reconcile(
        data=Draws({"a1"}, "a1"), edits=[], per_page=3, stopped_after=None, killed={"u0"}
    )
    machine.clean_run()


def _send_track_off_and_on(machine: Any) -> None:
    """u0 enters a tracked audience and its event is refused; ``send_track`` is turned off,
    u0 leaves, a run sends the exit, ``send_track`` is on again: the entry's owed event must
    not arrive after the exit (``plan.start_plan`` drops it)."""
    machine.enter(data=Draws("a1"), user="u0")
    machine.toggle_send_track(data=Draws("a1"), spell=True, flips={"u0"})
    machine.clean_run()


def _refused_after_a_lost_answer(machine: Any) -> None:
    """u1 leaves; the try sending its exit is applied and its answer lost, the retry refused
    (409); u1 comes back: the refusal says nothing of the first try, so u1 must stay
    uncertain and be sent again (``delivery._send_one``)."""
    machine.enter(data=Draws("a1"), user="u1")
    machine.clean_run()
    machine.leave(data=Draws("a1"), user="u1")
    machine.run(data=Draws(()), fault="lost-then-refused", kill=None, kill_after=1, form="str")
    machine.enter(data=Draws("a1"), user="u1")
    machine.clean_run()


def _backfill_stopped_then_gist_reset(machine: Any) -> None:
    """A backfill stops at a revoked key after its first request; Gist is reset; the next
    backfill must not resume the stopped one, skipping whom it reached (``--resume`` only)."""
    machine.enter(data=Draws("a1"), user="u0")
    machine.enter(data=Draws("a1"), user="u1")
    machine.clean_run()
    machine.backfill(data=Draws("a1"), fault="401", resume=False)
    machine.reset_gist_then_backfill(data=Draws("a1"), fault="none", earlier=False)
    machine.clean_run()


def _event_owed_across_an_email_change(machine: Any) -> None:
    """u1 enters a tracked audience; Gist refuses its ``Audience Entered`` (still owed); the
    source gives u1 another email: the next run sends the contact with it, then the owed
    event, which must carry it too (``events._owed``), not the one it was planned with."""
    machine.enter(data=Draws("a1"), user="u1")
    machine.run(data=Draws(()), fault="refuse-events", kill=None, kill_after=1, form="str")
    machine.change_email(user="u1")
    machine.clean_run()


def _kept_value_across_a_reset(machine: Any) -> None:
    """u1 leaves an ``on_missing = "keep"`` trait's source, Gist keeping its value; Gist is
    reset and backfilled: the kept value must be sent again (``plan.save_backfill_plan``),
    or Gist lacks it for good while the state says Gist holds it."""
    machine.set_value(data=Draws("t2"), user="u1", value=2)
    machine.clean_run()
    machine.drop_value(data=Draws("t2"), user="u1")
    machine.clean_run()
    machine.reset_gist_then_backfill(data=Draws("t2"), fault="none", earlier=False)
    machine.clean_run()


def _broken_row_across_a_reset(machine: Any) -> None:
    """u1's row in a1's source is broken (rejected: u1 left as Gist holds them) when Gist is
    reset and backfilled: the backfill must send u1's acknowledged membership again
    (``plan.save_backfill_plan``), or Gist lacks it for good once the row is mended."""
    machine.enter(data=Draws("a1"), user="u0")
    machine.enter(data=Draws("a1"), user="u1")
    machine.clean_run()
    machine.toggle_broken_row(data=Draws("a1"), user="u1")
    machine.reset_gist_then_backfill(data=Draws("a1"), fault="none", earlier=False)
    machine.toggle_broken_row(data=Draws("a1"), user="u1")
    machine.clean_run()


def _reading_continued_after_a_run_of_another_key(machine: Any) -> None:
    """u0 is in a1 and a2; its email changes; a reconcile of a1 stops after its first page
    (u0, the old email); a run of a2 sends u0's new email; the reconcile is continued: the
    email acknowledged since it started must be kept (``reconcile._record``), or the state
    says the old email while Gist holds the new one."""
    machine.enter(data=Draws("a1"), user="u0")
    machine.enter(data=Draws("a2"), user="u0")
    machine.clean_run()  # u0 is Gist's first contact, its first page
    machine.enter(data=Draws("a1"), user="u1")
    machine.clean_run()
    machine.change_email(user="u0")
    machine.tamper_with_gist_then_reconcile(
        data=Draws({"a1"}), edits=[], per_page=1, stopped_after=1, killed=set(), others=True
    )
    machine.clean_run()


def _exit_by_a_run_of_some_keys(machine: Any) -> None:
    """u0 is in a1 and a2; a2's source gives u0 an email of its own, and a run of a2 alone
    sends it; u0 leaves a2, and a run of a2 alone sends the exit: the next run of every key
    must bring u0's contact back to a1's email, the first configured source's, though a1's
    own record of it never changed (``plan._drifted``)."""
    machine.enter(data=Draws("a1"), user="u0")
    machine.enter(data=Draws("a2"), user="u0")
    machine.clean_run()
    machine.change_email_in_one_source(data=Draws("a2"), user="u0", own=True)
    machine.run_some_keys_cleanly(data=Draws({"a2"}))
    machine.leave(data=Draws("a2"), user="u0")
    machine.run_some_keys_cleanly(data=Draws({"a2"}))
    machine.clean_run()


@pytest.mark.parametrize(
    "sequence",
    [_reconcile_after_a_run_killed_mid_send, _send_track_off_and_on,
     _backfill_stopped_then_gist_reset, _refused_after_a_lost_answer,
     _event_owed_across_an_email_change, _kept_value_across_a_reset,
     _broken_row_across_a_reset, _reading_continued_after_a_run_of_another_key,
     _exit_by_a_run_of_some_keys],
    ids=["reconcile-after-a-killed-run", "send-track-off-and-on", "backfill-across-a-reset",
         "refused-after-a-lost-answer", "event-owed-across-an-email-change",
         "kept-value-across-a-reset", "broken-row-across-a-reset",
         "reading-continued-after-another-keys-run", "exit-by-a-run-of-some-keys"],
)  # fmt: skip
@pytest.mark.parametrize(
    "store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_the_models_checks_hold_on_sequences_its_search_misses(store: str, sequence: Any) -> None:
    if store == "postgresql":
        require_postgres()
    machine: Any = machine_for(store)()
    try:
        machine.choose_batches_sources_and_members(
            batch=1, page_rows=delivery.PAGE_ROWS, data=Draws(*START)
        )
        sequence(machine)
    finally:
        machine.teardown()
