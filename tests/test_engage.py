"""Engage exports: identify/track payloads rebuilt into one audience's or trait's current state."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import pytest

from audience_sync.engage import read_engage
from audience_sync.errors import SourceError
from audience_sync.sources import SourceRow

FIXTURES = Path(__file__).parent / "fixtures" / "engage"
AUDIENCE = "first_time_shopper"
TRAIT = "total_revenue_180_days"

Row = tuple[int, Any, Any, type, Any]


def read(
    name: str | Path,
    key: str,
    kind: Literal["audience", "trait"] = "audience",
    chunk_size: int = 5000,
) -> list[Row]:
    """The rows as (line, user, email, type of value, value): 1, 1.0 and True compare equal."""
    path = name if isinstance(name, Path) else FIXTURES / name
    return [
        flat(row)
        for chunk in read_engage(path, key, kind=kind, chunk_size=chunk_size)
        for row in chunk
    ]


def flat(row: SourceRow) -> Row:
    number, user_id, email, value = row
    return (number, user_id, email, type(value), value)


def member(line: int, user: Any, email: str | None) -> Row:
    return (line, user, email, type(None), None)


def audience_event(user: Any, member: Any, **extra: Any) -> dict[str, Any]:
    personas = {"computation_class": "audience", "computation_key": AUDIENCE}
    event = {
        "type": "identify",
        "userId": user,
        "traits": {AUDIENCE: member},
        "context": {"personas": personas},
    }
    return event | extra


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        (
            "audience_identify.jsonl",
            [
                member(8, "u7", None),
                member(9, "u6", "new@example.com"),
                member(10, "u1", "ada@example.com"),
            ],
        ),
        (
            "audience_track.jsonl",
            [
                member(1, "u1", "ada@example.com"),
                member(7, "u6", "fay@example.com"),
                member(8, "u7", "gus@example.com"),
            ],
        ),
    ],
    ids=["identify", "track"],
)
def test_membership_is_rebuilt_from_entries_and_exits(fixture: str, expected: list[Row]) -> None:
    assert read(fixture, AUDIENCE) == expected


@pytest.mark.parametrize(
    ("fixture", "key", "kind", "expected"),
    [
        (
            "audience_identify.jsonl",
            "high_value_customer",
            "audience",
            [member(3, "u3", "cy@example.com")],
        ),
        ("audience_identify.jsonl", AUDIENCE, "trait", [(5, "u5", "eve@example.com", bool, True)]),
        ("audience_identify.jsonl", TRAIT, "trait", [(4, "u4", "dee@example.com", float, 450.0)]),
        (
            "audience_track.jsonl",
            "high_value_customer",
            "audience",
            [member(4, "u4", "dee@example.com")],
        ),
        ("computed_trait.jsonl", TRAIT, "audience", [member(7, "u7", "gus@example.com")]),
        (
            "computed_trait.jsonl",
            "lifetime_orders",
            "trait",
            [(6, "u6", "fay@example.com", int, 3)],
        ),
        ("computed_trait.jsonl", "no_such_key", "trait", []),
    ],
    ids=[
        "other-audience",
        "same-key-trait-class",
        "trait-among-audiences",
        "other-audience-track",
        "same-key-audience-class",
        "other-trait",
        "unknown-key",
    ],
)
def test_only_the_requested_key_and_class_count(
    fixture: str, key: str, kind: Literal["audience", "trait"], expected: list[Row]
) -> None:
    assert read(fixture, key, kind) == expected


def test_trait_values_keep_their_json_types_and_the_last_one_wins() -> None:
    assert read("computed_trait.jsonl", TRAIT, "trait") == [
        (2, "u2", "bob@example.com", float, 1.0),
        (3, "u3", "cy@example.com", str, "1"),
        (4, "u4", "dee@example.com", bool, True),
        (8, "u1", "ada@example.com", int, 1),  # 450 overridden by a Trait Computed track
        (9, "u5", "eve.new@example.com", type(None), None),  # set back to null
        (10, "u8", None, float, 12.5),  # no personas context: properties.trait_key says which
    ]


def test_email_comes_from_the_latest_event_that_has_one() -> None:
    rows = {row[1]: row for row in read("audience_identify.jsonl", AUDIENCE)}
    assert rows["u1"][2] == "ada@example.com"  # the deciding resync had no email
    assert rows["u6"][2] == "new@example.com"  # a later email replaces the old one


def test_a_member_without_any_email_is_yielded_with_none(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.jsonl",
        [
            audience_event("u1", True),
            "\n",
            audience_event("u2", True, traits={AUDIENCE: True, "email": "  "}),
        ],
    )
    assert read(path, AUDIENCE) == [member(1, "u1", None), member(3, "u2", None)]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([audience_event("u1", True), audience_event("u1", False)], []),
        ([audience_event("u1", False), audience_event("u1", True)], [member(2, "u1", None)]),
        (
            [
                audience_event("u1", True, timestamp="2024-03-02T00:00:00Z"),
                audience_event("u1", False, timestamp="2024-03-01T00:00:00Z"),
            ],
            [member(1, "u1", None)],
        ),
        (
            [
                audience_event("u1", False, sentAt="2024-03-02T00:00:00+01:00"),
                audience_event("u1", True, sentAt="2024-03-01T23:30:00"),
            ],
            [member(2, "u1", None)],
        ),
        (
            [
                audience_event("u1", True, timestamp="2024-03-02T00:00:00Z"),
                audience_event("u1", False, timestamp="not a time"),
            ],
            [],
        ),
        (
            [audience_event(7, True), audience_event("7", True)],
            [member(2, "7", None)],
        ),
        (
            [audience_event(42, True), audience_event("42", False)],
            [],
        ),
        (
            [audience_event(42.0, False), audience_event(42, True)],
            [member(2, "42", None)],
        ),
        (
            [
                audience_event("u1", True, timestamp="2024-03-01T00:00:00Z"),
                audience_event("u1", True),
                audience_event("u1", False, timestamp="2024-01-01T00:00:00Z"),
            ],
            [member(2, "u1", None)],
        ),
        (
            [
                audience_event("u1", True, timestamp="2024-03-01T00:00:00Z"),
                audience_event("u1", False, timestamp="2024-01-01T00:00:00Z"),
                audience_event("u1", True),  # happens just after January: March still wins
            ],
            [member(1, "u1", None)],
        ),
        (
            [
                audience_event("u1", False, timestamp="2024-01-01T00:00:00Z"),
                audience_event("u2", True, timestamp="2024-03-01T00:00:00Z"),
                audience_event("u1", True),
                audience_event("u1", False, timestamp="2024-02-01T00:00:00Z"),
            ],
            [member(2, "u2", None), member(3, "u1", None)],
        ),
    ],
    ids=[
        "file-order-exit",
        "file-order-reentry",
        "older-timestamp-loses",
        "naive-sentAt-is-utc",
        "unreadable-time-falls-back-to-file-order",
        "int-and-str-ids-are-one-user",
        "numeric-entry-then-string-exit",
        "float-id-is-the-int-id",
        "untimed-event-between-timed-ones",
        "untimed-event-after-timed-ones",
        "untimed-event-takes-the-time-of-the-line-before",
    ],
)
def test_the_latest_event_per_user_decides(
    tmp_path: Path, events: list[dict[str, Any]], expected: list[Row]
) -> None:
    assert read(write(tmp_path / "e.jsonl", events), AUDIENCE) == expected


@pytest.mark.parametrize(
    ("chunk_size", "sizes"),
    [(1, [1] * 5), (2, [2, 2, 1]), (5, [5]), (100, [5])],
    ids=["one", "two", "exact", "larger"],
)
def test_rows_come_in_chunks(tmp_path: Path, chunk_size: int, sizes: list[int]) -> None:
    path = write(tmp_path / "e.jsonl", [audience_event(f"u{i}", True) for i in range(5)])
    chunks = list(read_engage(path, AUDIENCE, kind="audience", chunk_size=chunk_size))
    assert [len(chunk) for chunk in chunks] == sizes
    assert [row[1] for chunk in chunks for row in chunk] == [f"u{i}" for i in range(5)]


def test_an_empty_export_yields_nothing(tmp_path: Path) -> None:
    assert list(read_engage(write(tmp_path / "e.jsonl", ["\n"]), AUDIENCE, kind="trait")) == []


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        next(
            read_engage(FIXTURES / "audience_track.jsonl", AUDIENCE, kind="audience", chunk_size=0)
        )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"type": "identify", \n', "line 2: invalid JSON"),
        ('["identify"]\n', "line 2: expected a JSON object"),
        (audience_event(None, True), "line 2: Engage event without a usable userId"),
        (
            {k: v for k, v in audience_event("x", True).items() if k != "userId"},
            "line 2: Engage event without a usable userId",
        ),
        (audience_event("", True), "line 2: Engage event without a usable userId"),
        (audience_event(True, True), "line 2: Engage event without a usable userId"),
        (audience_event("u2", "yes"), "line 2: traits.first_time_shopper must be true or false"),
        (
            audience_event("u2", True, traits={"email": "a@example.com"}),
            "line 2: traits.first_time_shopper must be true or false (got nothing)",
        ),
    ],
    ids=[
        "invalid-json",
        "not-an-object",
        "null-user-id",
        "no-user-id",
        "empty-user-id",
        "bool-user-id",
        "non-bool-membership",
        "no-membership-value",
    ],
)
def test_a_broken_export_fails_with_file_and_line(tmp_path: Path, bad: Any, message: str) -> None:
    path = write(tmp_path / "broken.jsonl", [audience_event("u1", True), bad])
    with pytest.raises(SourceError, match=re.escape(message)) as caught:
        list(read_engage(path, AUDIENCE, kind="audience"))
    assert str(path) in str(caught.value)


def test_a_trait_event_without_its_value_fails(tmp_path: Path) -> None:
    event = {
        "type": "track",
        "event": "Trait Computed",
        "userId": "u1",
        "properties": {"trait_key": TRAIT},
    }
    with pytest.raises(SourceError, match=f"line 1: no properties.{TRAIT}"):
        list(read_engage(write(tmp_path / "e.jsonl", [event]), TRAIT, kind="trait"))


def test_events_of_other_computations_need_no_user_id(tmp_path: Path) -> None:
    other = audience_event(None, True)
    other["context"]["personas"]["computation_key"] = "high_value_customer"
    path = write(tmp_path / "e.jsonl", [other, audience_event("u1", True)])
    assert read(path, AUDIENCE) == [member(2, "u1", None)]


def test_a_file_that_is_not_utf8_fails(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"type": "identify", "userId": "\xff"}\n')
    with pytest.raises(SourceError, match="not UTF-8"):
        list(read_engage(path, AUDIENCE, kind="audience"))
