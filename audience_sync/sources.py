"""Audience sources: a SQL query on any SQLAlchemy URL, or a CSV/JSONL export, read in chunks."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from audience_sync.config import (
    FILE_FORMATS,
    STATE_SOURCE,
    Computation,
    Settings,
    redact_url,
    scrub,
    source_url,
)
from audience_sync.db import driver_hint, normalize_url, sqlite_path
from audience_sync.engage import read_engage
from audience_sync.errors import SourceError
from audience_sync.plaincsv import PlainCsv
from audience_sync.rows import (
    CHUNK_SIZE,
    WHITE_SPACE,
    Batch,
    SourceRow,
    check_chunks,
    split_chunk,
    split_plain,
)

__all__ = ["CHUNK_SIZE", "FileSource", "Source", "SourceRow", "SqlSource", "source_for"]

REQUIRED_COLUMNS = ("user_id", "email")
# Statements that can only write: refused before they reach the database, whose own answer
# (a syntax error from PostgreSQL's server-side cursor) would not say why.
WRITE_STATEMENTS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "DROP", "CREATE", "ALTER",
    "TRUNCATE", "GRANT", "REVOKE", "COPY", "CALL", "DO", "VACUUM", "REINDEX", "CLUSTER",
    "COMMENT", "LOCK",
})  # fmt: skip
# What databases say when a read-only transaction meets a write (PostgreSQL, SQLite, MySQL,
# and PostgreSQL's server-side cursor refusing a data-modifying WITH).
_WRITE_REFUSED = ("read-only transaction", "readonly database", "data-modifying", "read only")
_COMMENTS = re.compile(r"\s*(?:--[^\n]*(?:\n|$)|/\*.*?\*/)", re.DOTALL)
# Python's csv stops at 128 KiB per field; allow more so an oversized value becomes a
# rejected row with a reason instead of failing the whole file.
csv.field_size_limit(16 * 1024 * 1024)


class Source(Protocol):
    """Anything that yields an audience's rows in chunks."""

    description: str

    def read_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[list[SourceRow]]:
        """Yield the rows in lists of at most ``chunk_size``; raise SourceError on failure."""
        ...

    def batches(self, value_type: str | None = None) -> Iterator[Batch]:
        """Yield the rows checked (``value_type``: a computed trait's, see
        ``rows.encode_value``); raise SourceError on failure."""
        ...


class SqlSource:
    """Rows from a query, streamed with a server-side cursor inside a read-only transaction."""

    def __init__(self, url: str, query: str, name: str, *, with_value: bool = False) -> None:
        self.url = url
        self.query = query
        self.description = f"{name}: {redact_url(url)}"
        self.with_value = with_value
        self.columns = (*REQUIRED_COLUMNS, "value") if with_value else REQUIRED_COLUMNS

    def check_statement(self) -> None:
        """Refuse a statement that can only write, before it reaches the database (whose
        own answer, a syntax error once wrapped, would not say why)."""
        statement = first_keyword(self.query)
        if statement in WRITE_STATEMENTS:
            raise SourceError(
                f"{self.description}: the query must be read-only, a SELECT returning "
                f"{_names(self.columns)}; it is a {statement}"
            )

    def check_columns(self, columns: Sequence[str]) -> None:
        """Refuse a result that lacks a column the audience needs, naming what it has."""
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise SourceError(
                f"{self.description}: the query must return columns "
                f"{_names(self.columns)}; missing {', '.join(missing)} "
                f"(got {', '.join(columns) or 'none'})"
            )

    def failure(self, exc: SQLAlchemyError) -> SourceError:
        """This audience's error for the database's answer to the query (passwords out)."""
        message = scrub(_first_line(exc), self.url)
        if any(phrase in message.lower() for phrase in _WRITE_REFUSED):
            return SourceError(
                f"{self.description}: the query must be read-only (it tried to write: {message})"
            )
        return SourceError(f"{self.description}: query failed: {message}")

    def batches(self, value_type: str | None = None) -> Iterator[Batch]:
        if self.with_value:
            return check_chunks(self.read_chunks(), with_value=True, value_type=value_type)
        return self._audience_batches()

    def _audience_batches(self) -> Iterator[Batch]:
        """An audience's rows, checked a chunk at a time where every row of it is plain
        (``rows.split_plain``), row by row by ``split_chunk`` otherwise: the same batches."""
        number = 0
        for rows, (user, email, _) in self._fetch(CHUNK_SIZE):
            whole = (user, email) == (0, 1) and len(rows[0]) == 2
            pairs = rows if whole else list(map(itemgetter(user, email), rows))
            good = split_plain(pairs)
            if good is not None:
                yield Batch(len(rows), good, [])
            else:
                numbered = [(number + i, u, e, None) for i, (u, e) in enumerate(pairs, 1)]
                yield Batch(len(rows), *split_chunk(numbered))
            number += len(rows)

    def read_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[list[SourceRow]]:
        number = 0
        for rows, (user, email, value) in self._fetch(chunk_size):
            chunk: list[SourceRow] = []
            for row in rows:
                number += 1
                chunk.append(
                    (number, row[user], row[email], row[value] if value is not None else None)
                )
            yield chunk

    def _fetch(
        self, chunk_size: int
    ) -> Iterator[tuple[Sequence[Sequence[Any]], tuple[int, int, int | None]]]:
        """The query's rows in lists of at most ``chunk_size`` (tuples as the driver gives
        them), each with the positions of ``user_id``, ``email`` and ``value`` in a row."""
        self.check_statement()
        engine = None
        try:
            # Inside the try: an unknown dialect or a missing driver is this source's failure
            # (the run fails, the others go on), not a crash of the whole sync.
            engine = create_engine(normalize_url(self.url))
            event.listen(engine, "begin", _read_only)
            with (
                engine.connect() as connection,
                _cursor(connection, self.query, chunk_size) as cursor,
            ):
                if cursor.description is None:
                    raise SourceError(f"{self.description}: the query returned no result set")
                columns = [column[0] for column in cursor.description]
                self.check_columns(columns)
                user_index, email_index = columns.index("user_id"), columns.index("email")
                value_index = columns.index("value") if "value" in self.columns else None
                indexes = (user_index, email_index, value_index)
                while rows := cursor.fetchmany(chunk_size):
                    yield rows, indexes
        except SQLAlchemyError as exc:
            raise self.failure(exc) from exc
        except ImportError as exc:
            driver = exc.name or scrub(str(exc), self.url)
            raise SourceError(
                f"{self.description}: database driver not installed ({driver}); "
                f"install it with: {driver_hint(self.url)}"
            ) from exc
        finally:
            if engine is not None:
                engine.dispose()


class FileSource:
    """Rows from a CSV file with a header row, a JSON-lines file (``.jsonl``/``.ndjson``),
    or a JSON-lines export of Segment Engage payloads (``format = "engage"``)."""

    def __init__(
        self,
        path: Path,
        format: str | None = None,
        *,
        key: str = "",
        with_value: bool = False,
    ) -> None:
        self.path = path
        self.description = str(path)
        self.format = format or FILE_FORMATS.get(path.suffix.lower())
        self.key = key
        self.with_value = with_value
        self.columns = (*REQUIRED_COLUMNS, "value") if with_value else REQUIRED_COLUMNS
        # The digest of exactly the bytes a CSV/JSONL read went through to the end, so that
        # what a run records is what it staged even if the file is replaced meanwhile.
        self.digest: str | None = None

    def read_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[list[SourceRow]]:
        self._check_readable()
        if self.format == "engage":
            kind: Literal["audience", "trait"] = "trait" if self.with_value else "audience"
            yield from read_engage(self.path, self.key, kind=kind, chunk_size=chunk_size)
            return
        with self._reading():
            if self.format == "jsonl":
                yield from self._json_chunks(chunk_size)
            else:
                yield from self._csv_chunks(chunk_size)

    def batches(self, value_type: str | None = None) -> Iterator[Batch]:
        self._check_readable()
        if self.format != "csv" or self.with_value:
            yield from check_chunks(
                self.read_chunks(), with_value=self.with_value, value_type=value_type
            )
            return
        with self._reading():
            yield from self._csv_batches()

    def _check_readable(self) -> None:
        if not self.path.is_file():
            raise SourceError(f"{self.path}: file not found")
        if self.format is None:
            raise SourceError(f"{self.path}: set `format` (csv, jsonl or engage) for this file")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Errors reading the file as ``SourceError``s naming it (and the line of a byte that
        is not UTF-8)."""
        try:
            yield
        except UnicodeDecodeError as exc:
            line = first_bad_line(self.path)
            where = f" at line {line}" if line else ""
            raise SourceError(f"{self.path}: not UTF-8{where}: {exc.reason}") from exc
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot read: {exc}") from exc

    def _open(self, newline: str | None) -> tuple[io.TextIOWrapper, Any]:
        """The file as text, and the hash its bytes go through as they are read."""
        digest = new_digest()
        raw = _HashedReader(self.path.open("rb", buffering=0), digest)
        buffered = io.BufferedReader(raw, buffer_size=READ_BUFFER)
        return io.TextIOWrapper(buffered, encoding="utf-8-sig", newline=newline), digest

    def _csv_chunks(self, chunk_size: int) -> Iterator[list[SourceRow]]:
        handle, digest = self._open(newline="")
        with handle:
            reader = csv.reader(handle)
            try:
                header = self._csv_header(reader)
                chunk: list[SourceRow] = []
                for row in self._csv_rows(header, reader, 0):
                    chunk.append(row)
                    if len(chunk) == chunk_size:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk
            except csv.Error as exc:
                raise SourceError(f"{self.path}: line {reader.line_num}: {exc}") from exc
        self.digest = digest.hexdigest()

    def _csv_batches(self) -> Iterator[Batch]:
        """A CSV audience's rows, checked: plain blocks in one pass (see ``plaincsv``)."""
        handle, digest = self._open(newline="")
        with handle:
            reader = csv.reader(handle)
            try:
                header = self._csv_header(reader)
            except csv.Error as exc:
                raise SourceError(f"{self.path}: line {reader.line_num}: {exc}") from exc
            plain = PlainCsv(
                handle, header, lambda records, done: self._csv_rows(header, records, done)
            )
            try:
                yield from plain.batches()
            except csv.Error as exc:
                line = reader.line_num + plain.line_num  # the header's lines, then the rest
                raise SourceError(f"{self.path}: line {line}: {exc}") from exc
        self.digest = digest.hexdigest()

    def _csv_header(self, reader: Iterator[list[str]]) -> list[str]:
        """The header, checked: every required column named, none named twice."""
        header = next(reader, [])
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise SourceError(
                f"{self.path}: header names {', '.join(map(repr, repeated))} more than "
                "once; which column is meant is ambiguous"
            )
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise SourceError(
                f"{self.path}: header must name {_names(self.columns)}; missing "
                f"{', '.join(missing)} (got {', '.join(header) or 'no header'})"
            )
        return header

    def _csv_rows(
        self, header: list[str], records: Iterator[list[str]], done: int
    ) -> Iterator[SourceRow]:
        """Source rows of csv records, numbered on from ``done``: blank lines are no rows,
        and what a short row lacks reads as None."""
        # Plain lists, not DictReader: a third of the cost of a large file.
        user_index, email_index = header.index("user_id"), header.index("email")
        value_index = header.index("value") if self.with_value else None
        width = max(user_index, email_index, value_index or 0)
        number = done
        for record in records:
            # Only a short row or one without user_id can be blank: test just those.
            user = record[user_index] if len(record) > width else ""
            if not user.strip(WHITE_SPACE):
                if not any(field.strip(WHITE_SPACE) for field in record):
                    continue  # a blank line, as in JSONL: not a row
                if len(record) <= width:  # a short row: what is missing reads as None
                    record = [*record, *[None] * (width + 1 - len(record))]  # type: ignore[list-item]
            number += 1
            value = record[value_index] if value_index is not None else None
            yield (number, record[user_index], record[email_index], value)

    def _json_chunks(self, chunk_size: int) -> Iterator[list[SourceRow]]:
        # utf-8-sig: an export that starts with a byte-order mark reads like one without.
        handle, digest = self._open(newline=None)
        with handle:
            number = 0
            chunk: list[SourceRow] = []
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                number += 1
                try:
                    record = json.loads(line)
                except ValueError as exc:  # bad JSON, or an integer too long for Python
                    raise SourceError(
                        f"{self.path}: line {line_number}: invalid JSON: {exc}"
                    ) from exc
                if not isinstance(record, dict):
                    raise SourceError(f"{self.path}: line {line_number}: expected a JSON object")
                chunk.append(
                    (number, record.get("user_id"), record.get("email"), record.get("value"))
                )
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
        self.digest = digest.hexdigest()


READ_BUFFER = 1 << 20


def new_digest() -> Any:
    """The hash of a file source's bytes: SHA-256, which OpenSSL computes with the CPU's SHA
    instructions (x86 SHA-NI, ARMv8 SHA2) at twice BLAKE2b's speed: 19 ms against 38 ms
    for a 28 MB file on this project's machine. A digest recorded by another hash never
    matches, so a state written before the change sees a changed file: one full diff."""
    return hashlib.sha256()


def file_digest(path: Path) -> str | None:
    """The digest of a file's bytes (read into one reused buffer by ``hashlib``, 7% faster
    than a loop of reads); None if it cannot be read."""
    try:
        with path.open("rb") as handle:
            return str(hashlib.file_digest(handle, new_digest).hexdigest())
    except OSError:
        return None


def first_bad_line(path: Path) -> int | None:
    """The line (counting from 1) of a file's first byte that is not UTF-8, if it has one."""
    line, carry = 1, b""
    with path.open("rb") as handle:
        while block := handle.read(READ_BUFFER):
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
                    carry = data[exc.start :]  # a character cut by the block's end
                    data = data[: exc.start]
                else:
                    return line + data.count(b"\n", 0, exc.start)
            line += data.count(b"\n")
    return line if carry else None  # cut short at its end, or since replaced


class _HashedReader(io.RawIOBase):
    """A binary file whose every byte read also goes through a hash."""

    def __init__(self, raw: io.FileIO, digest: Any) -> None:
        self._raw = raw
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self._digest.update(memoryview(buffer)[:count])
        return count or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def source_for(settings: Settings, audience: Computation) -> Source:
    """The source an audience or computed trait is configured to read."""
    if audience.file is not None:
        return FileSource(
            audience.file,
            audience.format,
            key=audience.property_key,
            with_value=audience.is_trait,
        )
    # config validation guarantees a query audience names both
    assert audience.source is not None
    assert audience.query is not None
    url = source_url(settings, audience)
    assert url is not None
    return SqlSource(url, audience.query, audience.source, with_value=audience.is_trait)


def is_warehouse_native(settings: Settings, audience: Computation) -> bool:
    """Whether an audience's query can be staged inside the state database itself, so that
    no row crosses into Python: a PostgreSQL state, an audience (not a trait), and a query
    on the state database (``source = "state"``, or a source whose URL is the state's)."""
    url = source_url(settings, audience)
    if url is None or audience.is_trait:
        return False
    state = make_url(normalize_url(settings.state.url))
    if state.get_backend_name() != "postgresql":
        return False
    if audience.source == STATE_SOURCE:
        return True
    try:
        return make_url(normalize_url(url)) == state
    except (ArgumentError, ValueError):
        return False


def attachable_file(settings: Settings, audience: Computation) -> Path | None:
    """The SQLite file an audience's query reads, when the state is a SQLite file too, so
    that the state database can attach it and stage the rows with SQL (``Staging.
    stage_attached``): an audience (not a trait) whose source URL is a plain file path
    (no query string: its options are the Python reader's) that exists and is not the
    state's own file. None otherwise: the rows are read through Python."""
    url = source_url(settings, audience)
    if url is None or audience.is_trait:
        return None
    try:
        source, state = make_url(url), make_url(settings.state.url)
    except (ArgumentError, ValueError):
        return None
    if state.get_backend_name() != "sqlite" or source.get_backend_name() != "sqlite":
        return None
    if source.query or not source.database or source.database == ":memory:":
        return None
    path, state_file = Path(source.database), sqlite_path(settings.state.url)
    if state_file is None or not path.is_file():
        return None
    try:
        if path.resolve() == state_file.resolve():
            return None
    except OSError:
        return None
    return path


def _names(columns: tuple[str, ...]) -> str:
    """("user_id", "email", "value") → "user_id, email and value"."""
    return " and ".join([", ".join(columns[:-1]), columns[-1]])


def first_keyword(query: str) -> str:
    """The statement's first word, upper-cased, after comments and opening parentheses."""
    rest = query
    while True:
        match = _COMMENTS.match(rest)
        if not match or not match.group(0).strip():
            break
        rest = rest[match.end() :]
    word = re.match(r"[\s(]*([A-Za-z]+)", rest)
    return word.group(1).upper() if word else ""


@contextmanager
def _cursor(connection: Connection, query: str, chunk_size: int) -> Iterator[Any]:
    """The query executed on a DB-API cursor of the driver, read with ``fetchmany``: rows as
    the driver's tuples, with none of SQLAlchemy's per-row work (a third of a 1M-row read).
    PostgreSQL (psycopg) streams through a server-side cursor and SQLite's cursor streams
    by itself; any other driver keeps SQLAlchemy's streaming result (a server-side cursor
    where the dialect has one), whose rows are tuples as well. Driver errors come out as
    SQLAlchemy's, as from any statement."""
    if connection.dialect.driver not in ("psycopg", "pysqlite"):
        # Options on the query alone: set on the connection, they would also wrap
        # _read_only's statement in a server-side cursor (DECLARE ... CURSOR FOR SET is a
        # syntax error on PostgreSQL, so every PostgreSQL source failed).
        result = connection.execute(
            text(query), execution_options={"stream_results": True, "yield_per": chunk_size}
        )
        yield _ResultCursor(result)
        return
    connection.begin()  # read-only (the "begin" event) before the query runs
    dbapi = connection.dialect.loaded_dbapi
    raw = connection.connection.dbapi_connection
    assert raw is not None
    try:
        postgres = connection.dialect.name == "postgresql"
        cursor = raw.cursor(name="audience_sync_source") if postgres else raw.cursor()
        try:
            cursor.execute(query)
            yield _TranslatedCursor(cursor, query, dbapi)
        finally:
            cursor.close()
    except dbapi.Error as exc:
        raise DBAPIError.instance(query, None, exc, dbapi.Error, hide_parameters=True) from exc


class _TranslatedCursor:
    """A DB-API cursor whose driver errors while fetching become SQLAlchemy's."""

    def __init__(self, cursor: Any, query: str, dbapi: Any) -> None:
        self.description = cursor.description
        self._cursor, self._query, self._dbapi = cursor, query, dbapi

    def fetchmany(self, size: int) -> Sequence[Sequence[Any]]:
        try:
            rows: Sequence[Sequence[Any]] = self._cursor.fetchmany(size)
        except self._dbapi.Error as exc:
            raise DBAPIError.instance(
                self._query, None, exc, self._dbapi.Error, hide_parameters=True
            ) from exc
        return rows


class _ResultCursor:
    """SQLAlchemy's streaming result, read like a DB-API cursor."""

    def __init__(self, result: Any) -> None:
        names = result.keys() if result.returns_rows else None
        self.description = None if names is None else [(name,) for name in names]
        self._result = result

    def fetchmany(self, size: int) -> Sequence[Sequence[Any]]:
        rows: Sequence[Sequence[Any]] = self._result.fetchmany(size)
        return rows


def _read_only(connection: Connection) -> None:
    """Make every source transaction read-only: the user's warehouse is never written."""
    dialect = connection.dialect.name
    if dialect == "sqlite":
        connection.exec_driver_sql("PRAGMA query_only = ON")
    elif dialect in ("postgresql", "mysql", "mariadb"):
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def _first_line(exc: SQLAlchemyError) -> str:
    message = str(getattr(exc, "orig", None) or exc)
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__
