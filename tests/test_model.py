"""The proof of exactness: a Hypothesis state machine drives the real engine (real state
database, real HTTP to the fake Gist) through interleavings nobody wrote down, against a
simple model of the sources, and checks after every clean run that Gist holds exactly the
source, the state database holds exactly what Gist holds, a further run sends nothing, and
every acknowledged entry and exit produced its event.

Rules: members enter, leave and re-enter; emails change; trait values change type, go null
and disappear (``on_missing`` null and keep); numeric user ids arrive as ``42``, ``"42"``
or ``42.0``; runs of all keys or a subset; faults per request (5xx, 429, 401, a per-user
422, a batch answer naming a failed contact, the answer lost after Gist applied the change,
the connection dropped before); a kill at a chosen step (loading, planned, after some
answers); backfill; retire and re-adding a key as the other kind; an edit made in Gist
behind the tool's back followed by ``verify --repair``; prune. Keys with and without
``send_track``.

CI runs a fixed, seeded profile on SQLite and PostgreSQL; ``HYPOTHESIS_PROFILE=long`` runs
a thousand examples per store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
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
from sqlalchemy.pool import NullPool

from audience_sync import db
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
from audience_sync.runs import utcnow
from audience_sync.statuses import Mode
from audience_sync.sync import RunResult, run_once
from audience_sync.verify import verify_audience
from tests.conftest import API_KEY, postgres_admin_url

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
        "batch-error",
        "lost-after-apply",
        "lost-before",
    ]
)
kills = st.sampled_from([None, None, "loading", "planned", "sending"])


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
    epoch: int = 0  # events Gist had before this key was (re)configured belong to no one
    members: set[str] = field(default_factory=set)
    values: dict[str, Any] = field(default_factory=dict)
    # on_missing = "keep": canonical values Gist may hold for a user gone from the source.
    possible: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Users holding the `false` that retiring the key's old audience kind left in Gist,
    # which the trait's state never tracked.
    leftover: set[str] = field(default_factory=set)


def canonical(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value, sort_keys=True, separators=(",", ":"))


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (1, 1.0 and true differ)."""
    return canonical(a) == canonical(b)


def machine_for(store: str) -> type[RuleBasedStateMachine]:
    class SyncMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.root = Path(tempfile.mkdtemp(prefix="audience-sync-model-"))
            self.schema: str | None = None
            if store == "sqlite":
                self.state_url = f"sqlite:///{self.root / 'state.db'}"
            else:
                admin = postgres_admin_url()
                assert admin is not None
                self.schema = f"m_{uuid.uuid4().hex[:12]}"
                self.admin = create_engine(admin, poolclass=NullPool)
                with self.admin.begin() as connection:
                    connection.execute(text(f'CREATE SCHEMA "{self.schema}"'))
                self.state_url = f"{admin}?options=-csearch_path%3D{self.schema}"
            self.engine: Engine = db.make_engine(self.state_url)
            db.upgrade(self.engine)
            self.gist = FakeGist(api_key=API_KEY).start()
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

        def teardown(self) -> None:
            self.gist.stop()
            self.engine.dispose()
            if self.schema is not None:
                with self.admin.begin() as connection:
                    connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
                self.admin.dispose()
            shutil.rmtree(self.root, ignore_errors=True)

        # ------------------------------------------------------------- the sources

        def email(self, user: str) -> str:
            return f"{user}.{self.emails[user]}@example.com"

        def write(self, form: str) -> Path:
            """The config and every configured key's JSONL source; numeric ids in ``form``."""

            def user_id(user: str) -> Any:
                if user not in NUMERIC:
                    return user
                return {"int": NUMERIC[user], "float": float(NUMERIC[user]), "str": user}[form]

            lines = [
                "[state]",
                f"url = {json.dumps(self.state_url)}",
                "[gist]",
                f'api_key = "{API_KEY}"',
                f"base_url = {json.dumps(self.gist.url)}",
                "requests_per_second = 2000",
                "max_concurrency = 2",
                "timeout_seconds = 2",
                "max_retries = 1",
                "retry_backoff_seconds = 0.001",
                f"batch_size = {self.batch_size}",
            ]
            for key, model in self.keys.items():
                path = self.root / f"{key}.jsonl"
                if model.kind == "audience":
                    rows = [{"user_id": user_id(u), "email": self.email(u)} for u in model.members]
                else:
                    rows = [
                        {"user_id": user_id(u), "email": self.email(u), "value": v}
                        for u, v in model.values.items()
                    ]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                section = "audiences" if model.kind == "audience" else "traits"
                lines += [
                    f"[[{section}]]",
                    f'name = "{key}"',
                    f'key = "{key}"',
                    f'file = "{path.name}"',
                    f"send_track = {str(model.track).lower()}",
                ]
                if model.kind == "trait":
                    lines.append(f'on_missing = "{model.on_missing}"')
            config = self.root / "audience_sync.toml"
            config.write_text("\n".join(lines) + "\n")
            return config

        def sync(
            self,
            keys: tuple[str, ...] = (),
            *,
            mode: Mode = "run",
            fault: str = "none",
            kill: str | None = None,
            kill_after: int = 1,
            form: str = "str",
        ) -> list[RunResult] | None:
            config = self.write(form)
            self.inject(fault)
            progress = KillAt(kill, kill_after) if kill else None
            self.gist.clear_log()
            try:
                return run_once(
                    load_settings(config, {}),
                    self.engine,
                    keys,
                    mode=mode,
                    allow_mass_exit=True,
                    progress=progress,
                )
            except SimulatedKill:
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
            elif fault == "batch-error":
                self.gist.fail_in_batch("u2")
            elif fault == "lost-after-apply":
                self.gist.drop_after_applying(3)
            elif fault == "lost-before":
                self.gist.drop_next(3)

        def configured(self, kind: str | None = None) -> list[str]:
            return sorted(k for k, m in self.keys.items() if kind in (None, m.kind))

        # ----------------------------------------------------------------- rules

        @initialize(batch=st.sampled_from([1, 1, 3]))
        def choose_batches(self, batch: int) -> None:
            self.batch_size = batch

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def enter(self, data: st.DataObject, user: str) -> None:
            key = data.draw(st.sampled_from(self.configured("audience") or ["-"]))
            if key in self.keys:
                self.keys[key].members.add(user)

        @rule(data=st.data(), user=st.sampled_from(USERS))
        def leave(self, data: st.DataObject, user: str) -> None:
            key = data.draw(st.sampled_from(self.configured("audience") or ["-"]))
            if key in self.keys:
                self.keys[key].members.discard(user)

        @rule(user=st.sampled_from(USERS))
        def change_email(self, user: str) -> None:
            self.emails[user] += 1

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

        @rule(data=st.data(), fault=faults)
        def backfill(self, data: st.DataObject, fault: str) -> None:
            key = data.draw(st.sampled_from(self.configured()))
            self.sync((key,), mode="backfill", fault=fault)

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
            for user, contact in self.gist.contacts().items():
                assert contact["custom_properties"].get(key) in (None, False)
                if contact["custom_properties"].get(key) is False:
                    cleared.add(user)
            self.retired.add(key)
            kind = "trait" if old.kind == "audience" else "audience"
            self.keys[key] = Key(
                kind, track=data.draw(st.booleans()), epoch=len(self.gist.events())
            )
            if kind == "trait":
                self.keys[key].leftover = cleared
            for user in USERS:  # what the retire left: a cleared value of the old kind
                self.keys[key].possible[user] |= {"absent", "null", "false"}
            self.retired.discard(key)

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
                load_settings(config, {}), self.engine, key, sample=100, repair=True
            )
            # An uncertain member is re-sent by the next run anyway: verify leaves it out.
            found = any(d.user_id == user for d in report.drifted)
            assert found != bool(unsure), report

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
            results = self.sync()
            assert results is not None
            assert [r.status for r in results] == ["succeeded"] * len(results), results
            self.check_gist()
            self.check_state()
            self.check_events()
            for model in self.keys.values():
                for user, value in model.values.items():
                    model.possible[user] = {canonical(value)}
            again = self.sync()
            assert again is not None
            assert self.gist.requests() == [], "a run after a clean run sent something"
            assert all((r.entered, r.exited, r.resent) == (0, 0, 0) for r in again), again

        # ------------------------------------------------------------- checks

        def check_gist(self) -> None:
            contacts = self.gist.contacts()
            for key, model in self.keys.items():
                for user in USERS:
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
                for contact in contacts.values():
                    assert contact["custom_properties"].get(key) in (None, False)
            present = {u for m in self.keys.values() for u in (*m.members, *m.values)}
            for user in present:
                assert contacts[user]["email"] == self.email(user), user

        def check_state(self) -> None:
            contacts = self.gist.contacts()
            with self.engine.connect() as connection:
                assert connection.scalar(select(func.count()).select_from(uncertain_members)) == 0
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
            last: dict[tuple[str, str], dict[str, Any]] = {}
            for index, event in enumerate(events):
                props = event["properties"]
                key = props.get("audience_key", props.get("trait_key"))
                if key in self.keys and index >= self.keys[key].epoch:
                    last[(key, event["user_id"])] = event
            for key in tracked:
                model = self.keys[key]
                for user in USERS:
                    latest = last.get((key, user))
                    if model.kind == "audience":
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
@pytest.mark.timeout(3600 if LONG else 600)
@pytest.mark.parametrize(
    "store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_gist_converges_under_every_interleaving(store: str) -> None:
    if store == "postgresql" and postgres_admin_url() is None:
        if os.environ.get("AUDIENCE_SYNC_REQUIRE_POSTGRES"):
            pytest.fail("AUDIENCE_SYNC_REQUIRE_POSTGRES is set but PostgreSQL is not reachable")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (database test)")
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
