"""Warehouse-native checks: the row contract of ``rows`` written as PostgreSQL SQL.

An audience whose query runs on the PostgreSQL state database is checked there, with no row
crossing into Python (see ``stage.Staging.stage_query``). The SQL is written per type
family of the query's ``user_id`` and ``email`` columns, as a Python reader (psycopg) would
get their values: text is trimmed, integers and uuids are ids as they print, numerics are
exact, floats are ids only while whole and below 2^53, a json/jsonb value is what
``json.loads`` makes of its text. Trimming and the character classes come from the
constants of ``rows``, spelled as code points (``[[:space:]]`` and ``[[:cntrl:]]`` would
follow the database's locale). ``tests/test_native.py`` compares it with the Python checks
for each column type, and ``tests/test_contract.py`` holds every source path to one result.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from typing import Literal

from sqlalchemy.engine import Connection

from audience_sync.rows import (
    BAD_EMAIL,
    BAD_RANGES,
    BAD_USER_ID,
    FLOAT_EXACT,
    INEXACT_FLOAT,
    INVALID_EMAIL,
    LONG_EMAIL,
    LONG_USER_ID,
    MAX_EMAIL,
    MAX_USER_ID,
    MISSING_EMAIL,
    MISSING_USER_ID,
    NOT_AN_ID,
    NOT_TEXT_EMAIL,
    NOT_WHOLE,
    WHITE_SPACE,
    char_class,
    email_pattern,
)

Family = Literal["text", "integer", "numeric", "float", "real", "json", "jsonb", "uuid", "other"]
"""How a column's values are checked: what psycopg gives a Python reader for its type."""

_FAMILIES: dict[str, Family] = {
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "numeric": "numeric",
    "double precision": "float",
    "real": "real",
    "json": "json",
    "jsonb": "jsonb",
    "uuid": "uuid",
}
# pg_type.typcategory of the types psycopg reads as str: strings (text, varchar, character,
# name, citext) and enums.
_TEXT_CATEGORIES = frozenset({"S", "E"})


def _literal(characters: str) -> str:
    """``characters`` as an escaped PostgreSQL string literal."""
    return "E'" + "".join(f"\\u{ord(c):04x}" for c in characters) + "'"


_SPACES = _literal(WHITE_SPACE)


def _bounded(column: str, limit: int = 500) -> str:
    """A rejected row's value as ``rows.rejected_text`` shows it (trimmed before): at most
    ``limit`` characters, and "…" after them when it was longer."""
    longer = f"length({column}) > {limit}"
    return f"CASE WHEN {longer} THEN left({column}, {limit}) || '…' ELSE {column} END"


# PostgreSQL text holds neither NUL nor a surrogate: the rest of the ranges is left to find.
_BAD = char_class((max(low, 1), high) for low, high in BAD_RANGES if high < 0xD800)
_EMAIL = f"^{email_pattern(_BAD, plus='+')}$"
# A JSON number written with a fraction or an exponent is a float to json.loads, which rounds
# it: from here on to infinity (halfway to 2^1024, ties to even), to 0 up to here.
with localcontext() as _context:
    _context.prec = 1200
    _TO_INFINITY = str(2**1024 - 2**970)
    _TO_ZERO = format(Decimal(2) ** -1075, "f")


def column_families(connection: Connection, query: str) -> tuple[Family, Family]:
    """The families of the query's ``user_id`` and ``email`` columns, from the description
    of a ``LIMIT 0`` run of it: planned, not executed. A domain is described as its base
    type, as psycopg sees it."""
    described = connection.execution_options(no_parameters=True).exec_driver_sql(
        f"SELECT q.user_id, q.email FROM {embedded(query)} AS q LIMIT 0"
    )
    oids = [column[1] for column in described.cursor.description]  # (name, type_code, …)
    described.close()
    found = {
        oid: (name, category)
        for oid, name, category in connection.exec_driver_sql(
            "SELECT oid, oid::regtype::text, typcategory FROM pg_type WHERE oid IN (%s, %s)",
            tuple(oids),
        )
    }
    user, email = (_family(*found[oid]) for oid in oids)
    return user, email


def _family(name: str, category: str) -> Family:
    if name in _FAMILIES:
        return _FAMILIES[name]
    return "text" if category in _TEXT_CATEGORIES else "other"


def embedded(query: str) -> str:
    """``query`` in parentheses, to be embedded in a larger statement: without the
    semicolons that end it, and the closing parenthesis on a line of its own (after a
    trailing ``-- comment``)."""
    return f"({without_trailing_semicolons(query)}\n)"


_DOLLAR_QUOTE = re.compile(r"\$(?:[^\W\d]\w*)?\$")


def without_trailing_semicolons(query: str) -> str:
    """``query`` with the semicolons that end it blanked (``SELECT 1; -- done`` becomes
    ``SELECT 1  -- done``). A semicolon inside a quoted string, a quoted identifier, a
    dollar-quoted string or a comment is not the end of anything and stays."""
    trailing: list[int] = []
    position, end = 0, len(query)
    while position < end:
        character = query[position]
        if character == ";":
            trailing.append(position)
            position += 1
        elif character.isspace():
            position += 1
        else:
            after, comment = _token_end(query, position)
            if not comment:
                trailing.clear()  # something follows: those semicolons end nothing
            position = after
    text = list(query)
    for position in trailing:
        text[position] = " "
    return "".join(text)


def _token_end(query: str, start: int) -> tuple[int, bool]:
    """Where the token at ``start`` ends (a comment, a quoted string or identifier, a
    dollar-quoted string, else one character), and whether it was a comment."""
    end = len(query)
    if query.startswith("--", start):
        newline = query.find("\n", start)
        return (end if newline < 0 else newline + 1), True
    if query.startswith("/*", start):  # comments nest in PostgreSQL
        depth, position = 1, start + 2
        while position < end and depth:
            if query.startswith("/*", position):
                depth, position = depth + 1, position + 2
            elif query.startswith("*/", position):
                depth, position = depth - 1, position + 2
            else:
                position += 1
        return position, True
    character = query[start]
    if character in "'\"":
        # E'…' strings escape with backslashes; every quoted token doubles its quote.
        backslashes = (
            character == "'"
            and start > 0
            and query[start - 1] in "Ee"
            and (start < 2 or not _is_word(query[start - 2]))
        )
        position = start + 1
        while position < end:
            if backslashes and query[position] == "\\":
                position += 2
            elif query[position] != character:
                position += 1
            elif query.startswith(character, position + 1):
                position += 2
            else:
                return position + 1, False
        return end, False
    if character == "$" and (start == 0 or not _is_word(query[start - 1])):
        tag = _DOLLAR_QUOTE.match(query, start)
        if tag:
            close = query.find(tag.group(), tag.end())
            return (end if close < 0 else close + len(tag.group())), False
    return start + 1, False


def _is_word(character: str) -> bool:
    return character.isalnum() or character in "_$"


def _user_id_sql(family: Family) -> tuple[str, str, str]:
    """(canonical user id, the reason the value is refused before its text is checked, or
    NULL) of the column ``uid`` (and ``ut``/``ux``, its JSON type and text) of ``family``,
    and the checks its text still needs: which of "empty", "long", "bad"."""
    missing = f"WHEN uid IS NULL THEN '{MISSING_USER_ID}'"
    if family == "text":
        return f"btrim(uid::text, {_SPACES})", f"CASE {missing} END", "empty long bad"
    if family in ("integer", "uuid"):
        return "uid::text", f"CASE {missing} END", ""
    if family == "numeric":
        whole = "(uid = trunc(uid) AND abs(uid) < 'Infinity')"  # NaN = NaN in SQL
        return (
            f"CASE WHEN {whole} THEN trunc(uid)::text END",
            f"CASE {missing} WHEN NOT {whole} THEN '{NOT_WHOLE}' END",
            "long",
        )
    if family in ("float", "real"):
        value, reason = _float_sql("uid")
        return value, f"CASE {missing} {reason} END", ""
    if family in ("json", "jsonb"):
        value, reason = _float_sql("uf")
        return (
            f"""CASE ut
      WHEN 'string' THEN btrim(ux, {_SPACES})
      WHEN 'number' THEN CASE WHEN uf IS NULL THEN ux::numeric::text ELSE {value} END
    END""",
            f"""CASE
      WHEN ut IS NULL OR ut = 'null' THEN '{MISSING_USER_ID}'
      WHEN ut NOT IN ('string', 'number') THEN '{NOT_AN_ID}'
      WHEN uf IS NULL THEN NULL {reason}
    END""",
            "empty long bad",
        )
    return "NULL", f"CASE {missing} ELSE '{NOT_AN_ID}' END", ""


def _float_sql(value: str) -> tuple[str, str]:
    """(the user id, the WHEN clauses of its refusal) of a float8 ``value``: whole and below
    2^53, as ``rows.canonical_user_id``. A float8 prints exactly, but ``::numeric`` keeps
    15 digits of it: the id is its ``bigint``."""
    whole = f"({value} = trunc({value}) AND {value} <> 'NaN' AND abs({value}) <> 'Infinity')"
    return (
        f"CASE WHEN {whole} AND abs({value}) < {FLOAT_EXACT} THEN {value}::bigint::text END",
        f"WHEN NOT {whole} THEN '{NOT_WHOLE}' WHEN abs({value}) >= {FLOAT_EXACT} "
        f"THEN '{INEXACT_FLOAT}'",
    )


def _json_float(number: str) -> str:
    """The float8 json.loads makes of a JSON ``number`` written with a fraction or an
    exponent (correctly rounded, as ``::float8`` is within its range); a stand-in value
    where only whether it is whole matters (0.5: a number too small to be 0 and not whole)."""
    return f"""CASE
      WHEN abs({number}) >= {_TO_INFINITY} THEN 'Infinity'::float8
      WHEN abs({number}) <= {_TO_ZERO} THEN 0::float8
      WHEN abs({number}) < 0.5 THEN 0.5::float8
      ELSE ({number})::float8
    END"""


def _email_sql(family: Family) -> tuple[str, str]:
    """(trimmed email, the reason the value is refused before its text is checked, or NULL)
    of the column ``eml`` (and ``et``/``ex``, its JSON type and text) of ``family``."""
    if family == "text":
        return f"btrim(eml::text, {_SPACES})", f"CASE WHEN eml IS NULL THEN '{MISSING_EMAIL}' END"
    if family in ("json", "jsonb"):
        return (
            f"CASE WHEN et = 'string' THEN btrim(ex, {_SPACES}) END",
            f"CASE WHEN et IS NULL OR et = 'null' THEN '{MISSING_EMAIL}' "
            f"WHEN et <> 'string' THEN '{NOT_TEXT_EMAIL}' END",
        )
    return "NULL", f"CASE WHEN eml IS NULL THEN '{MISSING_EMAIL}' ELSE '{NOT_TEXT_EMAIL}' END"


def checked_rows(query: str, user: Family, email: Family) -> str:
    """The SELECT that turns the query's rows into (seq, user_id, email, reason, shown_user,
    shown_email): ``rows.check_row`` in SQL, for columns of these families (see
    ``column_families``). seq is the row's position in the query's output: the row numbers
    of rejected rows, and the order in which the first row of a user wins. The shown values
    are kept for rejected rows only (the rows are the snapshot). Each level is evaluated
    once per row: ``given`` holds a window function, the others an ``OFFSET 0``, so none is
    merged into the level above (which would repeat its expressions at every use)."""
    user_id, user_reason, checks = _user_id_sql(user)
    email_value, email_reason = _email_sql(email)
    base = "q.user_id::text::float8" if user == "real" else "q.user_id"  # psycopg reads text
    json_columns = []
    if user in ("json", "jsonb"):
        number = "(uid #>> '{}')::numeric"
        json_columns += [
            f"{user}_typeof(uid) AS ut",
            "uid #>> '{}' AS ux",
            f"""CASE WHEN {user}_typeof(uid) = 'number' AND (uid #>> '{{}}') ~ '[.eE]'
      THEN {_json_float(number)} END AS uf""",
        ]
    if email in ("json", "jsonb"):
        json_columns += [f"{email}_typeof(eml) AS et", "eml #>> '{}' AS ex"]
    given = f"""SELECT row_number() OVER () AS seq, {base} AS uid, q.email AS eml
    FROM {embedded(query)} AS q"""
    if json_columns:
        given = f"SELECT given.*, {', '.join(json_columns)} FROM ({given}) AS given OFFSET 0"
    text_checks = {
        "empty": f"WHEN user_id = '' THEN '{MISSING_USER_ID}'",
        "long": f"WHEN length(user_id) > {MAX_USER_ID} THEN '{LONG_USER_ID}'",
        "bad": f"WHEN user_id ~ '[{_BAD}]' THEN '{BAD_USER_ID}'",
    }
    shown_user = "ux" if user in ("json", "jsonb") else "uid::text"
    shown_email = "ex" if email in ("json", "jsonb") else "eml::text"
    user_checks = "\n    ".join(text_checks[check] for check in checks.split())
    return f"""
SELECT seq, user_id, email, reason,
  CASE WHEN reason IS NOT NULL THEN shown_user END,
  CASE WHEN reason IS NOT NULL THEN shown_email END
FROM (
SELECT seq, user_id, email,
  CASE
    WHEN user_reason IS NOT NULL THEN user_reason
    {user_checks}
    WHEN email_reason IS NOT NULL THEN email_reason
    WHEN email = '' THEN '{MISSING_EMAIL}'
    WHEN length(email) > {MAX_EMAIL} THEN '{LONG_EMAIL}'
    -- An email the pattern accepts has no control character: only a refused one is asked.
    WHEN email !~ '{_EMAIL}' THEN CASE WHEN email ~ '[{_BAD}]'
      THEN '{BAD_EMAIL}' ELSE '{INVALID_EMAIL}' END
  END AS reason,
  {_bounded("coalesce(user_id, shown_user)")} AS shown_user,
  {_bounded("shown_email")} AS shown_email
FROM (
  SELECT seq, {user_id} AS user_id, {user_reason} AS user_reason,
    left(btrim({shown_user}, {_SPACES}), 501) AS shown_user,
    {email_value} AS email, {email_reason} AS email_reason,
    left(btrim({shown_email}, {_SPACES}), 501) AS shown_email
  FROM ({given}) AS given
  OFFSET 0
) AS cleaned
OFFSET 0
) AS judged
"""
