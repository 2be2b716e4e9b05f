"""The docs keep up with the code: every command has help and is in the README."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from audience_sync.cli import build_parser
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
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


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
def test_every_config_key_is_documented(section: str, model: type) -> None:
    for field in model.model_fields:
        assert f"`{section}.{field}`" in README, f"README lacks {section}.{field}"


def test_every_trait_key_is_documented() -> None:
    for field in TraitConfig.model_fields:
        assert f"`traits[].{field}`" in README or f"`{field}`" in README.split("`traits[].name`")[1]


def test_example_config_is_valid_toml_and_names_every_gist_key() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert set(example["gist"]) == set(GistConfig.model_fields)
