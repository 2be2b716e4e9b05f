"""docs/troubleshooting.md names the errors users really see: each case below makes one happen
and finds its line among the page's messages (``…`` and placeholders such as ``KEY`` match
what varies)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from audience_sync.cli import run_cli
from tests.conftest import closed_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "troubleshooting.md").read_text()
PLACEHOLDERS = r"\b(?:KEY|N|M|P|R|RUN_ID|COMMAND)\b"


def documented() -> list[re.Pattern[str]]:
    """The messages of the page's tables (each first cell's code spans), as patterns."""
    patterns = []
    for line in PAGE.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split(" | ", 1)[0]
        for message in re.findall(r"`+ ?(.+?) ?`+(?: /|$| \()", first.removeprefix("| ")):
            pattern = re.escape(message).replace("\\ …", ".*").replace("…", ".*")
            patterns.append(re.compile(re.sub(PLACEHOLDERS, ".*", pattern)))
    return patterns


def starter(folder: Path) -> Path:
    """`audience-sync init`'s config, its Gist at a port nothing listens on."""
    assert run_cli(["init", str(folder)]) == 0
    config = folder / "audience_sync.toml"
    config.write_text(
        config.read_text()
        .replace("https://api.getgist.com", f"http://127.0.0.1:{closed_port()}")
        .replace("requests_per_second = 10 ", "max_retries = 0\nrequests_per_second = 10 ")
    )
    return config


def no_config(folder: Path) -> list[str]:
    return ["run"]


def unset_variable(folder: Path) -> list[str]:
    return ["run", "--config", str(starter(folder))]


def key_with_a_newline(folder: Path) -> list[str]:
    return ["run", "--config", str(starter(folder))]


def missing_state_folder(folder: Path) -> list[str]:
    config = starter(folder)
    config.write_text(config.read_text().replace("sqlite:///", "sqlite:///gone/"))
    return ["run", "--config", str(config)]


def unknown_history_key(folder: Path) -> list[str]:
    return ["history", "--audience", "nope", "--config", str(starter(folder))]


def unknown_run(folder: Path) -> list[str]:
    config = starter(folder)
    assert run_cli(["db", "upgrade", "--config", str(config)]) == 0
    return ["show", "99", "--config", str(config)]


def nothing_scheduled(folder: Path) -> list[str]:
    return ["daemon", "--config", str(starter(folder))]


def init_twice(folder: Path) -> list[str]:
    starter(folder)
    return ["init", str(folder)]


def missing_source_file(folder: Path) -> list[str]:
    config = starter(folder)
    (folder / "members.csv").unlink()
    return ["run", "--config", str(config)]


def gist_unreachable(folder: Path) -> list[str]:
    return ["run", "--config", str(starter(folder))]


CASES: dict[str, tuple[Callable[[Path], list[str]], str | None]] = {
    "no-config": (no_config, None),
    "unset-variable": (unset_variable, None),
    "key-with-a-newline": (key_with_a_newline, "key\n"),
    "missing-state-folder": (missing_state_folder, "key"),
    "unknown-history-key": (unknown_history_key, None),
    "unknown-run": (unknown_run, None),
    "nothing-scheduled": (nothing_scheduled, "key"),
    "init-twice": (init_twice, None),
    "missing-source-file": (missing_source_file, "key"),
    "gist-unreachable": (gist_unreachable, "key"),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=str)
def test_the_page_has_the_message_a_user_sees(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make, key = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUDIENCE_SYNC_CONFIG", raising=False)
    if key is None:
        monkeypatch.delenv("GIST_API_KEY", raising=False)
    else:
        monkeypatch.setenv("GIST_API_KEY", key)
    args = make(tmp_path / "sync")
    capsys.readouterr()

    code = run_cli(args)

    out, err = capsys.readouterr()
    assert code != 0
    # `error: …` lines (the daemon's after their time), and notes under run's table.
    said = [
        re.sub(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?error: ", "", line).replace("`", "")
        for line in (out + err).splitlines()
        if re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?error: |^\w+: ", line)
    ]
    assert said, out + err
    patterns = documented()
    unexplained = [line for line in said if not any(p.search(line) for p in patterns)]
    assert unexplained == [], "docs/troubleshooting.md lacks these messages"


def test_the_pages_messages_are_specific() -> None:
    patterns = documented()
    assert len(patterns) > 40
    assert not any(p.search("an error nobody wrote down: 42") for p in patterns)
