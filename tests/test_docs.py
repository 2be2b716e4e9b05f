"""The docs keep up with the code: every command has help and is described in docs/, every
config key is in the configuration reference with its default, the CLI reference is
``--help`` itself, every link between pages (anchors included) lands, and the README stays
a short front door that points into docs/."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from audience_sync.cli import command_parsers
from audience_sync.config import (
    AlertsConfig,
    AudienceConfig,
    DaemonConfig,
    GistConfig,
    SourceConfig,
    StateConfig,
    TraitConfig,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
CLI = (DOCS / "cli.md").read_text()
# What the commands page says in its own words, before the generated reference.
CLI_PROSE = CLI.split("\n## CLI reference\n", 1)[0]
CONFIGURATION = (DOCS / "configuration.md").read_text()
MODELS: list[tuple[str, type[BaseModel]]] = [
    ("state", StateConfig),
    ("gist", GistConfig),
    ("daemon", DaemonConfig),
    ("alerts", AlertsConfig),
    ("sources.<name>", SourceConfig),
    ("audiences[]", AudienceConfig),
    ("traits[]", TraitConfig),
]
# Defaults the reference describes rather than spells: computed when the key is unset.
DESCRIBED = {"audiences[].key": "snake_case(name)", "audiences[].format": "by suffix"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _commands() -> dict[str, argparse.ArgumentParser]:
    return command_parsers()


@pytest.mark.parametrize("command", sorted(_commands()), ids=str)
def test_command_has_help_and_is_described_in_the_docs(command: str) -> None:
    parser = _commands()[command]
    assert parser.description, f"{command} has no description"
    assert f"`audience-sync {command}" in CLI_PROSE, f"docs/cli.md does not describe `{command}`"


def config_rows() -> dict[str, str]:
    """The configuration reference's table: each key it names → its default cell. A row may
    name several keys of one section (``traits[].name``, ``key``, …)."""
    table = CONFIGURATION.split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        section = names[0].rsplit(".", 1)[0]
        for name in names:
            rows[name if "." in name else f"{section}.{name}"] = cells[1]
    return rows


def is_documented_default(cell: str, value: Any, required: bool) -> bool:
    """Whether the reference's default cell says ``value`` (``required`` when there is none)."""
    shown = cell.strip("`")
    if required:
        return shown == "required"
    if value is None:
        return shown == ""
    if isinstance(value, bool):
        return shown == str(value).lower()
    if isinstance(value, int | float):
        return re.fullmatch(r"[\d.]+", shown) is not None and float(shown) == value
    return shown == str(value)


@pytest.mark.parametrize(("section", "model"), MODELS, ids=[s for s, _ in MODELS])
def test_every_config_key_is_in_the_reference_with_its_default(
    section: str, model: type[BaseModel]
) -> None:
    rows = config_rows()
    for name, field in model.model_fields.items():
        key = f"{section}.{field.alias or name}"  # as written in the file (`state.schema`)
        assert key in rows, f"docs/configuration.md lacks {key}"
        cell = rows[key]
        if cell == "as for audiences":
            twin = AudienceConfig.model_fields[name]
            assert twin.default == field.default, key
            continue
        if key in DESCRIBED:
            assert (cell, field.default) == (DESCRIBED[key], None), key
            continue
        default = None if field.default is PydanticUndefined else field.default
        assert is_documented_default(cell, default, field.is_required()), f"{key}: {cell!r}"


def test_the_reference_names_no_key_the_config_lacks() -> None:
    known = {
        f"{section}.{field.alias or name}"
        for section, model in MODELS
        for name, field in model.model_fields.items()
    }
    assert set(config_rows()) - known == set()


def test_the_configuration_reference_says_how_keys_come_from_the_environment() -> None:
    environment = CONFIGURATION.split("\n## The environment\n", 1)[1]
    assert '"${VAR}"' in environment
    for variable in ("GIST_API_KEY", "AUDIENCE_SYNC_CONFIG", "AUDIENCE_SYNC_UI_PASSWORD"):
        assert f"`{variable}`" in environment


def test_example_config_is_valid_toml_and_names_every_gist_key() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert set(example["gist"]) == set(GistConfig.model_fields)


def test_example_config_documents_the_state_keys() -> None:
    example = (ROOT / "config.example.toml").read_text()
    assert "pip install 'audience-sync[postgres]'" in example
    assert "schema = " in example


def test_cli_reference_is_generated_from_help() -> None:
    # docs/cli.md's CLI reference is cog's output of every command's --help: never stale.
    done = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", str(DOCS / "cli.md")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr + "\nrun: cog -r docs/cli.md"


def test_every_test_the_guarantees_name_exists() -> None:
    # A renamed or removed test would leave a promise held by nothing.
    page = (DOCS / "how-it-works.md").read_text()
    section = page.split("\n## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)(?:\.\.\.)?`", section))
    defined = {
        name
        for path in (ROOT / "tests").rglob("test_*.py")
        for name in re.findall(r"^def (test_\w+)\(", path.read_text(), re.MULTILINE)
    }
    missing = {n for n in named if not any(d.startswith(n) for d in defined)}
    assert named
    assert missing == set()


def slug(heading: str) -> str:
    """A heading's anchor as MkDocs (Python-Markdown's toc) makes it."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)  # code spans count as their text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links as their text
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE):
        anchor, n = slug(heading), 1
        while anchor in found:  # a repeated heading gets _1, _2, … as toc numbers them
            anchor = f"{slug(heading)}_{n}"
            n += 1
        found.add(anchor)
    return found


def links(page: Path) -> list[str]:
    """The Markdown links of a page, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


@pytest.mark.parametrize("page", [*PAGES, README], ids=lambda p: p.name)
def test_every_link_lands(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        landing = (page.parent / path).resolve() if path else page
        if not landing.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and landing.suffix == ".md" and anchor not in anchors(landing):
            broken.append(f"{target}: no heading makes #{anchor}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_image_exists(page: Path) -> None:
    for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
        assert (page.parent / target).is_file(), target


def test_every_page_is_in_the_site_nav_and_the_nav_has_no_other() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", config, re.MULTILINE)
    assert sorted(nav) == sorted(p.name for p in PAGES)
    assert "strict: true" in config


def test_the_readme_is_a_short_front_door_into_the_docs() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    linked = {Path(t.partition("#")[0]).name for t in links(README) if t.startswith("docs/")}
    assert linked >= {p.name for p in PAGES if p.name != "index.md"}, "a page the README omits"
    assert "## Prerequisites" in text
    assert "Python 3.11" in text


def test_ci_builds_the_docs_strictly_and_checks_the_generated_parts() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[docs]'" in ci
    assert "mkdocs build --strict" in ci
    assert "cog --check docs/cli.md benchmarks/README.md" in ci
