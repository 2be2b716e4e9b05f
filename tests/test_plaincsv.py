"""The block reading of a CSV audience (``plaincsv``) gives exactly what the row-by-row
reading gives: the same staged rows, rejected rows, row numbers and errors, for any file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from audience_sync import plaincsv
from audience_sync.errors import SourceError
from audience_sync.plaincsv import plain_line_pattern, quoting
from audience_sync.rows import split_chunk
from audience_sync.sources import FileSource


def by_rows(path: Path) -> tuple[list[object], list[object], int] | str:
    """What the row-by-row reading stages: good rows, rejected rows, rows read (or the error)."""
    good: list[object] = []
    bad: list[object] = []
    total = 0
    try:
        for chunk in FileSource(path).read_chunks(chunk_size=7):
            ok, refused = split_chunk(chunk)
            good += ok
            bad += refused
            total += len(chunk)
    except SourceError as exc:
        return str(exc)
    return good, bad, total


def by_blocks(path: Path) -> tuple[list[object], list[object], int] | str:
    good: list[object] = []
    bad: list[object] = []
    total = 0
    try:
        for batch in FileSource(path).batches():
            good += batch.good
            bad += batch.bad
            total += batch.rows
    except SourceError as exc:
        return str(exc)
    return good, bad, total


def same_reading(content: str, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plaincsv, "BLOCK_CHARS", block)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "members.csv"
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
        assert by_blocks(path) == by_rows(path)


PLAIN_IDS = st.sampled_from(["u1", "u2", "42", "007", "a b", "ü-9", "x" * 255])
ODD_IDS = st.sampled_from([
    " u1", "u1 ", "", "  ", "x" * 256, "u\x00", "u\t1", "u,1", 'u"1', "\xa0u1", "u1\u3000",
    "u1\x1f", "\x1c", "\u2028",
])  # fmt: skip
PLAIN_EMAILS = st.sampled_from(["u1@example.com", "a.b@c.de", "ü@ß.de", "x@y.z" + "z" * 315])
ODD_EMAILS = st.sampled_from([
    "", " u1@example.com", "nope", "a@b", "a@@b.c", "a b@c.de", "x@y.z" + "z" * 316,
    "a,b@c.de", "a\x7f@b.cd", "é@\ud800.de", 'q"t@x.io', "a@b.cd\u2028", "a@b.cd\x1f",
])  # fmt: skip
OTHERS = st.sampled_from(["", "Ann", "a,b", 'say "hi"', "two\nlines", "x\r", "é", "\x00"])


@st.composite
def csv_files(draw: st.DrawFn) -> str:
    """A CSV audience's text: a header naming user_id and email (perhaps with another
    column, in any order), then lines plain and not, each field quoted or not."""
    names = draw(st.permutations(["user_id", "email", *draw(st.sampled_from([[], ["name"]]))]))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    quote_all = draw(st.booleans())

    def field(value: str) -> str:
        needs = any(c in value for c in ',"\r\n') or value != value.strip()
        if quote_all or needs or draw(st.integers(0, 9)) == 0:
            return '"' + value.replace('"', '""') + '"'
        return value

    lines = [",".join(field(n) for n in names) + end]
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 9))
        if kind == 9:  # something no row-shaped generator makes
            lines.append(draw(st.sampled_from(["\n", "\r\n", "\r", ",,\n", "a,b,c,d\n", '"\n'])))
            continue
        values = {
            "user_id": draw(ODD_IDS if kind == 8 else PLAIN_IDS),
            "email": draw(ODD_EMAILS if kind == 7 else PLAIN_EMAILS),
            "name": draw(OTHERS if kind == 6 else st.just("Ann")),
        }
        fields = [field(values[n]) for n in names]
        if kind == 5:
            fields = fields[: draw(st.integers(1, len(fields) - 1))]  # a short row
        lines.append(",".join(fields) + end)
    text = "".join(lines)
    return text[:-1] if draw(st.booleans()) and text.endswith("\n") else text


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=csv_files(), block=st.integers(1, 120))
@example(content='user_id,email\nu1,u1@example.com\n"u2","x\ny"\nu3,u3@example.com\n', block=30)
@example(content="user_id,email\r\nu1,u1@example.com\r\n\r\nu2,u2@example.com", block=16)
def test_blocks_read_like_rows(content: str, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    same_reading(content, block, monkeypatch)


@pytest.mark.parametrize(
    "content",
    [
        'user_id,email\nu1,u1@example.com\n"u2,"unterminated\nu3,u3@example.com\n',
        "user_id,email\nu1,u1@example.com\nu2,a\x00@example.com\n",
        '"user\nid",user_id,email\n1,u1,u1@example.com\n2,u2,bad\n',
    ],
    ids=["open-quote-to-the-end", "nul", "header-over-two-lines"],
)
@pytest.mark.parametrize("block", [1, 8, 40, 1 << 20])
def test_odd_files_read_like_rows(
    content: str, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    same_reading(content, block, monkeypatch)


def test_plain_blocks_never_reach_the_row_by_row_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def row_by_row(*args: object, **kwargs: object) -> None:
        raise AssertionError("a plain line went through split_chunk")

    monkeypatch.setattr(plaincsv, "split_chunk", row_by_row)
    monkeypatch.setattr(plaincsv, "BLOCK_CHARS", 1)  # a block per line
    path = tmp_path / "members.csv"
    path.write_text(
        'email,user_id,name\nu1@example.com,u1,Ann\n"u2@example.com","u2","B, C"\n'
        "u3@example.com,u3,\r\n",
        encoding="utf-8",
    )

    batches = list(FileSource(path).batches())  # the second block's quoting differs

    assert batches == [
        (1, [("u1", "u1@example.com")], []),
        (1, [("u2", "u2@example.com")], []),
        (1, [("u3", "u3@example.com")], []),
    ]


def test_the_plain_pattern_refuses_what_the_checks_would_clean_or_reject() -> None:
    pattern = plain_line_pattern(["user_id", "email"], [False, False])

    assert pattern.findall("u1,u1@example.com\n") == [("u1", "u1@example.com")]
    for line in [" u1,u1@example.com\n", "u1,u1@example.com \n", "u1,nope\n", ",a@b.co\n",
                 "x" * 256 + ",a@b.co\n", "u1,a@b.co,\n", "u1\x7f,a@b.co\n", "\xa0u1,a@b.co\n",
                 "u1\x1c,a@b.co\n", "u1,a@b.co\u3000\n"]:  # fmt: skip
        assert pattern.findall(line) == [], line
    assert pattern.findall("u1,x@y.z" + "z" * 400 + "\n")  # too long: PlainCsv checks lengths
    assert quoting('"a",b,"c,d"\n') == (True, False, True)
    assert quoting('"a""b",c\n') is None
