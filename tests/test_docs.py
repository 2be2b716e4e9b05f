"""The docs keep up with the code: every command has help and is in the README."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from audience_sync.cli import command_parsers
from audience_sync.config import (
    AlertsConfig,
    AudienceConfig,
    DaemonConfig,
    GistConfig,
    StateConfig,
    TraitConfig,
)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands() -> dict[str, argparse.ArgumentParser]:
    return command_parsers()


@pytest.mark.parametrize("command", sorted(_commands()), ids=str)
def test_command_has_help_and_is_documented(command: str) -> None:
    parser = _commands()[command]
    assert parser.description, f"{command} has no description"
    assert f"audience-sync {command}" in README, f"README does not mention `{command}`"


@pytest.mark.parametrize(
    ("section", "model"),
    [
        ("state", StateConfig),
        ("gist", GistConfig),
        ("daemon", DaemonConfig),
        ("alerts", AlertsConfig),
        ("audiences[]", AudienceConfig),
    ],
    ids=["state", "gist", "daemon", "alerts", "audiences"],
)
def test_every_config_key_is_documented(section: str, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        key = field.alias or name  # as written in the file (`state.schema`)
        assert f"`{section}.{key}`" in README, f"README lacks {section}.{key}"


def test_every_trait_key_is_documented() -> None:
    for field in TraitConfig.model_fields:
        assert f"`traits[].{field}`" in README or f"`{field}`" in README.split("`traits[].name`")[1]


def test_example_config_is_valid_toml_and_names_every_gist_key() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert set(example["gist"]) == set(GistConfig.model_fields)


def test_cli_reference_is_generated_from_help() -> None:
    # The README's CLI reference is cog's output of every command's --help: never stale.
    done = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", str(ROOT / "README.md")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr + "\nrun: cog -r README.md"


def test_example_config_documents_the_state_keys() -> None:
    example = (ROOT / "config.example.toml").read_text()
    assert "pip install 'audience-sync[postgres]'" in example
    assert "schema = " in example


def test_every_test_the_guarantees_name_exists() -> None:
    # A renamed or removed test would leave a promise held by nothing.
    section = README.split("\n## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)(?:\.\.\.)?`", section))
    defined = {
        name
        for path in (ROOT / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)\(", path.read_text(), re.MULTILINE)
    }
    missing = {n for n in named if not any(d.startswith(n) for d in defined)}
    assert named
    assert missing == set()
