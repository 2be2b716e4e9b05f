"""Staging a source snapshot: rows checked, deduplicated and written to a temporary table.

Each run of an invocation stages into a temporary table of its own on the one connection
the invocation plans with. A temporary table is gone with its connection, so a kill at any
point leaves nothing a later run could misread, and nothing has to be deleted row by row.

- SQLite: appended to an unindexed table, then copied in ``user_id`` order into a ``WITHOUT
  ROWID`` table keyed on it (``INSERT OR IGNORE``: the first row of a user wins), in one
  transaction. SQLite's sorter sorts in bounded memory and spills to temporary files, and
  the keyed table is then built by appending; inserted in the source's order, the B-tree
  needed a page cache the size of the snapshot (memory growing with it) or went slower.
- PostgreSQL: one ``COPY`` (text format, joined in C) into an unindexed table whose ``seq``
  numbers the rows as they arrive, then a unique index built once (duplicates, rare, are
  removed first: the lowest ``seq`` wins), which also records the table's size for the
  planner. Never the rows' physical position: PostgreSQL puts a row wherever its free-space
  map finds room, so a short row may land before a longer one copied earlier.

Rejected rows go to a temporary table too and reach ``rejected_rows`` in one short
transaction, so staging never holds a write lock on the state database itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, ColumnElement, MetaData, Table, Text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.db import sqlite_path
from audience_sync.errors import SourceError, StopRequestedError
from audience_sync.native import checked_rows, column_families, embedded
from audience_sync.rows import CHUNK_SIZE, MAX_EMAIL, MAX_USER_ID, Staged, split_chunk
from audience_sync.sources import Source, SqlSource

REJECTED = "staged_rejected"
# A warehouse-native snapshot: the checked rows of the query, numbered in its order.
_CHECKED_COLUMNS = (
    "seq BIGINT, user_id TEXT, email TEXT, value TEXT, reason TEXT, shown_user TEXT, "
    "shown_email TEXT"
)
# A snapshot staged from Python (PostgreSQL): COPY numbers the rows in the order it reads them.
# The sequence hands this one session its numbers in order, 10,000 at a time: without a cache
# each row's number costs a sequence update (0.12 s per 1M rows, within noise with it).
_COPIED_COLUMNS = (
    "user_id TEXT NOT NULL, email TEXT NOT NULL, value TEXT, "
    "seq BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 10000)"
)
_COLUMNS = ("user_id", "email", "value")  # of a snapshot; an audience's rows fill the first two
# PostgreSQL memory for one invocation's sorts and hash joins over a snapshot, so that
# neither spills to disk in batches (server memory, for the statement's duration only).
WORK_MEM = "256MB"
SORTER_THREADS = 1  # SQLite: helper threads a sort may use beside the calling one


@dataclass(frozen=True)
class Snapshot:
    """One run's staged source: its temporary table (``user_id`` unique, ``email``,
    ``value``) and what loading it saw."""

    run_id: int
    table: Table
    source_rows: int
    rejected: int
    first_rejection: str | None = None  # "row N: reason" of the first rejected row
    staged_in: str = "python"  # where the rows were checked: "python", or "database"


class Staging:
    """The temporary tables of one invocation's snapshots, on one connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._postgres = connection.dialect.name == "postgresql"
        self._tables: list[str] = []
        if not self._postgres:
            # One helper thread for SQLite's sorter, which copies a snapshot in key order:
            # 3-6% off a 1M dry run (ordered or shuffled source) for ~2 MB at any size.
            with connection.begin():
                connection.exec_driver_sql(f"PRAGMA threads = {SORTER_THREADS}")

    def stage(
        self,
        run_id: int,
        source: Source,
        should_stop: Callable[[], bool] = lambda: False,
        on_rows: Callable[[int], None] = lambda rows: None,
        *,
        value_type: str | None = None,
    ) -> Snapshot:
        """Read ``source``'s checked batches into run ``run_id``'s table (a computed trait's
        ``value`` as canonical JSON, typed by ``value_type`` when the source gives text)."""
        connection = self._connection
        table = self._create(run_id)
        total = rejected = 0
        first: str | None = None
        keep = f"INSERT INTO {REJECTED} VALUES ({', '.join([self._mark] * 5)})"
        copy: _Copy | None = None  # PostgreSQL: open while good rows stream in
        arrived = f"arrived_{run_id}"  # SQLite: the rows in the source's order
        with connection.begin():
            if not self._postgres:
                connection.exec_driver_sql(
                    f'CREATE TEMPORARY TABLE "{arrived}" (user_id TEXT, email TEXT, value TEXT)'
                )
            try:
                for batch in source.batches(value_type):
                    if should_stop():
                        raise StopRequestedError("stopped by a signal while reading the source")
                    good, bad = batch.good, batch.bad
                    if bad:
                        if copy is not None:  # no other statement while a COPY runs
                            copy.close(None)
                            copy = None
                        first = first or f"row {bad[0][0]}: {bad[0][3]}"
                        connection.exec_driver_sql(keep, [(run_id, *row) for row in bad])
                    if self._postgres and good:
                        copy = copy or _Copy(connection, table.name, len(good[0]))
                        copy.write(good)
                    elif good:
                        columns = _COLUMNS[: len(good[0])]
                        connection.exec_driver_sql(
                            f'INSERT INTO "{arrived}" ({", ".join(columns)}) '
                            f"VALUES ({', '.join('?' * len(columns))})",
                            good,
                        )
                    total += batch.rows
                    rejected += len(bad)
                    on_rows(batch.rows)
            except BaseException as exc:
                if copy is not None:
                    copy.close(exc)
                raise
            if copy is not None:
                copy.close(None)
            if self._postgres:
                self._index(table.name)
            else:
                # rowid is the source's order: of a user's rows, the first is inserted first.
                connection.exec_driver_sql(
                    f'INSERT OR IGNORE INTO "{table.name}" SELECT user_id, email, value '
                    f'FROM "{arrived}" ORDER BY user_id, rowid'
                )
                connection.exec_driver_sql(f'DROP TABLE "{arrived}"')
        self._keep_rejected(run_id, rejected)
        return Snapshot(run_id, table, total, rejected, first)

    def stage_query(self, run_id: int, source: SqlSource) -> Snapshot:
        """Warehouse-native staging (PostgreSQL): run an audience's query on this very
        database and stage its rows with SQL alone — the same checks, canonical user ids and
        "the first row of a user wins" as ``stage``, but no row crosses into Python. The
        query runs in a READ ONLY transaction (temporary tables stay writable there)."""
        source.check_statement()
        connection = self._connection
        # The checked rows stay where the query put them and become the snapshot once the
        # rejected ones are taken out: the diff reads only user_id and email of it.
        table = self._create(run_id, _CHECKED_COLUMNS)
        name = table.name
        try:
            with connection.begin():
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                # The query sees what it would on a connection of its own: the database's
                # (or role's) search_path, not state.schema (see db.make_engine).
                connection.exec_driver_sql("SET LOCAL search_path TO DEFAULT")
                families = column_families(connection, source.query)
                # no_parameters: a `%` of the query (LIKE 'a%') is not a placeholder.
                total = (
                    connection.execution_options(no_parameters=True)
                    .exec_driver_sql(
                        f'INSERT INTO "{name}" (seq, user_id, email, reason, shown_user, '
                        f"shown_email) {checked_rows(source.query, *families)}"
                    )
                    .rowcount
                )
        except SQLAlchemyError as exc:
            if "column q.user_id does not exist" in str(exc) or (
                "column q.email does not exist" in str(exc)
            ):
                raise SourceError(
                    f"{source.description}: the query must return columns user_id and email"
                ) from exc
            raise source.failure(exc) from exc
        with connection.begin():
            rejected = connection.exec_driver_sql(
                f"INSERT INTO {REJECTED} SELECT %s, seq, shown_user, shown_email, reason "
                f'FROM "{name}" WHERE reason IS NOT NULL',
                (run_id,),
            ).rowcount
            first = None
            if rejected:
                seq, reason = connection.exec_driver_sql(
                    f"SELECT row_number, reason FROM {REJECTED} WHERE run_id = %s "
                    "ORDER BY row_number LIMIT 1",
                    (run_id,),
                ).one()
                first = f"row {seq}: {reason}"
                connection.exec_driver_sql(f'DELETE FROM "{name}" WHERE reason IS NOT NULL')
            self._index(name)  # of a user's rows, the first of the query's (lowest seq)
        self._keep_rejected(run_id, rejected)
        return Snapshot(run_id, table, total, rejected, first, staged_in="database")

    def stage_attached(
        self,
        run_id: int,
        source: SqlSource,
        database: Path,
        on_rows: Callable[[int], None] = lambda rows: None,
    ) -> Snapshot | None:
        """Stage an audience's query on a SQLite file into a SQLite state by attaching the
        file (read-only) and running the query inside the state database: the rows go from
        one file to the other without crossing into Python, as the rows of a bare
        ``INSERT … SELECT`` do. Each row is marked plain when ``split_chunk`` would stage it
        as it stands (``PLAIN_ROW``: an integer id or ASCII text with nothing to trim, an
        email the contract's pattern accepts); the others, rare, are read back in the
        query's order and checked by ``split_chunk`` itself, so the contract has one
        implementation and the SQL only says when it has nothing to do.

        None, with nothing staged, when the query could name a table of the state rather
        than of the source (a name both hold, or ``main``/``temp``/``sqlite_`` in the
        query: unqualified names look in the state's schemas first), or when SQLite cannot
        attach the file read-only: the caller then reads it through Python."""
        source.check_statement()
        if _ATTACH_UNSAFE.search(source.query) or not self._uri_filenames():
            return None
        # ATTACH and DETACH run outside any transaction (SQLite refuses them inside one).
        driver = self._connection.connection.driver_connection
        assert driver is not None
        uri = database.absolute().as_uri() + "?mode=ro"
        try:
            driver.execute(f"ATTACH DATABASE ? AS {_ATTACHED}", (uri,))
        except self._connection.dialect.loaded_dbapi.Error:
            return None  # another text encoding, not a database: Python reads it or says why
        try:
            if self._shared_names(run_id):
                return None
            return self._stage_attached(run_id, source, on_rows)
        finally:
            driver.execute(f"DETACH DATABASE {_ATTACHED}")

    def _stage_attached(
        self, run_id: int, source: SqlSource, on_rows: Callable[[int], None]
    ) -> Snapshot:
        connection = self._connection
        table = self._create(run_id)
        arrived = f"arrived_{run_id}"
        total = rejected = 0
        first: str | None = None
        with connection.begin():
            # No declared types: each value keeps the type the query gave it (an integer
            # stays an integer, a float a float) for the checks of the rows not plain.
            connection.exec_driver_sql(
                f'CREATE TEMPORARY TABLE "{arrived}" (user_id, email, plain INTEGER)'
            )
            try:
                query = embedded(source.query)
                names = connection.exec_driver_sql(f"SELECT * FROM {query} AS q LIMIT 0").keys()
                source.check_columns(list(names))
                total = connection.exec_driver_sql(
                    f'INSERT INTO "{arrived}" (user_id, email, plain) SELECT CASE WHEN '
                    "typeof(q.user_id) = 'integer' THEN CAST(q.user_id AS TEXT) ELSE q.user_id "
                    f"END, q.email, {PLAIN_ROW} FROM {query} AS q"
                ).rowcount
                on_rows(total)
                # rowid: the query's order, numbering the rows from 1 as the source does.
                after = 0
                while page := connection.exec_driver_sql(
                    f'SELECT rowid, user_id, email FROM "{arrived}" WHERE plain = 0 '
                    "AND rowid > ? ORDER BY rowid LIMIT ?",
                    (after, CHUNK_SIZE),
                ).all():
                    after = page[-1][0]
                    good, bad = split_chunk([(n, u, e, None) for n, u, e in page])
                    refused = {row[0] for row in bad}
                    kept = [n for n, _, _ in page if n not in refused]
                    if good:
                        connection.exec_driver_sql(
                            f'UPDATE "{arrived}" SET user_id = ?, email = ? WHERE rowid = ?',
                            [(*row, n) for row, n in zip(good, kept, strict=True)],
                        )
                    if bad:
                        first = first or f"row {bad[0][0]}: {bad[0][3]}"
                        rejected += len(bad)
                        connection.exec_driver_sql(
                            f"INSERT INTO {REJECTED} VALUES (?, ?, ?, ?, ?)",
                            [(run_id, *row) for row in bad],
                        )
                        connection.exec_driver_sql(
                            f'DELETE FROM "{arrived}" WHERE rowid = ?', [(n,) for n in refused]
                        )
            except SQLAlchemyError as exc:
                raise source.failure(exc) from exc
            connection.exec_driver_sql(
                f'INSERT OR IGNORE INTO "{table.name}" SELECT user_id, email, NULL '
                f'FROM "{arrived}" ORDER BY user_id, rowid'
            )
            connection.exec_driver_sql(f'DROP TABLE "{arrived}"')
        self._keep_rejected(run_id, rejected)
        return Snapshot(run_id, table, total, rejected, first, staged_in="database")

    def _uri_filenames(self) -> bool:
        """Whether this SQLite reads ``file:`` URIs in ATTACH (built with ``USE_URI``), which
        attaching read-only (``mode=ro``) needs: without, it would create a file so named."""
        with self._connection.begin():
            options = self._connection.exec_driver_sql("PRAGMA compile_options").scalars()
            return "USE_URI" in set(options)

    def _shared_names(self, run_id: int) -> bool:
        """Whether a name of the attached source is also one of the state's schemas, now or
        while run ``run_id``'s query runs (its tables; case-insensitive, as SQLite's names
        are), where an unqualified name in the query would find the state's."""
        with self._connection.begin():
            names = [
                set(
                    self._connection.exec_driver_sql(
                        f"SELECT lower(name) FROM {schema}.sqlite_master"
                    ).scalars()
                )
                for schema in ("main", "temp", _ATTACHED)
            ]
        ours = {REJECTED, f"staged_{run_id}", f"arrived_{run_id}"}
        return bool(names[2] & (names[0] | names[1] | ours))

    def drop(self) -> None:
        """Drop every table this staging made (the connection may go back to a pool). A
        SQLite file's connection is closed instead, taking its temporary database with it
        at once: dropping a snapshot of 1M rows frees its pages one by one (0.2 s)."""
        connection = self._connection
        if not self._postgres and sqlite_path(str(connection.engine.url)) is not None:
            connection.invalidate()  # closed, never pooled again; the next one is new
            self._tables.clear()
            return
        with self._connection.begin():
            for name in reversed(self._tables):
                self._connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
        self._tables.clear()

    @property
    def _mark(self) -> str:
        return "%s" if self._postgres else "?"

    def _create(self, run_id: int, columns: str | None = None) -> Table:
        """Run ``run_id``'s snapshot table: ``user_id``, ``email`` and ``value``, or the
        ``columns`` given (which hold those three)."""
        name = f"staged_{run_id}"
        connection = self._connection
        with connection.begin():
            if not self._tables:
                connection.exec_driver_sql(
                    f"CREATE TEMPORARY TABLE IF NOT EXISTS {REJECTED} (run_id INTEGER, "
                    "row_number INTEGER, user_id TEXT, email TEXT, reason TEXT)"
                )
                self._tables.append(REJECTED)
            if self._postgres:
                connection.exec_driver_sql(
                    f'CREATE TEMPORARY TABLE "{name}" ({columns or _COPIED_COLUMNS})'
                )
            else:
                connection.exec_driver_sql(
                    f'CREATE TEMPORARY TABLE "{name}" (user_id TEXT NOT NULL PRIMARY KEY, '
                    "email TEXT NOT NULL, value TEXT) WITHOUT ROWID"
                )
        self._tables.append(name)
        return snapshot_table(name, postgres=self._postgres)

    def _index(self, name: str) -> None:
        """A unique index on ``user_id``, built once after the copy; a user staged twice
        keeps the row of the lowest ``seq`` (the first in the source's order).
        Byte order ("C") builds it three times faster than a locale's and is all a unique
        check needs; memory for the sort keeps it from spilling to disk."""
        connection = self._connection
        connection.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{WORK_MEM}'")
        index = f'CREATE UNIQUE INDEX ON "{name}" (user_id COLLATE "C")'
        savepoint = connection.begin_nested()
        try:
            connection.exec_driver_sql(index)
        except Exception as exc:
            if getattr(getattr(exc, "orig", exc), "sqlstate", None) != "23505":
                raise
            savepoint.rollback()
            # Each duplicated user's first seq, by one hash aggregate, then its later rows:
            # linear in the rows (pairing every copy of a user with every other, as a
            # self-join does, took 16 s for 10,000 copies of one user).
            connection.exec_driver_sql(
                f'DELETE FROM "{name}" later USING ('
                f'SELECT user_id, min(seq) AS seq FROM "{name}" '
                "GROUP BY user_id HAVING count(*) > 1) first "
                "WHERE later.user_id = first.user_id AND later.seq > first.seq"
            )
            connection.exec_driver_sql(index)
        else:
            savepoint.commit()
        # No ANALYZE: building the index recorded the table's size, and its user ids are
        # known unique, which is all the diff's plans need of it (0.14 s per 1M rows).

    def _keep_rejected(self, run_id: int, rejected: int) -> None:
        if not rejected:
            return
        with self._connection.begin():
            self._connection.exec_driver_sql(
                "INSERT INTO rejected_rows (run_id, row_number, user_id, email, reason) "
                f"SELECT run_id, row_number, user_id, email, reason FROM {REJECTED} "
                f"WHERE run_id = {self._mark}",
                (run_id,),
            )


_ATTACHED = "audience_sync_source"
# A query that might name the state's schemas (or the attached one) itself: read through
# Python instead. Unqualified names are all the attached path allows.
_ATTACH_UNSAFE = re.compile(r"\b(main|temp|temporary|audience_sync_source)\b|sqlite_|pragma", re.I)


def _plain_text(column: str, *, longest: int, spaces: bool) -> str:
    """SQLite: ``column`` is text of 1 to ``longest`` printable ASCII characters (a NUL
    would end ``length`` early: the byte count must match), without white space at either
    end (``spaces``) or anywhere (not ``spaces``)."""
    low = " " if spaces else "!"
    ends = f" AND {column} NOT GLOB ' *' AND {column} NOT GLOB '* '" if spaces else ""
    return (
        f"typeof({column}) = 'text' AND length({column}) BETWEEN 1 AND {longest} "
        f"AND length(CAST({column} AS BLOB)) = length({column}) "
        f"AND {column} NOT GLOB '*[^{low}-~]*'{ends}"
    )


# A row split_chunk stages exactly as it stands (its user id an integer's decimal digits):
# a user id that is an integer, or plain text with nothing to trim; an email of printable
# ASCII with no white space, one "@", something before it, and after it a dot with
# something on either side and none at the end (rows.EMAIL_PATTERN for such text). Held to
# split_chunk by tests/test_contract.py and tests/test_stage.py.
_PLAIN_USER = _plain_text("q.user_id", longest=MAX_USER_ID, spaces=True)
PLAIN_ROW = (
    f"((typeof(q.user_id) = 'integer' OR ({_PLAIN_USER})) "
    f"AND ({_plain_text('q.email', longest=MAX_EMAIL, spaces=False)}) "
    "AND q.email GLOB '?*@?*.?*' AND q.email NOT GLOB '*@*@*' AND q.email NOT GLOB '*.')"
)


class _Copy:
    """A ``COPY … FROM STDIN`` into a staging table on the connection's driver, of rows with
    the first ``width`` of its columns."""

    def __init__(self, connection: Connection, name: str, width: int) -> None:
        self._stack = ExitStack()
        driver = connection.connection.driver_connection
        cursor = self._stack.enter_context(driver.cursor())  # type: ignore[union-attr]
        columns = ", ".join(_COLUMNS[:width])
        self._copy = self._stack.enter_context(cursor.copy(f'COPY "{name}" ({columns}) FROM STDIN'))

    def write(self, rows: list[Staged]) -> None:
        """Send ``rows`` in COPY's text format, joined in C rather than formatted row by row.
        Staged rows hold no control character (the checks refuse them in user ids and
        emails, and canonical JSON escapes them in values), so tabs and line breaks can
        only be separators, and a backslash is all there is to escape."""
        text = "\n".join(map("\t".join, rows))
        if "\\" in text:
            text = text.replace("\\", "\\\\")
        self._copy.write(text + "\n")

    def close(self, error: BaseException | None) -> None:
        """End the copy: complete it, or abort it when ``error`` cut it short."""
        if error is None:
            self._stack.close()
        else:
            self._stack.__exit__(type(error), error, error.__traceback__)


def snapshot_table(name: str, *, postgres: bool = False) -> Table:
    """The SQLAlchemy table of a staged snapshot, for the diff's statements."""
    return Table(
        name,
        MetaData(),
        Column("user_id", Text, primary_key=True),
        Column("email", Text),
        Column("value", Text),
        prefixes=["TEMPORARY"],
        info={"index_collation": "C"} if postgres else {},
    )


def staged_user(table: Table) -> ColumnElement[str]:
    """A snapshot's user id as its index holds it, for statements that look a few users up
    in it: on PostgreSQL the unique index is on ``user_id COLLATE "C"``, which a comparison
    uses only when it compares in that collation too (equality is the same under any
    deterministic collation: byte for byte); without it, PostgreSQL hashes the whole
    snapshot to find a handful of users."""
    collation = table.info.get("index_collation")
    return table.c.user_id.collate(collation) if collation else table.c.user_id


def analyze_state(connection: Connection) -> None:
    """Refresh PostgreSQL's statistics of the state tables the diff joins, where they are
    stale by autovacuum's own measure (more rows changed since the last ANALYZE than 50 +
    10% of the table), so plans stay right on servers that run without autovacuum, and a
    run that changed little costs no ANALYZE (0.3 s at 1M members). SQLite plans from its
    indexes alone."""
    if connection.dialect.name != "postgresql":
        return
    with connection.begin():
        stale = (
            connection.exec_driver_sql(
                "SELECT c.relname FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
                "WHERE c.oid = ANY (ARRAY['memberships', 'uncertain_members', 'trait_values', "
                "'rejected_rows', 'contacts']::regclass[]) "
                "AND (c.reltuples < 0 OR s.n_mod_since_analyze > 50 + 0.1 * c.reltuples) "
                "ORDER BY c.relname"
            )
            .scalars()
            .all()
        )
        if stale:
            connection.exec_driver_sql(f"ANALYZE {', '.join(stale)}")
