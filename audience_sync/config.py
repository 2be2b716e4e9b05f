"""TOML configuration with ``${ENV}`` interpolation → frozen, validated settings."""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from audience_sync.crontab import parse_crontab
from audience_sync.errors import ConfigError
from audience_sync.naming import check_unique_keys, is_valid_key, property_key

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "audience_sync.toml"
STATE_SOURCE = "state"  # `source = "state"`: the query runs on the state database itself
CONFIG_ENV = "AUDIENCE_SYNC_CONFIG"
_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
MAX_DURATION_DAYS = 3650
MAX_DURATION_SECONDS = MAX_DURATION_DAYS * 86400.0
# `$${X}` is a literal `${X}` and `$$` a literal `$`, as in Docker Compose files.
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
FileFormat = Literal["csv", "jsonl", "engage"]
FILE_FORMATS: dict[str, FileFormat] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STATE_BACKENDS = ("sqlite", "postgresql")
UNUSED_KEY = "unused: this command never calls Gist"


def source_url(settings: Settings, audience: Computation) -> str | None:
    """The database URL an audience's query runs on (the state's for ``source = "state"``),
    or None for a file audience."""
    if audience.source is None:
        return None
    if audience.source == STATE_SOURCE:
        return settings.state.url
    return settings.sources[audience.source].url


def parse_duration(text: str) -> float | None:
    """Seconds in ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"1w"`` or ``"1h30m"`` (0 allowed);
    None if ``text`` is not one. ``ValueError`` beyond ``MAX_DURATION_DAYS``, so no caller
    overflows a date or a timer."""
    match = _DURATION.fullmatch(text.strip())
    if not match or not any(match.groups()):
        return None
    weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total > MAX_DURATION_SECONDS:
        raise ValueError(f"{text.strip()!r} is longer than {MAX_DURATION_DAYS}d")
    return float(total)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StateConfig(_Frozen):
    """Where audience-sync keeps what Gist acknowledged: SQLite or PostgreSQL."""

    url: str = "sqlite:///audience_sync.db"
    # `schema` in the file; a field named so would shadow BaseModel.schema.
    db_schema: str | None = Field(None, alias="schema")
    # How long an audience's lease outlives its holder's last renewal (database time).
    lease_seconds: float = Field(60.0, ge=2, le=3600)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        try:
            backend = make_url(url).get_backend_name()
        except (ArgumentError, ValueError):
            raise ValueError(f"{redact_url(url)!r} is not a SQLAlchemy URL") from None
        if backend not in STATE_BACKENDS:
            raise ValueError(
                f"the state is kept in SQLite or PostgreSQL, not {backend} "
                "(`sqlite:///audience_sync.db` or `postgresql://user@host/db`)"
            )
        return url

    @field_validator("db_schema")
    @classmethod
    def _check_schema(cls, schema: str | None, info: ValidationInfo) -> str | None:
        if schema is None:
            return None
        url = info.data.get("url")
        if url is not None and make_url(url).get_backend_name() != "postgresql":
            raise ValueError("`schema` applies to a PostgreSQL state only")
        if not _SCHEMA.fullmatch(schema):
            raise ValueError(f"schema {schema!r} must be a lowercase name (^[a-z_][a-z0-9_]*$)")
        return schema


class GistConfig(_Frozen):
    """How to reach Gist and how hard to push it."""

    api_key: SecretStr
    base_url: str = "https://api.getgist.com"
    requests_per_second: float = Field(10.0, gt=0, le=10_000)
    max_concurrency: int = Field(8, ge=1, le=256)
    timeout_seconds: float = Field(30.0, gt=0, le=3600)
    max_retries: int = Field(5, ge=0, le=20)
    retry_backoff_seconds: float = Field(1.0, gt=0, le=300)
    batch_size: int = Field(1, ge=1, le=1000)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, base_url: str) -> str:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{base_url!r} must be an http(s) URL with a host, like https://api.getgist.com"
            )
        return base_url


class DaemonConfig(_Frozen):
    """How ``audience-sync daemon`` schedules and reports."""

    timezone: str = "UTC"
    misfire_grace_seconds: int = Field(300, ge=1, le=7 * 86400)
    heartbeat_file: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # The daemon's heartbeat job ticks every 60 s: a shorter stall would flap between ok and
    # 503 on a healthy daemon; two ticks is the least that never does.
    health_stall_seconds: int = Field(900, ge=120, le=7 * 86400)
    health_failed_runs: int = Field(3, ge=1, le=1000)

    @model_validator(mode="after")
    def _check(self) -> DaemonConfig:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not a known time zone") from None
        return self


class AlertsConfig(_Frozen):
    """Where to POST a JSON summary of runs that need a human."""

    webhook_url: str | None = None
    always: bool = False  # also for runs that succeeded
    timeout_seconds: float = Field(10.0, gt=0, le=300)  # the whole alert, not one read
    remind_every: str = "6h"  # while an audience keeps failing

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = f"{parts.scheme}://{parts.hostname or ''}/…" if parts.scheme else "it"
            raise ValueError(
                f"{shown} must be an http(s) URL with a host, like "
                "https://hooks.example.com/… (an alert to anything else would be lost)"
            )
        return url

    @model_validator(mode="after")
    def _check(self) -> AlertsConfig:
        try:
            seconds = parse_duration(self.remind_every)
        except ValueError as exc:
            raise ValueError(f"remind_every {exc}") from None
        if seconds is None or seconds < 60:
            raise ValueError(
                f"remind_every {self.remind_every!r} is not an interval of at least 1m "
                "(like 30m, 6h or 1d)"
            )
        return self


class SourceConfig(_Frozen):
    """A database that audience queries run against (read-only)."""

    url: str


class _Computation(_Frozen):
    """What audiences and computed traits share: a name, a key, a source and a schedule."""

    name: str = Field(min_length=1)
    key: str | None = None
    source: str | None = None
    query: str | None = None
    file: Path | None = None
    format: FileFormat | None = None  # default: by the file's suffix
    schedule: str | None = None
    every: str | None = None
    send_track: bool = False
    mass_exit_threshold: float = Field(0.5, gt=0, le=1)
    mass_exit_min_members: int = Field(100, ge=0, le=1_000_000_000)

    @property
    def property_key(self) -> str:
        """The Gist custom property this sets: explicit ``key``, else snake_case(name)."""
        return self.key if self.key is not None else property_key(self.name)

    @property
    def is_trait(self) -> bool:
        """True for a computed trait, False for an audience."""
        return False

    @property
    def file_format(self) -> FileFormat | None:
        """How ``file`` is read: ``format``, else by its suffix; None for a query."""
        if self.file is None:
            return None
        return self.format or FILE_FORMATS.get(self.file.suffix.lower())

    @model_validator(mode="after")
    def _check(self) -> _Computation:
        if self.key is not None and not is_valid_key(self.key):
            raise ValueError(f"key {self.key!r} must match ^[a-z0-9_]+$")
        if not self.property_key:
            raise ValueError(
                f"name {self.name!r} gives an empty property key; set `key` explicitly"
            )
        has_query = self.source is not None or self.query is not None
        if has_query and self.file is not None:
            raise ValueError("give either `source` + `query` or `file`, not both")
        if not has_query and self.file is None:
            raise ValueError("needs `source` + `query` or `file`")
        if has_query and (self.source is None or self.query is None):
            raise ValueError("`source` and `query` go together")
        if self.format is not None and self.file is None:
            raise ValueError("`format` applies to a `file` only")
        if self.file is not None and self.format is None and self.file_format is None:
            raise ValueError(
                f"file {self.file.name!r}: set `format` to csv, jsonl or engage (only .csv, "
                ".jsonl and .ndjson files are recognised by their suffix)"
            )
        if self.schedule is not None and self.every is not None:
            raise ValueError("give either `schedule` (cron) or `every` (interval), not both")
        if self.every is not None:
            try:
                seconds = parse_duration(self.every)
            except ValueError as exc:
                raise ValueError(f"every {exc}") from None
            if seconds is None:
                raise ValueError(f"every {self.every!r} is not an interval like 30s, 15m, 2h or 1d")
            if seconds < 1:
                raise ValueError(f"every {self.every!r} must be at least 1s")
        if self.schedule is not None:
            try:
                parse_crontab(self.schedule)
            except ValueError as exc:
                raise ValueError(
                    f"schedule {self.schedule!r} is not a cron expression: {exc}"
                ) from None
        return self


class AudienceConfig(_Computation):
    """One audience: where its members come from and which Gist property it drives."""

    entered_event: str = Field("Audience Entered", min_length=1)
    exited_event: str = Field("Audience Exited", min_length=1)


class TraitConfig(_Computation):
    """One computed trait: a value per user, sent as a Gist property when it changes."""

    type: Literal["int", "float", "bool", "string"] | None = None  # for CSV values
    on_missing: Literal["null", "keep"] = "null"
    event: str = Field("Trait Computed", min_length=1)

    @property
    def is_trait(self) -> bool:
        return True


Computation = AudienceConfig | TraitConfig


class Settings(_Frozen):
    """The whole validated configuration; ``path`` is the file it came from."""

    path: Path
    state: StateConfig = StateConfig()
    gist: GistConfig
    daemon: DaemonConfig = DaemonConfig()
    alerts: AlertsConfig = AlertsConfig()
    sources: dict[str, SourceConfig] = {}
    audiences: list[AudienceConfig] = []
    traits: list[TraitConfig] = []

    @property
    def computations(self) -> list[Computation]:
        """Every audience and computed trait, in config order (audiences first)."""
        return [*self.audiences, *self.traits]

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.gist.timeout_seconds * 2 > self.state.lease_seconds:
            raise ValueError(
                f"gist.timeout_seconds ({self.gist.timeout_seconds:g}) must be at most half of "
                f"state.lease_seconds ({self.state.lease_seconds:g}): a request may only leave "
                "while the audience's lease certainly outlasts it; raise state.lease_seconds "
                f"to {self.gist.timeout_seconds * 2:g} or lower the timeout"
            )
        if not self.computations:
            raise ValueError("configure at least one [[audiences]] or [[traits]] entry")
        if STATE_SOURCE in self.sources:
            raise ValueError(
                f"[sources.{STATE_SOURCE}]: the name {STATE_SOURCE!r} is reserved for the state "
                'database itself (`source = "state"`); give this source another name'
            )
        for audience in self.computations:
            if audience.source not in (None, STATE_SOURCE, *self.sources):
                known = ", ".join(sorted(self.sources)) or "none"
                raise ValueError(
                    f"audience {audience.name!r}: source {audience.source!r} is not defined "
                    f"under [sources] (defined: {known}; `state` is the state database)"
                )
            # A missing `file` is not checked here: it fails that audience's run only.
        try:
            check_unique_keys((a.name, a.property_key) for a in self.computations)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def audience(self, key: str) -> Computation:
        """The configured audience or computed trait with property key ``key``."""
        for audience in self.computations:
            if audience.property_key == key:
                return audience
        known = ", ".join(a.property_key for a in self.computations)
        raise ConfigError(f"{self.path}: no audience with key {key!r} (configured: {known})")


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    """``--config`` beats ``$AUDIENCE_SYNC_CONFIG`` beats ``./audience_sync.toml``."""
    return Path(cli_path or environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_settings(
    path: Path, environ: Mapping[str, str] | None = None, *, gist: bool = True
) -> Settings:
    """Read, interpolate and validate the config file; errors name the file and key.

    ``gist=False`` is for commands that never call Gist: ``gist.api_key`` (and the
    environment variable it names) is then not needed, and never read.
    """
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is not TOML
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if gist:
        _warn_of_a_written_key(raw, path)
    if not gist and isinstance(raw.get("gist", {}), dict):
        raw["gist"] = {**raw.get("gist", {}), "api_key": UNUSED_KEY}
    data = _interpolate(raw, env, path, "")
    if gist:
        _check_api_key(raw, data, path)
    base = path.resolve().parent
    _resolve_paths(data, base, path)
    try:
        return Settings.model_validate({**data, "path": path})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, data)) from None


_warned_written_key: set[Path] = set()


def _warn_of_a_written_key(raw: dict[str, Any], path: Path) -> None:
    """A key written into the file travels with it (backups, version control): said once
    per file, as docs/configuration.md asks for ``${GIST_API_KEY}``."""
    section = raw.get("gist")
    key = section.get("api_key") if isinstance(section, dict) else None
    if not isinstance(key, str) or not key or path in _warned_written_key:
        return
    if not any(match.group(1) for match in _ENV_REF.finditer(key)):
        _warned_written_key.add(path)
        log.warning(
            '%s: gist.api_key is written in the file; set api_key = "${GIST_API_KEY}" and '
            "export the key instead, so it stays out of backups and version control",
            path,
        )


# Query parameters that carry credentials in database URLs (libpq's password/sslpassword,
# MySQL drivers' passwd/pwd, tokens of cloud warehouses' drivers).
SECRET_PARAMETERS = frozenset(
    {
        "password", "passwd", "pwd", "pass", "sslpassword", "secret", "client_secret",
        "token", "access_token", "auth_token", "api_key", "apikey", "private_key",
        "private_key_passphrase", "credentials", "credentials_base64",
    }
)  # fmt: skip


def redact_url(url: str) -> str:
    """The URL with its password and every credential-carrying query parameter replaced by
    ``***``, for display."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable URL>"
    hidden = {name: "***" for name in parsed.query if name.lower() in SECRET_PARAMETERS}
    shown = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
    return shown.replace("%2A%2A%2A", "***")  # the query's *** comes back URL-encoded


def url_secrets(url: str) -> list[str]:
    """The secret values a URL carries (its password, credential query parameters), so an
    error message that echoes one can be scrubbed."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return []
    values: list[str] = [parsed.password] if parsed.password else []
    for name, value in parsed.query.items():
        if name.lower() in SECRET_PARAMETERS:
            values += [value] if isinstance(value, str) else list(value)
    return [v for v in values if v]


def scrub(text: str, url: str) -> str:
    """``text`` with every secret of ``url`` (and the raw URL itself) replaced by ``***``."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _interpolate(value: Any, env: Mapping[str, str], path: Path, where: str) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:  # `$$`
                return "$"
            if name not in env:
                raise ConfigError(f"{path}: {where}: environment variable ${{{name}}} is not set")
            return env[name]

        return _ENV_REF.sub(replace, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, path, f"{where}.{k}" if where else k) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, path, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _check_api_key(raw: dict[str, Any], data: dict[str, Any], path: Path) -> None:
    """Refuse a ``gist.api_key`` that cannot be one: empty, or holding white space or a
    character a header cannot carry (a trailing newline from ``$(cat key.txt)``, say), naming
    where it came from but never the key. Sent as it is, such a key was retried as if Gist
    were down, or turned up in an error message, header and all."""
    given = raw.get("gist", {}).get("api_key") if isinstance(raw.get("gist"), dict) else None
    key = data.get("gist", {}).get("api_key") if isinstance(data.get("gist"), dict) else None
    if not isinstance(key, str) or not isinstance(given, str):
        return  # missing or not text: the model's own validation says so
    names = [m.group(1) for m in _ENV_REF.finditer(given) if m.group(1)]
    origin = f" (from ${{{names[0]}}})" if len(names) == 1 else ""
    if not key.strip():
        raise ConfigError(f"{path}: gist.api_key{origin} is empty")
    if not _API_KEY.fullmatch(key):
        raise ConfigError(
            f"{path}: gist.api_key{origin} holds white space or a character that is not "
            "printable ASCII (a trailing newline?); a Gist API key is one token"
        )


# A key as an HTTP header carries it: visible ASCII, no space.
_API_KEY = re.compile(r"[\x21-\x7e]+")


def _resolve_paths(data: dict[str, Any], base: Path, path: Path) -> None:
    """Make relative SQLite paths and audience files relative to the config file's folder."""
    state = data.setdefault("state", {})
    if isinstance(state, dict):
        # The default SQLite file, too, lives beside the config file, not the working folder.
        url = state.get("url", StateConfig.model_fields["url"].default)
        if isinstance(url, str):
            state["url"] = _absolute_sqlite(url, base, path, "state.url")
    sources = data.get("sources")
    if isinstance(sources, dict):
        for name, source in sources.items():
            if isinstance(source, dict) and isinstance(source.get("url"), str):
                source["url"] = _absolute_sqlite(source["url"], base, path, f"sources.{name}.url")
    for section in ("audiences", "traits"):
        entries = data.get(section)
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    entry["file"] = str(base / entry["file"])
    daemon = data.get("daemon")
    if isinstance(daemon, dict) and isinstance(daemon.get("heartbeat_file"), str):
        daemon["heartbeat_file"] = str(base / daemon["heartbeat_file"])


def _absolute_sqlite(url: str, base: Path, path: Path, where: str) -> str:
    try:
        parsed: URL = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"{path}: {where}: {redact_url(url)!r} is not a SQLAlchemy URL") from None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    if database.startswith("file:") and parsed.query.get("uri") == "true":
        # A SQLite URI filename: `file:relative.db` is relative, `file:/abs`, `file://…`,
        # `file::memory:` and in-memory modes are not paths to resolve.
        name = database.removeprefix("file:")
        if not name or name.startswith(("/", ":")) or parsed.query.get("mode") == "memory":
            return url
        resolved = parsed.set(database=f"file:{base / name}")
        return resolved.render_as_string(hide_password=False)
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str(base / database)).render_as_string(hide_password=False)


def _describe(exc: ValidationError, path: Path, data: dict[str, Any]) -> str:
    lines = []
    for error in exc.errors():
        loc = list(error["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] in ("audiences", "traits") and isinstance(loc[1], int):
            entries = data.get(str(loc[0])) or []
            entry = entries[loc[1]] if loc[1] < len(entries) else None
            # An entry may be anything TOML allows (`audiences = ["vip"]`), not only a table.
            name = entry.get("name") if isinstance(entry, dict) else None
            where = f"{loc[0]}[{loc[1]}]" + (f" ({name!r})" if name else "")
            loc = loc[2:]
        rest = ".".join(str(part) for part in loc)
        where = ".".join(part for part in (where, rest) if part) or "config"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{path}: {where}: {message}")
    return "\n".join(lines)
