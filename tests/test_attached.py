"""A SQLite warehouse read by a SQLite state: the state database attaches the file and stages
the query's rows with SQL (``Staging.stage_attached``), the checks of the rows that are not
plain left to ``split_chunk``. Held here to the contract's own answer (``test_contract.expected``:
``check_row``, the first valid row of a user winning) by a differential test aimed at the SQL
that says a row is plain, and to its refusals: a query that could read the state's own tables
is read through Python."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, select

from audience_sync import db
from audience_sync.fakegist import FakeGist
from audience_sync.models import member_changes
from audience_sync.rows import MAX_EMAIL, MAX_USER_ID
from audience_sync.runs import open_run, utcnow
from audience_sync.sources import SqlSource
from audience_sync.stage import Staging
from audience_sync.sync import run_once
from tests.conftest import Workspace
from tests.test_contract import Outcome, expected, outcome_of, write_sqlite


class Attached:
    """One SQLite state connection, staging example after example."""

    def __init__(self, engine: Engine, connection: Connection, folder: Path) -> None:
        self.engine, self.connection, self.folder = engine, connection, folder
        self.warehouse = folder / "warehouse.db"

    def stage(self, rows: list[tuple[Any, Any]]) -> Outcome:
        query = write_sqlite(self.warehouse, rows)
        source = SqlSource(f"sqlite:///{self.warehouse}", query, "warehouse")
        run = open_run(self.engine, "vip", "VIP", source.description, "dry-run", utcnow())
        staging = Staging(self.connection)
        try:
            snapshot = staging.stage_attached(run, source, self.warehouse)
            assert snapshot is not None, "the attached path declined a plain warehouse"
            assert snapshot.staged_in == "database"
            return outcome_of(self.connection, snapshot)
        finally:
            staging.drop()


@pytest.fixture
def attached(migrated_sqlite: Path, tmp_path: Path) -> Iterator[Attached]:
    path = tmp_path / "state.db"
    shutil.copy(migrated_sqlite, path)
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            yield Attached(engine, connection, tmp_path)
    finally:
        engine.dispose()


# Texts near the edges of "plain": ASCII letters, the email's punctuation, a space at either
# end or inside, a tab, NUL, DEL and other controls, a letter beyond ASCII, U+00A0 (white
# space that is not ASCII), U+2028.
EDGY = st.text(alphabet="ab.@ \t\x00\x01\x1f\x7f\xe9\xa0\u2028", max_size=9)
VALUES = st.one_of(
    EDGY,
    EDGY.map(lambda text: text.replace(" ", "") + "@b.co"),
    st.builds("{}@{}".format, EDGY, EDGY),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.none(),
    st.binary(max_size=3),
    st.text(max_size=6),
)
SAME_USERS = st.sampled_from(["a", "b", 7, "7", 7.0, " a"])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(
        st.tuples(st.one_of(VALUES, SAME_USERS), st.one_of(VALUES, st.just("a@b.co"))),
        max_size=12,
    )
)
@example(rows=[("a\x00b", "a@b.co"), ("c", "c@b.co\x00x"), ("d", "d@b.co")])
@example(rows=[("u", "a@.b"), ("v", "a@b."), ("w", "a@..b"), ("x", "@b.c"), ("y", "a@@b.c")])
@example(rows=[("z", "a@b.c."), ("z2", "a.@b.c"), ("z3", "a@b.c.d")])
@example(rows=[("a" * MAX_USER_ID, "a@b.co"), ("b" * (MAX_USER_ID + 1), "b@b.co")])
@example(rows=[("e", "e" * (MAX_EMAIL - 5) + "@b.co"), ("f", "f" * (MAX_EMAIL - 4) + "@b.co")])
@example(rows=[(" a", "a@b.co"), ("a ", "x@b.co"), ("a", "first@b.co"), ("a", "second@b.co")])
@example(rows=[(42, "n@b.co"), ("42", "s@b.co"), (42.0, "f@b.co"), (-(2**63), "m@b.co")])
@example(rows=[(b"\xff", "b@b.co"), ("\xe9", "e@b.co"), ("g", "\xe9@b.co"), ("h", " h@b.co")])
def test_attached_staging_stages_what_the_contract_stages(
    attached: Attached, rows: list[tuple[Any, Any]]
) -> None:
    assert attached.stage(rows) == expected(rows)


def test_text_that_is_not_utf8_fails_the_source_as_reading_it_through_python_does(
    attached: Attached,
) -> None:
    query = write_sqlite(attached.warehouse, [])
    with sqlite3.connect(attached.warehouse) as database:
        database.execute("INSERT INTO given VALUES (0, CAST(X'61FF' AS TEXT), 'a@b.co')")
    database.close()
    source = SqlSource(f"sqlite:///{attached.warehouse}", query, "warehouse")
    run = open_run(attached.engine, "vip", "VIP", source.description, "dry-run", utcnow())
    staging = Staging(attached.connection)
    try:
        with pytest.raises(Exception, match="query failed: Could not decode to UTF-8"):
            staging.stage_attached(run, source, attached.warehouse)
    finally:
        staging.drop()


def run_warehouse(
    workspace: Workspace, engine: Engine, warehouse: Path, query: str
) -> tuple[str | None, dict[str, str]]:
    workspace.add_sql_audience("VIP", f"sqlite:///{warehouse}", query)
    [run] = run_once(workspace.settings(), engine, dry_run=True)
    assert run.status == "succeeded", run.error
    with engine.connect() as connection:
        planned = connection.execute(
            select(member_changes.c.user_id, member_changes.c.email).where(
                member_changes.c.run_id == run.run_id
            )
        ).all()
    return run.staged_in, dict(planned)


def test_a_sqlite_warehouse_is_staged_in_a_sqlite_state_and_read_through_python_otherwise(
    workspace: Workspace, engine: Engine, gist: FakeGist, tmp_path: Path
) -> None:
    rows = [(1, "a@b.co"), ("2", "b@b.co"), (" 3", "c@b.co"), ("x", "bad"), (1, "again@b.co")]
    query = write_sqlite(tmp_path / "warehouse.db", rows)

    staged_in, planned = run_warehouse(workspace, engine, tmp_path / "warehouse.db", query)

    assert staged_in == ("database" if engine.dialect.name == "sqlite" else "python")
    assert planned == {"1": "a@b.co", "2": "b@b.co", "3": "c@b.co"}


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("table", "query"),
    [
        # A warehouse table named as a state table: unqualified, it would read the state's.
        ("contacts", "SELECT user_id, email FROM contacts ORDER BY pos"),
        ("staged_1", "SELECT user_id, email FROM staged_1 ORDER BY pos"),
        # The query names a schema, which the attached path would read as the state's.
        ("given", "SELECT user_id, email FROM main.given ORDER BY pos"),
    ],
)
def test_a_query_that_could_read_the_states_own_tables_is_read_through_python(
    workspace: Workspace, engine: Engine, gist: FakeGist, tmp_path: Path, table: str, query: str
) -> None:
    with engine.begin() as connection:  # the state knows a contact the warehouse does not
        connection.exec_driver_sql(
            "INSERT INTO contacts (user_id, email, updated_at, last_run_id) "
            "VALUES ('state-only', 's@b.co', CURRENT_TIMESTAMP, 0)"
        )
    write_sqlite(tmp_path / "warehouse.db", [("w1", "w1@b.co"), ("w2", "w2@b.co")], table)

    staged_in, planned = run_warehouse(workspace, engine, tmp_path / "warehouse.db", query)

    assert staged_in == "python"
    assert planned == {"w1": "w1@b.co", "w2": "w2@b.co"}
