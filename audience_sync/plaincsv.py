"""A CSV audience read a block of lines at a time, its plain lines checked in one C-level pass.

A *plain* line is one whose fields are all either unquoted or simply quoted (no quote, line
break or, unquoted, comma inside), with as many fields as the header, and whose user id and
email already pass every check of ``rows.check_row`` as they stand (nothing to trim, no
control character, lengths within bounds, the email pattern). One regular expression per
header states exactly that, so ``findall`` over a block of whole lines turns it into the
staged ``(user_id, email)`` pairs with no per-row Python at all, and proves every line plain
when it finds as many rows as the block has lines.

A block with any other line (blank, quoted across lines, short, long, a bad or untrimmed
value) goes through the ``csv`` module and ``split_chunk``, the same reading as
``FileSource.read_chunks``; a quoted field that runs past the block's end is read on from
the file, and the next block starts after it. Either way a block yields the same rows,
rejected rows and row numbers as the row-by-row reading, which stays the definition
(``tests/test_plaincsv.py`` compares them on generated files).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter

from audience_sync.rows import (
    _PLAIN_USER_ID,
    EMAIL_PATTERN,
    MAX_EMAIL,
    Batch,
    SourceRow,
    Staged,
    split_chunk,
)

BLOCK_CHARS = 1 << 18  # characters read per block: ~8,000 rows of a typical export


def _plain_field(kind: str, quoted: bool) -> str:
    """The pattern of one plain field: ``user_id`` and ``email`` as a group holding a value
    that needs no cleaning, any other column as an ungrouped value csv reads unchanged."""
    # Unquoted, a field ends at a comma and holds no quote; quoted, it holds no quote
    # (an escaped "" would need csv to read it). No field holds a line break: the control
    # characters excluded from user ids and emails include \r and \n.
    stop = '"' if quoted else ',"'
    if kind == "user_id":
        # rows' own pattern of a user id that needs no trimming, within the field.
        value = "(" + _PLAIN_USER_ID.pattern.replace("[^", "[^" + stop) + ")"
    elif kind == "email":
        # EMAIL_PATTERN within the field (its length is checked apart: faster than here).
        value = "(" + EMAIL_PATTERN.pattern.replace("[^@", "[^@" + stop) + ")"
    else:
        value = f"[^{stop}\\r\\n]{{0,{csv.field_size_limit()}}}"
    return f'"{value}"' if quoted else value


def plain_line_pattern(header: Sequence[str], quoted: Sequence[bool]) -> re.Pattern[str]:
    """The pattern of a plain line of a file with this header, each field quoted or not as
    ``quoted`` says; its groups are the user id and the email, in the header's order. An
    email longer than MAX_EMAIL characters is not refused by it (see ``PlainCsv``)."""
    fields = [_plain_field(name, q) for name, q in zip(header, quoted, strict=True)]
    line = f"^{','.join(fields)}\\r?\\n"
    return re.compile(line, re.MULTILINE)


# A line's fields, each quoted or not, as plain lines have them: which ones are quoted.
_FIELD = re.compile(r'("[^"\r\n]*"|[^,"\r\n]*)(,|\r?\n|$)')


def quoting(line: str) -> tuple[bool, ...] | None:
    """Which fields of ``line`` are quoted, if it is a line of simple fields; else None."""
    quoted: list[bool] = []
    position = 0
    while True:
        match = _FIELD.match(line, position)
        if match is None:
            return None
        quoted.append(match.group(1).startswith('"'))
        if match.group(2) != ",":
            return tuple(quoted) if match.end() == len(line) else None
        position = match.end()


class _Feed:
    """The text of a file after its header: blocks of whole lines for the pattern, single
    lines (as a file opened with ``newline=""`` gives them) for csv."""

    def __init__(self, handle: io.TextIOBase) -> None:
        self._handle = handle
        self._pending = ""  # read but not yet handed out

    def block(self) -> str:
        """The next lines up to the last line break of a block read; at the end of the file,
        what is left (its last line perhaps without one); "" when nothing is."""
        text = self._pending
        while True:
            more = self._handle.read(BLOCK_CHARS)
            if not more:
                self._pending = ""
                return text
            text += more
            cut = text.rfind("\n") + 1
            if cut:
                self._pending = text[cut:]
                return text[:cut]

    def line(self) -> str:
        """The next line, ending at "\\n", "\\r" or "\\r\\n"; "" at the end of the file."""
        while True:
            pending = self._pending
            head = io.StringIO(pending, newline="").readline()
            # A "\r" that ends what is pending may be the first half of a "\r\n".
            if head.endswith("\n") or (head.endswith("\r") and len(head) < len(pending)):
                self._pending = pending[len(head) :]
                return head
            more = self._handle.readline()
            if not more:
                self._pending = ""
                return pending
            self._pending = pending + more


class PlainCsv:
    """A CSV audience's rows after the header, as batches (see the module's docstring).

    ``to_rows`` turns csv records into source rows as ``FileSource`` does (blank lines
    skipped, short rows padded), numbering them on from the number it is given.
    """

    def __init__(
        self,
        handle: io.TextIOBase,
        header: Sequence[str],
        to_rows: Callable[[Iterator[list[str]], int], Iterator[SourceRow]],
    ) -> None:
        self._feed = _Feed(handle)
        self._header = list(header)
        self._to_rows = to_rows
        self._patterns: dict[tuple[bool, ...], re.Pattern[str]] = {}
        self._swap = header.index("email") < header.index("user_id")
        self.line_num = 0  # lines read after the header, for csv's error messages
        self.rows = 0  # source rows yielded so far

    def batches(self) -> Iterator[Batch]:
        quoted: tuple[bool, ...] = (False,) * len(self._header)
        while block := self._feed.block():
            lines = block.count("\n") + (not block.endswith("\n"))
            text = block if block.endswith("\n") else block + "\n"
            pattern = self._pattern(quoted)
            plain = pattern.match(text)
            if not plain:  # its first line is not plain, quoted this way
                first = quoting(text[: text.find("\n") + 1])
                if first is not None and first != quoted and len(first) == len(self._header):
                    quoted = first  # an export that quotes its fields another way
                    pattern = self._pattern(quoted)
                    plain = pattern.match(text)
            # A block whose first line is not plain goes to csv without a search: a file of
            # such lines costs no more than the row-by-row reading.
            found = pattern.findall(text) if plain else []
            if found and max(map(len, map(itemgetter(1 - self._swap), found))) > MAX_EMAIL:
                found = []  # an email too long: csv and split_chunk say which
            if len(found) == lines:
                good: list[Staged] = [(u, e) for e, u in found] if self._swap else found
                self.line_num += lines
                self.rows += lines
                yield Batch(lines, good, [])
            else:
                yield from self._read_slowly(block)

    def _pattern(self, quoted: tuple[bool, ...]) -> re.Pattern[str]:
        pattern = self._patterns.get(quoted)
        if pattern is None:
            pattern = self._patterns[quoted] = plain_line_pattern(self._header, quoted)
        return pattern

    def _read_slowly(self, block: str) -> Iterator[Batch]:
        """The block's lines through csv (and on into the file while a quoted field runs
        past its end), checked row by row."""
        past_block = False

        def lines() -> Iterator[str]:
            nonlocal past_block
            yield from io.StringIO(block, newline="")
            past_block = True
            while line := self._feed.line():
                yield line

        reader = csv.reader(lines())
        base = self.line_num

        def records() -> Iterator[list[str]]:
            try:
                for record in reader:
                    yield record
                    if past_block:
                        return  # the record that ran past the block ended: blocks go on
            finally:
                self.line_num = base + reader.line_num  # csv's line when it fails

        rows = list(self._to_rows(records(), self.rows))
        if rows:
            self.rows = rows[-1][0]
        good, bad = split_chunk(rows)
        yield Batch(len(rows), good, bad)
