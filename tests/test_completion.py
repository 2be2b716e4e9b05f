"""``audience-sync completion SHELL``: the script loads, and completing really works."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXECUTABLE, run_process

BIN = str(Path(EXECUTABLE).parent)


def _bash_complete(line: str) -> list[str]:
    """Tab-complete ``line`` in a real bash that loaded the printed script."""
    words = line.split(" ")
    script = (
        'eval "$(audience-sync completion bash)"\n'
        f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}\n'
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f'_python_argcomplete audience-sync "{words[-1]}" "{words[-2]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        check=True,
    )
    return [word.strip() for word in done.stdout.splitlines() if word.strip()]


def test_bash_completes_commands_and_their_arguments() -> None:
    assert _bash_complete("audience-sync hi") == ["history"]
    assert {"bash", "zsh", "fish"} <= set(_bash_complete("audience-sync completion "))
    assert "--older-than" in _bash_complete("audience-sync prune --o")
    assert "--config" in _bash_complete("audience-sync --c")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"], ids=str)
def test_every_shell_gets_a_script_that_answers(shell: str, tmp_path: Path) -> None:
    done = run_process("completion", shell)
    assert done.returncode == 0, done.stderr
    assert "audience-sync" in done.stdout
    # What the script asks of the program when a user presses tab in that shell.
    answer = tmp_path / "answer"
    line = "audience-sync d"
    asked = run_process(
        env={
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_SHELL": shell,
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
        }
    )
    assert asked.returncode == 0, asked.stderr
    # One completion per entry (bash/zsh: vertical tabs, fish: newlines), zsh and fish
    # followed by the command's help after ":" or a tab.
    entries = re.split(r"[\v\n]", answer.read_text())
    offered = {re.split(r"[:\t]", entry, maxsplit=1)[0].strip() for entry in entries}
    assert {"daemon", "demo", "db"} <= offered, entries
