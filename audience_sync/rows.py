"""Source rows and their checks: user-id canonicalisation, emails, trait value encoding.

Pure: no database, no HTTP. Every reader (files, SQL, Engage exports) yields chunks of
``SourceRow`` tuples, and ``check_chunks`` splits each chunk with ``split_chunk`` into a ``Batch``:
the rows staging can use, cleaned, and the ones it cannot, with the reason (a CSV audience's
plain lines are checked a block at a time instead: see ``plaincsv``). Rows are plain tuples and the
common case is checked inline: this loop runs once per source row, millions of times.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import date, time
from decimal import Decimal
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple
from uuid import UUID

CHUNK_SIZE = 5000  # rows per chunk a source yields

SourceRow = tuple[int, Any, Any, Any]
"""One row as the source gave it: (row number counting data rows from 1, user_id, email,
value — a computed trait's value, None for audiences)."""

Staged = tuple[str, str] | tuple[str, str, str]
"""A usable row: (canonical user_id, email) of an audience, (canonical user_id, email, value
as canonical JSON) of a computed trait."""

Rejected = tuple[int, str | None, str | None, str]
"""An unusable row: (row number, user_id and email as storable text, reason)."""


class Batch(NamedTuple):
    """Checked rows of a source: how many source rows they cover, the usable ones cleaned
    and the unusable ones with their reasons."""

    rows: int
    good: list[Staged]
    bad: list[Rejected]


# The row contract (docs/sources.md): every source path trims, canonicalises and rejects
# as this module does. Warehouse-native staging writes the same checks as SQL (``native``),
# its character classes generated from these constants.

# Unicode's White_Space property: what trimming removes at either end of a user id or an email.
# Not str.strip()'s set, which adds \x1c-\x1f: control characters, which reject a row.
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
# Characters no user id or email may hold once trimmed, as ranges: control characters (C0
# and DEL) and lone surrogates (which no UTF-8 text can hold: a JSON "\ud800" decodes to one).
BAD_RANGES = ((0x00, 0x1F), (0x7F, 0x7F), (0xD800, 0xDFFF))
MAX_USER_ID = 255
MAX_EMAIL = 320
FLOAT_EXACT = 2**53  # from here on a float may stand for its neighbour: no float is an id

# The reasons a row is rejected: the same texts on every path, whatever type or database.
MISSING_USER_ID = "missing user_id"
NOT_AN_ID = "user_id must be text or a whole number"
NOT_WHOLE = "user_id is not a whole number"
INEXACT_FLOAT = "user_id is a float too large to be an exact id (2^53 or more)"
LONG_USER_ID = f"user_id longer than {MAX_USER_ID} characters"
BAD_USER_ID = "user_id contains control characters or invalid Unicode"
MISSING_EMAIL = "missing email"
NOT_TEXT_EMAIL = "email must be text"
LONG_EMAIL = f"email longer than {MAX_EMAIL} characters"
BAD_EMAIL = "email contains control characters or invalid Unicode"
INVALID_EMAIL = "invalid email"


def char_class(ranges: Iterable[tuple[int, int]]) -> str:
    """The inside of a regular expression's bracket expression matching ``ranges`` of code
    points, written with ``\\uXXXX`` escapes that Python's ``re`` and PostgreSQL's regular
    expressions both read the same way (no locale-dependent class like ``[:space:]``)."""
    return "".join(
        f"\\u{low:04x}" if low == high else f"\\u{low:04x}-\\u{high:04x}" for low, high in ranges
    )


def _ranges(characters: str) -> list[tuple[int, int]]:
    """``characters`` as sorted ranges of code points."""
    ranges: list[tuple[int, int]] = []
    for code in sorted(map(ord, characters)):
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return ranges


SPACE_CLASS = char_class(_ranges(WHITE_SPACE))
BAD_CLASS = char_class(BAD_RANGES)


def email_pattern(bad_class: str, plus: str = "++") -> str:
    """The text of the pattern a whole email must match: a local part, "@", a domain with a
    dot before its last label, none holding white space or a character of ``bad_class``.
    The possessive ``++`` (PostgreSQL has none: ``plus="+"``) never backtracks into parts
    that cannot hold an "@" or a dot anyway."""
    part = f"[^@{SPACE_CLASS}{bad_class}]"
    return f"{part}{plus}@{part}+\\.[^@.{SPACE_CLASS}{bad_class}]{plus}"


EMAIL_PATTERN = re.compile(email_pattern(BAD_CLASS))  # matched whole (fullmatch)
BAD_CHARACTERS = re.compile(f"[{BAD_CLASS}]")
# Whole numbers whose decimal form fits in a user id: from -(10^254 - 1) to 10^255 - 1.
_LOW, _HIGH = -(10 ** (MAX_USER_ID - 1)), 10**MAX_USER_ID


def canonical_user_id(value: Any) -> str:
    """A user id as the one string Gist and the state know it by; ValueError with the reason.

    One user is one user whatever type a source gives: ``42``, ``"42"``, ``42.0`` and
    ``Decimal("42")`` are all ``"42"`` (a pandas export turns integer ids into floats); a
    UUID is its canonical string. Strings are only trimmed (``WHITE_SPACE``): ``"007"`` is
    not ``"7"``. A float is an id only while every whole number up to it is a float
    (below 2^53): beyond, it may stand for a neighbour, and a wrong contact in Gist is worse
    than a rejected row.
    """
    if type(value) is str:
        text = value.strip(WHITE_SPACE)
    elif value is None:
        raise ValueError(MISSING_USER_ID)
    elif isinstance(value, bool):
        raise ValueError(NOT_AN_ID)
    elif isinstance(value, int):
        text = _whole(value)
    elif isinstance(value, float):
        if not value.is_integer():  # NaN and ±Inf included
            raise ValueError(NOT_WHOLE)
        if abs(value) >= FLOAT_EXACT:
            raise ValueError(INEXACT_FLOAT)
        text = str(int(value))
    elif isinstance(value, Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise ValueError(NOT_WHOLE)
        if value.adjusted() >= MAX_USER_ID:  # 256 digits or more: too long to convert
            raise ValueError(LONG_USER_ID)
        text = _whole(int(value))
    elif isinstance(value, UUID):
        text = str(value)
    elif isinstance(value, str):  # a str subclass
        text = str(value).strip(WHITE_SPACE)
    else:
        raise ValueError(NOT_AN_ID)
    if not text:
        raise ValueError(MISSING_USER_ID)
    if len(text) > MAX_USER_ID:
        raise ValueError(LONG_USER_ID)
    if BAD_CHARACTERS.search(text):
        raise ValueError(BAD_USER_ID)
    return text


def _whole(number: int) -> str:
    """A whole number's decimal form, unless it is too long for a user id (CPython refuses
    to write an int of over 4,300 digits, and any of over 255 is refused anyway)."""
    if _LOW < number < _HIGH:
        return str(number)
    raise ValueError(LONG_USER_ID)


def check_row(user_id: Any, email: Any) -> tuple[str, str] | str:
    """``(user_id, email)`` cleaned, or the reason the row cannot be used."""
    if type(user_id) is str and type(email) is str:
        # The common case, checked in as few steps as possible: it runs once per source row.
        user_id, email = user_id.strip(WHITE_SPACE), email.strip(WHITE_SPACE)
        if (
            user_id
            and len(user_id) <= MAX_USER_ID
            and len(email) <= MAX_EMAIL
            and EMAIL_PATTERN.fullmatch(email)
            and not BAD_CHARACTERS.search(user_id)
        ):
            return user_id, email
    try:
        user_id = canonical_user_id(user_id)
    except ValueError as exc:
        return str(exc)
    if email is None:
        return MISSING_EMAIL
    if not isinstance(email, str):
        return NOT_TEXT_EMAIL
    email = email.strip(WHITE_SPACE)
    if not email:
        return MISSING_EMAIL
    if len(email) > MAX_EMAIL:
        return LONG_EMAIL
    if not EMAIL_PATTERN.fullmatch(email):
        return BAD_EMAIL if BAD_CHARACTERS.search(email) else INVALID_EMAIL
    return user_id, email


def encode_value(value: Any, value_type: str | None = None) -> str:
    """A trait value as canonical JSON, so 1, 1.0, "1" and true stay four different values.

    CSV gives strings: ``value_type`` (int, float, bool, string) converts them. SQL types map
    to their JSON kin: exact decimals with no fraction digits to integers, other decimals to
    floats, dates and times to ISO strings. Raises ValueError with the reason otherwise.
    """
    if value_type is not None and isinstance(value, str):
        value = _convert(value.strip(), value_type)
    if isinstance(value, Decimal):
        if not value.is_finite():  # NaN, Infinity: as a float's, no JSON can carry them
            raise ValueError(f"value of type {type(value).__name__} cannot be sent")
        value = int(value) if int(value.as_tuple().exponent) >= 0 else float(value)
    elif isinstance(value, date | time):
        value = value.isoformat()
    try:
        # Gist's client sends UTF-8: a lone surrogate anywhere in the value cannot be sent.
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except UnicodeEncodeError:
        raise ValueError("value contains invalid Unicode (a lone surrogate)") from None
    except (TypeError, ValueError):
        raise ValueError(f"value of type {type(value).__name__} cannot be sent") from None


def _convert(text: str, value_type: str) -> Any:
    if text == "":
        return None  # an empty cell is no value
    try:
        if value_type == "int":
            return int(text)
        if value_type == "float":
            return float(text)
    except ValueError:
        raise ValueError(f"value {text[:50]!r} is not {value_type}") from None
    if value_type == "bool":
        lowered = text.lower()
        if lowered in BOOLEANS:
            return BOOLEANS[lowered]
        raise ValueError(f"value {text[:50]!r} is not bool")
    return text


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# The common case, in one step each: a user id already trimmed, 1 to 255 characters, none a
# control character (so trimming would change nothing), and an email already valid (the
# pattern allows no white space at all). Anything else takes check_row's slower path, which
# trims and says what is wrong.
_PLAIN_USER_ID = re.compile(
    f"[^{SPACE_CLASS}{BAD_CLASS}](?:[^{BAD_CLASS}]{{0,{MAX_USER_ID - 2}}}"
    f"[^{SPACE_CLASS}{BAD_CLASS}])?"
)


def split_chunk(
    chunk: list[SourceRow], *, with_value: bool = False, value_type: str | None = None
) -> tuple[list[Staged], list[Rejected]]:
    """The chunk's usable rows, cleaned (``with_value``: the value as canonical JSON), and
    its unusable ones with the reason."""
    good: list[Staged] = []
    bad: list[Rejected] = []
    append, plain, valid = good.append, _PLAIN_USER_ID.fullmatch, EMAIL_PATTERN.fullmatch
    for number, user_id, email, value in chunk:
        if (
            not with_value
            and type(user_id) is str
            and type(email) is str
            and plain(user_id)
            and len(email) <= MAX_EMAIL
            and valid(email)
        ):
            append((user_id, email))
            continue
        checked = check_row(user_id, email)
        if with_value and not isinstance(checked, str):
            try:
                append((*checked, encode_value(value, value_type)))
                continue
            except ValueError as exc:
                checked = str(exc)
        if isinstance(checked, str):
            bad.append((number, rejected_text(user_id, canonical=True), rejected_text(email),
                        checked))  # fmt: skip
        else:
            append(checked)
    return good, bad


# Pairs of (user id, email) written as lines of "user_id<TAB>email": a pair passes
# split_chunk's fast path as it stands exactly when its line matches. Neither side of such a
# pair can hold a tab or a line break (control characters), so the split is the pair's own.
_PLAIN_PAIR = re.compile(f"^({_PLAIN_USER_ID.pattern})\t({EMAIL_PATTERN.pattern})$", re.MULTILINE)


def split_plain(pairs: Sequence[Sequence[Any]]) -> list[Staged] | None:
    """``pairs`` of (user_id, email) staged as ``split_chunk`` stages them, when every one
    takes its fast path as it stands (both exactly ``str``, the user id plain, the email
    valid and at most MAX_EMAIL long), checked in one C-level pass over the whole chunk;
    None when any does not, and ``split_chunk`` then says which and why (the SQL sources'
    reading, as ``plaincsv`` is the CSV files')."""
    if not pairs:
        return []
    if set(map(type, chain.from_iterable(pairs))) != {str}:
        return None
    text = "\n".join(map("\t".join, pairs))
    if text.count("\n") != len(pairs) - 1:
        return None  # a line break inside a value: lines are no longer rows
    found: list[Staged] = _PLAIN_PAIR.findall(text)
    if len(found) != len(pairs) or max(map(len, map(itemgetter(1), found))) > MAX_EMAIL:
        return None
    return found


def check_chunks(
    chunks: Iterable[list[SourceRow]], *, with_value: bool = False, value_type: str | None = None
) -> Iterator[Batch]:
    """Each chunk of source rows split by ``split_chunk``."""
    for chunk in chunks:
        good, bad = split_chunk(chunk, with_value=with_value, value_type=value_type)
        yield Batch(len(chunk), good, bad)


def rejected_text(value: Any, *, canonical: bool = False, limit: int = 500) -> str | None:
    """A bounded, storable text form of a rejected row's value. A user id is canonical when
    it can be, so the rejected row of a member (say with a broken email) matches their
    membership and protects it."""
    if value is None:
        return None
    if canonical:
        try:
            return canonical_user_id(value)
        except ValueError:
            pass
    text = str(value).strip(WHITE_SPACE).replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL
    # Nor can any UTF-8 column hold a lone surrogate: show it escaped.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"
