"""Computed traits, track events and Engage exports, end to end through the fake Gist."""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from audience_sync.engage import read_engage
from audience_sync.fakegist import FakeGist
from audience_sync.models import member_changes, rejected_rows
from audience_sync.rows import encode_value
from audience_sync.sync import run_once
from tests.conftest import Workspace, require_postgres
from tests.helpers import acknowledged, in_gist

FIXTURES = Path(__file__).parent / "fixtures" / "engage"
REVENUE = "total_revenue"


def add_trait(workspace: Workspace, name: str = "Total Revenue", **options: Any) -> Path:
    """A trait read from a JSONL file; returns the file."""
    path = workspace.root / f"trait{len(workspace.audiences)}.jsonl"
    path.write_text("")
    workspace.traits.append({"name": name, "file": path.name, **options})
    workspace.write_config()
    return path


def write_values(path: Path, values: dict[int, Any]) -> None:
    import json

    path.write_text(
        "".join(
            json.dumps({"user_id": f"u{n}", "email": f"u{n}@example.com", "value": v}) + "\n"
            for n, v in values.items()
        )
    )


def sent(gist: FakeGist, key: str) -> dict[str, Any]:
    return {
        r.body["user_id"]: r.body["custom_properties"][key]
        for r in gist.requests("/contacts")
        if key in r.body.get("custom_properties", {})
    }


def test_trait_values_are_sent_when_they_change(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace)
    write_values(source, {1: 10, 2: "gold", 3: None, 4: True})

    [first] = run_once(workspace.settings(), engine)
    assert (first.status, first.entered, first.delivered) == ("succeeded", 4, 4)
    assert gist.properties(REVENUE) == {"u1": 10, "u2": "gold", "u3": None, "u4": True}

    gist.clear_log()
    [same] = run_once(workspace.settings(), engine)
    assert (same.entered, same.exited, gist.requests()) == (0, 0, [])

    write_values(source, {1: 10.0, 2: "gold", 3: None, 4: 1})  # 10 → 10.0, True → 1
    [typed] = run_once(workspace.settings(), engine)
    assert sent(gist, REVENUE) == {"u1": 10.0, "u4": 1}
    assert isinstance(gist.properties(REVENUE)["u1"], float)
    assert typed.entered == 2

    gist.clear_log()
    write_values(source, {1: 10.0, 4: 1})  # u2, u3 leave: u2 gets null, u3 already is
    [gone] = run_once(workspace.settings(), engine)
    assert sent(gist, REVENUE) == {"u2": None}
    assert gone.exited == 1


def test_on_missing_keep(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    source = add_trait(workspace, on_missing="keep")
    write_values(source, {1: 1, 2: 2})
    run_once(workspace.settings(), engine)
    gist.clear_log()
    write_values(source, {1: 1})
    [run] = run_once(workspace.settings(), engine)
    assert (run.exited, gist.requests()) == (0, [])
    assert gist.properties(REVENUE)["u2"] == 2


def test_a_backfill_sends_again_the_values_kept_for_users_gone_from_the_source(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """With ``on_missing = "keep"`` Gist keeps a value for a user gone from the source, and
    the state says it does. A backfill after a Gist reset (what it is for) sent only the
    source's users: the kept value was gone from Gist for good, while the state said Gist
    held it, so no run ever sent it again. It is sent again, unchanged, owing no event."""
    source = add_trait(workspace, on_missing="keep", send_track=True)
    write_values(source, {1: 5, 2: 7})
    run_once(workspace.settings(), engine)
    write_values(source, {2: 7})  # u1 leaves: Gist keeps 5 for u1
    run_once(workspace.settings(), engine)
    assert gist.properties(REVENUE) == {"u1": 5, "u2": 7}
    for user in ("u1", "u2"):  # the workspace is reset
        gist.drop_property(user, REVENUE)
    gist.clear_log()
    announced = len(events(gist))

    [backfill] = run_once(workspace.settings(), engine, [REVENUE], mode="backfill")

    assert (backfill.status, backfill.entered, backfill.delivered) == ("succeeded", 2, 2)
    assert sent(gist, REVENUE) == {"u1": 5, "u2": 7}
    assert gist.properties(REVENUE) == {"u1": 5, "u2": 7}
    assert len(events(gist)) == announced  # nothing Gist acknowledged changed
    gist.clear_log()
    [after] = run_once(workspace.settings(), engine)
    assert (after.entered, after.exited, gist.requests()) == (0, 0, [])


def test_a_backfill_resends_the_value_of_a_user_whose_row_it_rejected(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """As for an audience's member: a rejected row keeps its user's value, and a backfill
    after a reset sends the acknowledged one again (``on_missing = "null"`` too)."""
    source = add_trait(workspace)
    write_values(source, {1: 5, 2: 7})
    run_once(workspace.settings(), engine)
    for user in ("u1", "u2"):
        gist.drop_property(user, REVENUE)
    source.write_text(source.read_text().replace('"u1@example.com"', '"broken"'))

    [backfill] = run_once(workspace.settings(), engine, [REVENUE], mode="backfill")

    assert (backfill.status, backfill.rejected, backfill.delivered) == ("succeeded", 1, 2)
    assert gist.properties(REVENUE) == {"u1": 5, "u2": 7}


@pytest.mark.parametrize(
    ("trait_type", "cell", "expected"),
    [
        (None, "5", "5"),
        ("int", "5", 5),
        ("float", "5", 5.0),
        ("bool", "yes", True),
        ("string", "5", "5"),
        ("int", "", None),
    ],
    ids=["csv-is-text", "int", "float", "bool", "string", "empty-is-null"],
)
def test_csv_values_are_typed_by_the_trait(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    trait_type: str | None,
    cell: str,
    expected: Any,
) -> None:
    path = workspace.root / "scores.csv"
    path.write_text(f"user_id,email,value\nu1,u1@example.com,{cell}\n")
    options = {"type": trait_type} if trait_type else {}
    workspace.traits.append({"name": "Total Revenue", "file": path.name, **options})
    workspace.write_config()

    run_once(workspace.settings(), engine)

    value = gist.properties(REVENUE)["u1"]
    assert value == expected
    assert type(value) is type(expected)


def test_a_value_of_the_wrong_type_is_rejected(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    path = workspace.root / "scores.csv"
    path.write_text("user_id,email,value\nu1,u1@example.com,7\nu2,u2@example.com,lots\n")
    workspace.traits.append({"name": "Total Revenue", "file": path.name, "type": "int"})
    workspace.write_config()

    [run] = run_once(workspace.settings(), engine)

    assert (run.rejected, run.delivered) == (1, 1)
    with engine.connect() as connection:
        reason = connection.scalar(select(rejected_rows.c.reason))
    assert reason == "value 'lots' is not int"


def test_sql_traits_keep_the_database_types(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    warehouse = workspace.root / "warehouse.db"
    connection = sqlite3.connect(warehouse)
    connection.executescript(
        "CREATE TABLE t (user_id TEXT, email TEXT, value);"
        "INSERT INTO t VALUES ('u1', 'u1@example.com', 3), ('u2', 'u2@example.com', 2.5),"
        " ('u3', 'u3@example.com', '3'), ('u4', 'u4@example.com', NULL);"
    )
    connection.commit()
    connection.close()
    workspace.sources["warehouse"] = f"sqlite:///{warehouse}"
    workspace.traits.append(
        {"name": "Total Revenue", "source": "warehouse", "query": "SELECT * FROM t"}
    )
    workspace.write_config()

    run_once(workspace.settings(), engine)

    assert gist.properties(REVENUE) == {"u1": 3, "u2": 2.5, "u3": "3", "u4": None}
    assert isinstance(gist.properties(REVENUE)["u1"], int)


@pytest.mark.postgres
@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)  # rows through Python
def test_exact_decimals_without_fraction_digits_are_sent_as_integers(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # PostgreSQL's numeric arrives as Decimal: 3 and 1E+2 are integers, 2.50 is a float.
    workspace.sources["warehouse"] = require_postgres()
    query = (
        "SELECT * FROM (VALUES ('u1', 'u1@example.com', 3::numeric),"
        " ('u2', 'u2@example.com', 2.50::numeric), ('u3', 'u3@example.com', 1e2::numeric))"
        " AS t(user_id, email, value)"
    )
    workspace.traits.append({"name": "Total Revenue", "source": "warehouse", "query": query})
    workspace.write_config()

    run_once(workspace.settings(), engine)

    held = gist.properties(REVENUE)
    assert held == {"u1": 3, "u2": 2.5, "u3": 100}
    assert [type(held[u]) for u in ("u1", "u2", "u3")] == [int, float, int]


def test_audiences_and_traits_share_one_request_per_user(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    from tests.conftest import write_members

    audience = workspace.add_file_audience("VIP Customers")
    trait = add_trait(workspace)
    write_members(audience, [1, 2])
    write_values(trait, {2: 99, 3: 5})

    run_once(workspace.settings(), engine)

    bodies = {r.body["user_id"]: r.body["custom_properties"] for r in gist.requests()}
    assert len(gist.requests()) == 3
    assert bodies["u2"] == {"vip_customers": True, REVENUE: 99}


def test_trait_failure_half_way_then_rerun_completes(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    source = add_trait(workspace)
    write_values(source, {n: n * 10 for n in range(20)})
    gist.fail_after(7, 503)

    [broken] = run_once(workspace.settings(), engine)
    assert (broken.status, broken.delivered) == ("failed", 7)

    gist.reset_faults()
    [fixed] = run_once(workspace.settings(), engine)
    assert fixed.status == "succeeded"
    assert gist.properties(REVENUE) == {f"u{n}": n * 10 for n in range(20)}
    gist.clear_log()
    assert run_once(workspace.settings(), engine)[0].entered == 0


def events(gist: FakeGist) -> list[dict[str, Any]]:
    return gist.events()


def test_track_events_follow_acknowledged_changes(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    from tests.conftest import write_members

    source = workspace.add_file_audience("VIP Customers", send_track=True)
    write_members(source, [1, 2, 3])

    run_once(workspace.settings(), engine)

    entered = events(gist)
    assert sorted(e["user_id"] for e in entered) == ["u1", "u2", "u3"]
    assert all(e["event_name"] == "Audience Entered" for e in entered)
    assert entered[0]["properties"] == {"audience_key": "vip_customers", "vip_customers": True}
    assert isinstance(entered[0]["occurred_at"], int)
    first_event = min(r.at for r in gist.requests("/events"))
    assert max(r.at for r in gist.requests("/contacts")) <= first_event  # contacts first

    write_members(source, [2, 3])
    run_once(workspace.settings(), engine)
    assert events(gist)[-1]["event_name"] == "Audience Exited"
    assert events(gist)[-1]["user_id"] == "u1"
    assert len(events(gist)) == 4


def test_events_are_retried_until_acknowledged_and_never_twice(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    from tests.conftest import write_members

    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    source = workspace.add_file_audience(
        "VIP Customers", send_track=True, entered_event="Became VIP"
    )
    write_members(source, range(6))
    gist.fail_after(6 + 2, 503)  # every contact, then two events, then Gist goes down

    [broken] = run_once(workspace.settings(), engine)
    assert broken.status == "failed"
    assert acknowledged(engine, "vip_customers") == {f"u{n}" for n in range(6)}
    assert len(events(gist)) == 2

    gist.reset_faults()
    [fixed] = run_once(workspace.settings(), engine)  # no contact change, events still owed
    assert (fixed.status, fixed.entered) == ("succeeded", 0)
    assert Counter(e["user_id"] for e in events(gist)) == Counter(f"u{n}" for n in range(6))
    assert {e["event_name"] for e in events(gist)} == {"Became VIP"}
    with engine.connect() as connection:
        statuses = set(connection.scalars(select(member_changes.c.event_status)))
    assert statuses == {"delivered"}
    run_once(workspace.settings(), engine)
    assert len(events(gist)) == 6


def test_trait_events(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    source = add_trait(workspace, send_track=True)
    write_values(source, {1: 5})
    run_once(workspace.settings(), engine)
    [event] = events(gist)
    assert event["event_name"] == "Trait Computed"
    assert event["properties"] == {"trait_key": REVENUE, REVENUE: 5}


@pytest.mark.parametrize(
    "fixture", ["audience_identify.jsonl", "audience_track.jsonl"], ids=["identify", "track"]
)
def test_engage_audience_export(
    workspace: Workspace, engine: Engine, gist: FakeGist, fixture: str
) -> None:
    shutil.copy(FIXTURES / fixture, workspace.root / "engage.jsonl")
    workspace.audiences.append(
        {"name": "First Time Shopper", "file": "engage.jsonl", "format": "engage"}
    )
    workspace.write_config()
    expected = {
        user_id
        for chunk in read_engage(
            workspace.root / "engage.jsonl", "first_time_shopper", kind="audience"
        )
        for _, user_id, email, _ in chunk
        if email
    }
    gist.fail_after(1, 503)
    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    workspace.write_config()

    run_once(workspace.settings(), engine)
    gist.reset_faults()
    [run] = run_once(workspace.settings(), engine)

    assert run.status == "succeeded"
    assert expected
    assert in_gist(gist, "first_time_shopper") == expected
    assert acknowledged(engine, "first_time_shopper") == expected


def test_engage_trait_export(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    shutil.copy(FIXTURES / "computed_trait.jsonl", workspace.root / "engage.jsonl")
    workspace.traits.append(
        {"name": "Total Revenue 180 Days", "file": "engage.jsonl", "format": "engage"}
    )
    workspace.write_config()
    expected = {
        user_id: value
        for chunk in read_engage(
            workspace.root / "engage.jsonl", "total_revenue_180_days", kind="trait"
        )
        for _, user_id, email, value in chunk
        if email
    }

    [run] = run_once(workspace.settings(), engine)

    assert run.status == "succeeded"
    held = gist.properties("total_revenue_180_days")
    assert held == expected
    assert {type(v) for v in held.values()} >= {float, str}


def test_retiring_a_trait_nulls_its_values(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace)
    write_values(source, {1: 5, 2: "x"})
    other = workspace.add_file_audience("Kept")
    run_once(workspace.settings(), engine)
    workspace.traits.clear()
    workspace.write_config()
    assert other.exists()

    [retired] = run_once(workspace.settings(), engine, [REVENUE], mode="retire")

    assert (retired.status, retired.exited) == ("succeeded", 2)
    assert gist.properties(REVENUE) == {"u1": None, "u2": None}


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "sNaN"])
def test_a_decimal_no_json_can_carry_is_refused_saying_so(text: str) -> None:
    """A PostgreSQL ``numeric`` NaN or Infinity, as a float's: the reason says why, not what
    ``int()`` said of it (a review's find)."""
    with pytest.raises(ValueError, match=r"^value of type Decimal cannot be sent$"):
        encode_value(Decimal(text))
