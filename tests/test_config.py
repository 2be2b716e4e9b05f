"""Tests for loading, interpolating and validating the TOML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from audience_sync.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    Settings,
    load_settings,
    parse_duration,
    redact_url,
    resolve_config_path,
)
from audience_sync.errors import ConfigError

ENV = {"GIST_KEY": "gist-SECRET-key"}
GIST = '[gist]\napi_key = "${GIST_KEY}"\n'
FILE_AUDIENCE = '[[audiences]]\nname = "Newsletter Signups"\nfile = "members.jsonl"\n'


def _write(folder: Path, text: str, name: str = "audience_sync.toml") -> Path:
    """Write ``text`` as a config in ``folder`` next to an empty ``members.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "members.jsonl").write_text("")
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, ENV if env is None else env)
    return str(info.value)


def test_valid_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    path = _write(
        folder,
        """
[state]
url = "sqlite:///state.db"

[gist]
api_key = "${GIST_KEY}"
max_concurrency = 4

[sources.warehouse]
url = "sqlite:///data/warehouse.db"

[sources.pg]
url = "postgresql://sync@db.internal/app"

[[audiences]]
name = "Order Completed Last 30days"
source = "warehouse"
query = "SELECT user_id, email FROM users"
schedule = "0 */2 * * *"

[[audiences]]
name = "Newsletter Signups"
key = "newsletter_v2"
file = "members.jsonl"
mass_exit_threshold = 0.25
""",
    )
    # Relative paths follow the config file, not the working directory.
    monkeypatch.chdir(tmp_path)
    base = folder.resolve()

    settings = load_settings(path, ENV)

    assert settings.path == path
    assert settings.gist.api_key.get_secret_value() == "gist-SECRET-key"
    assert "gist-SECRET-key" not in repr(settings)
    assert settings.gist.max_concurrency == 4
    assert settings.state.url == f"sqlite:///{base / 'state.db'}"
    assert settings.sources["warehouse"].url == f"sqlite:///{base / 'data' / 'warehouse.db'}"
    assert settings.sources["pg"].url == "postgresql://sync@db.internal/app"
    derived, explicit = settings.audiences
    assert derived.property_key == "order_completed_last_30days"
    assert derived.file is None
    assert derived.mass_exit_threshold == 0.5
    assert derived.mass_exit_min_members == 100
    assert explicit.property_key == "newsletter_v2"
    assert explicit.file == base / "members.jsonl"
    assert explicit.mass_exit_threshold == 0.25
    assert explicit.schedule is None
    assert settings.audience("newsletter_v2") is explicit
    assert settings.audience("order_completed_last_30days") is derived


def test_defaults_applied(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, GIST + FILE_AUDIENCE), ENV)

    gist = settings.gist
    assert gist.base_url == "https://api.getgist.com"
    assert gist.requests_per_second == 10.0
    assert gist.max_concurrency == 8
    assert gist.timeout_seconds == 30.0
    assert gist.max_retries == 5
    assert gist.retry_backoff_seconds == 1.0
    assert settings.sources == {}
    assert settings.state.url.startswith("sqlite:///")
    assert settings.state.url.endswith("audience_sync.db")
    assert settings.audiences[0].property_key == "newsletter_signups"


def test_default_state_url_is_relative_to_config_folder(tmp_path: Path) -> None:
    # config.example.toml: "Relative paths are relative to this file" and SQLite is the
    # default state, so leaving out [state] must not put the state in the working directory.
    settings = load_settings(_write(tmp_path / "conf", GIST + FILE_AUDIENCE), ENV)

    assert settings.state.url == f"sqlite:///{(tmp_path / 'conf').resolve() / 'audience_sync.db'}"


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///:memory:", "sqlite:////abs/state.db", "postgresql://u@h/db"],
    ids=["sqlite-no-db", "memory", "absolute", "postgresql"],
)
def test_state_urls_left_alone(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, f'[state]\nurl = "{url}"\n' + GIST + FILE_AUDIENCE)

    assert load_settings(path, ENV).state.url == url


def test_interpolation_reaches_every_string(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[state]
url = "postgresql://sync:${DB_PASSWORD}@${DB_HOST}/state"

[gist]
api_key = "${GIST_KEY}"
base_url = "https://${GIST_HOST}/v1"

[sources.wh]
url = "postgresql://reader:${DB_PASSWORD}@${DB_HOST}/wh"

[[audiences]]
name = "${PREFIX} Buyers"
source = "wh"
query = "SELECT user_id, email FROM t WHERE plan = '${PLAN}' -- ${PLAN}"
""",
    )
    env = {
        **ENV,
        "DB_PASSWORD": "pw",
        "DB_HOST": "db.internal",
        "GIST_HOST": "gist.test",
        "PREFIX": "Gold",
        "PLAN": "pro",
    }

    settings = load_settings(path, env)

    assert settings.state.url == "postgresql://sync:pw@db.internal/state"
    assert settings.gist.base_url == "https://gist.test/v1"
    assert settings.sources["wh"].url == "postgresql://reader:pw@db.internal/wh"
    assert settings.audiences[0].name == "Gold Buyers"
    assert settings.audiences[0].property_key == "gold_buyers"
    assert settings.audiences[0].query == "SELECT user_id, email FROM t WHERE plan = 'pro' -- pro"


def test_interpolation_in_nested_lists(tmp_path: Path) -> None:
    # No setting takes a list yet; what matters is that interpolation walks lists of
    # lists and reports the element's path, before validation rejects the key.
    path = _write(tmp_path, GIST + 'tags = ["${A}", ["x-${B}"]]\n' + FILE_AUDIENCE)

    message = _load_error(path, {**ENV, "A": "a"})

    assert "${B}" in message
    assert "gist.tags[1][0]" in message
    assert str(path) in message


def test_interpolation_without_variables_leaves_dollar_text(tmp_path: Path) -> None:
    path = _write(tmp_path, GIST + '[[audiences]]\nname = "Spent $100+"\nfile = "members.jsonl"\n')

    settings = load_settings(path, ENV)

    assert settings.audiences[0].name == "Spent $100+"
    assert settings.audiences[0].property_key == "spent_100"


def test_missing_variable_names_variable_key_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GIST + FILE_AUDIENCE)

    message = _load_error(path, {})

    assert "${GIST_KEY}" in message
    assert "gist.api_key" in message
    assert str(path) in message


def test_load_settings_defaults_to_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIST_KEY", "from-os-environ")
    settings = load_settings(_write(tmp_path, GIST + FILE_AUDIENCE))

    assert settings.gist.api_key == SecretStr("from-os-environ")


@pytest.mark.parametrize(
    ("cli", "environ", "expected"),
    [
        ("cli.toml", {CONFIG_ENV: "env.toml"}, "cli.toml"),
        (None, {CONFIG_ENV: "env.toml"}, "env.toml"),
        (None, {}, DEFAULT_CONFIG),
        ("", {CONFIG_ENV: "env.toml"}, "env.toml"),
        (None, {CONFIG_ENV: ""}, DEFAULT_CONFIG),
    ],
    ids=["cli-beats-env", "env-beats-default", "default", "empty-cli", "empty-env"],
)
def test_resolve_config_path(cli: str | None, environ: dict[str, str], expected: str) -> None:
    assert resolve_config_path(cli, environ) == Path(expected)


def test_default_config_name() -> None:
    assert DEFAULT_CONFIG == "audience_sync.toml"
    assert CONFIG_ENV == "AUDIENCE_SYNC_CONFIG"


SQL_AUDIENCE = '[sources.wh]\nurl = "sqlite:///wh.db"\n' + (
    '[[audiences]]\nname = "Buyers"\nsource = "wh"\nquery = "SELECT 1"\n'
)

BAD_CONFIGS: list[tuple[str, str, str]] = [
    ("unknown-top-level-key", GIST + FILE_AUDIENCE + "[colour]\nx = 1\n", "colour: unknown key"),
    (
        "unknown-audience-key",
        GIST + FILE_AUDIENCE + "colour = 1\n",
        "audiences[0] ('Newsletter Signups').colour: unknown key",
    ),
    (
        "unknown-gist-key",
        '[gist]\napi_key = "k"\napi_secret = "x"\n' + FILE_AUDIENCE,
        "gist.api_secret: unknown key",
    ),
    (
        "wrong-type",
        GIST + 'max_concurrency = "many"\n' + FILE_AUDIENCE,
        "gist.max_concurrency: Input should be a valid integer",
    ),
    (
        "out-of-range",
        GIST + "max_concurrency = 0\n" + FILE_AUDIENCE,
        "gist.max_concurrency: Input should be greater than or equal to 1",
    ),
    ("missing-gist", FILE_AUDIENCE, "gist: Field required"),
    ("missing-api-key", '[gist]\nbase_url = "https://x"\n' + FILE_AUDIENCE, "gist.api_key: Field"),
    ("no-audiences", GIST, "at least one [[audiences]] or [[traits]]"),
    ("empty-audiences", "audiences = []\n" + GIST, "at least one [[audiences]] or [[traits]]"),
    (
        "query-and-file",
        GIST + SQL_AUDIENCE + 'file = "members.jsonl"\n',
        "audiences[0] ('Buyers'): give either `source` + `query` or `file`, not both",
    ),
    (
        "neither-query-nor-file",
        GIST + '[[audiences]]\nname = "Buyers"\n',
        "audiences[0] ('Buyers'): needs `source` + `query` or `file`",
    ),
    (
        "source-without-query",
        GIST + '[sources.wh]\nurl = "sqlite:///wh.db"\n[[audiences]]\nname = "B"\nsource = "wh"\n',
        "`source` and `query` go together",
    ),
    (
        "query-without-source",
        GIST + '[[audiences]]\nname = "B"\nquery = "SELECT 1"\n',
        "`source` and `query` go together",
    ),
    (
        "undefined-source",
        GIST + '[[audiences]]\nname = "Buyers"\nsource = "nowhere"\nquery = "SELECT 1"\n',
        "audience 'Buyers': source 'nowhere' is not defined under [sources] (defined: none; "
        "`state` is the state database)",
    ),
    (
        "txt-file-without-format",
        GIST + '[[audiences]]\nname = "Buyers"\nfile = "buyers.txt"\n',
        "file 'buyers.txt': set `format` to csv, jsonl or engage",
    ),
    (
        "invalid-cron",
        GIST + SQL_AUDIENCE + 'schedule = "every tuesday"\n',
        "schedule 'every tuesday' is not a cron expression",
    ),
    (
        "invalid-explicit-key",
        GIST + FILE_AUDIENCE + 'key = "Bad-Key"\n',
        "key 'Bad-Key' must match ^[a-z0-9_]+$",
    ),
    (
        "empty-derived-key",
        GIST + '[[audiences]]\nname = "顧客"\nfile = "members.jsonl"\n',
        "gives an empty property key; set `key` explicitly",
    ),
    (
        "empty-name",
        GIST + '[[audiences]]\nname = ""\nfile = "members.jsonl"\n',
        "audiences[0].name: String should have at least 1 character",
    ),
    (
        "colliding-keys",
        GIST
        + FILE_AUDIENCE
        + '[[audiences]]\nname = "newsletterSignups"\nfile = "members.jsonl"\n',
        "audiences 'Newsletter Signups' and 'newsletterSignups' both use the property key",
    ),
    (
        "explicit-key-collides",
        GIST + FILE_AUDIENCE + SQL_AUDIENCE + 'key = "newsletter_signups"\n',
        "audiences 'Newsletter Signups' and 'Buyers' both use the property key",
    ),
    (
        "bad-source-url",
        GIST + '[sources.x]\nurl = "not a url"\n' + FILE_AUDIENCE,
        "sources.x.url: '<unparseable URL>' is not a SQLAlchemy URL",
    ),
    (
        "bad-state-url",
        '[state]\nurl = "not a url"\n' + GIST + FILE_AUDIENCE,
        "state.url: '<unparseable URL>' is not a SQLAlchemy URL",
    ),
    ("invalid-toml", GIST + "[[audiences]\nname = \n", "invalid TOML"),
]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(text, fragment) for _, text, fragment in BAD_CONFIGS],
    ids=[case_id for case_id, _, _ in BAD_CONFIGS],
)
def test_bad_config(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, text)

    message = _load_error(path)

    assert str(path) in message
    assert fragment in message


def test_config_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    message = _load_error(path)

    assert str(path) in message
    assert "config file not found" in message


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[gist]\napi_key = "caf\xe9"\n')

    message = _load_error(path)

    assert str(path) in message
    assert "cannot read config file" in message


@pytest.mark.parametrize(
    ("url", "hidden", "expected"),
    [
        ("postgresql://u:secret@h/db", "secret", "postgresql://u:***@h/db"),
        (
            "postgresql+psycopg://u:p%40ss@h:5432/db",
            "p%40ss",
            "postgresql+psycopg://u:***@h:5432/db",
        ),
        ("sqlite:///x.db", None, "sqlite:///x.db"),
        ("u:secret@h/db", "secret", "<unparseable URL>"),
        ("postgresql://u:secret@h:port/db", "secret", "<unparseable URL>"),
    ],
    ids=["password", "escaped-password", "no-password", "no-scheme", "bad-port"],
)
def test_redact_url(url: str, hidden: str | None, expected: str) -> None:
    shown = redact_url(url)

    assert shown == expected
    if hidden is not None:
        assert hidden not in shown


@pytest.mark.parametrize(
    "url",
    ["u:hunter2@db.internal/app", "postgresql://u:hunter2@db.internal:port/app"],
    ids=["no-scheme", "bad-port"],
)
def test_bad_source_url_error_hides_password(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, GIST + f'[sources.wh]\nurl = "{url}"\n' + FILE_AUDIENCE)

    message = _load_error(path)

    assert str(path) in message
    assert "sources.wh.url" in message
    assert "hunter2" not in message


def test_interpolated_password_not_in_unrelated_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GIST
        + '[sources.wh]\nurl = "postgresql://u:${DB_PASSWORD}@h/db"\n'
        + '[[audiences]]\nname = "B"\nsource = "wh"\nquery = "SELECT 1"\nschedule = "nope"\n',
    )

    message = _load_error(path, {**ENV, "DB_PASSWORD": "hunter2"})

    assert "not a cron expression" in message
    assert "hunter2" not in message
    assert "gist-SECRET-key" not in message


def _two_audience_settings(tmp_path: Path) -> Settings:
    text = GIST + FILE_AUDIENCE + '[[audiences]]\nname = "VIP"\nfile = "members.jsonl"\n'
    return load_settings(_write(tmp_path, text), ENV)


def test_audience_lookup_unknown_key_lists_configured(tmp_path: Path) -> None:
    settings = _two_audience_settings(tmp_path)

    with pytest.raises(ConfigError) as info:
        settings.audience("vips")

    message = str(info.value)
    assert "'vips'" in message
    assert "newsletter_signups, vip" in message
    assert str(settings.path) in message


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = _two_audience_settings(tmp_path)

    with pytest.raises(ValueError, match="frozen"):
        settings.gist.max_retries = 1  # type: ignore[misc]


OUT_OF_BOUNDS: list[tuple[str, str, str]] = [
    (
        "every-overflows",
        GIST + FILE_AUDIENCE + 'every = "9999999d"\n',
        "every '9999999d' is longer than 3650d",
    ),
    ("every-zero", GIST + FILE_AUDIENCE + 'every = "0s"\n', "every '0s' must be at least 1s"),
    (
        "misfire-grace-overflows",
        GIST + "[daemon]\nmisfire_grace_seconds = 1e14\n" + FILE_AUDIENCE,
        "daemon.misfire_grace_seconds: Input should be less than or equal to 604800",
    ),
    (
        "rate-absurd",
        GIST + "requests_per_second = 1e12\n" + FILE_AUDIENCE,
        "gist.requests_per_second: Input should be less than or equal to 10000",
    ),
    (
        "timeout-absurd",
        GIST + "timeout_seconds = 1e300\n" + FILE_AUDIENCE,
        "gist.timeout_seconds: Input should be less than or equal to 3600",
    ),
    (
        "alert-timeout-absurd",
        GIST + "[alerts]\ntimeout_seconds = 1e20\n" + FILE_AUDIENCE,
        "alerts.timeout_seconds: Input should be less than or equal to 300",
    ),
    (
        "min-members-absurd",
        GIST + FILE_AUDIENCE + "mass_exit_min_members = 1e30\n",
        "('Newsletter Signups').mass_exit_min_members: ",
    ),
]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(text, fragment) for _, text, fragment in OUT_OF_BOUNDS],
    ids=[case_id for case_id, _, _ in OUT_OF_BOUNDS],
)
def test_numbers_are_bounded_with_the_key_named(tmp_path: Path, text: str, fragment: str) -> None:
    message = _load_error(_write(tmp_path, text))
    assert fragment in message
    assert str(tmp_path / "audience_sync.toml") in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1w2d", 777600.0),
        ("1h30m", 5400.0),
        ("0d", 0.0),
        (" 90s ", 90.0),
        ("3650d", 315360000.0),
    ],
    ids=["s", "m", "h", "d", "w", "w-d", "h-m", "zero", "spaces", "maximum"],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "1x", "1d1w", "-1d", "1.5h", "soon"], ids=str)
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    "text", ["3651d", "99999999999d", "9" * 400 + "s"], ids=["3651d", "huge", "400-digits"]
)
def test_parse_duration_refuses_what_is_too_long(text: str) -> None:
    with pytest.raises(ValueError, match="longer than 3650d"):
        parse_duration(text)


def test_double_dollar_writes_a_literal_dollar(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GIST + '[[audiences]]\nname = "Pays $${PRICE} or $$5"\nfile = "members.jsonl"\n',
    )
    settings = load_settings(path, {**ENV, "PRICE": "not used"})
    assert settings.audiences[0].name == "Pays ${PRICE} or $5"


def test_relative_sqlite_uri_filenames_are_resolved_against_the_config_folder(
    tmp_path: Path,
) -> None:
    url = "sqlite:///file:state.db?mode=rwc&uri=true"
    path = _write(tmp_path / "conf", f'[state]\nurl = "{url}"\n' + GIST + FILE_AUDIENCE)
    folder = (tmp_path / "conf").resolve()
    resolved = make_url(load_settings(path, ENV).state.url)
    assert resolved.database == f"file:{folder}/state.db"
    assert dict(resolved.query) == {"mode": "rwc", "uri": "true"}
    engine = create_engine(resolved)
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    engine.dispose()
    assert (folder / "state.db").is_file()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///file:/abs/state.db?uri=true",
        "sqlite:///file::memory:?cache=shared&uri=true",
        "sqlite:///file:memdb?mode=memory&cache=shared&uri=true",
    ],
    ids=["absolute", "memory", "memory-mode"],
)
def test_absolute_and_memory_sqlite_uris_are_left_alone(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, f'[state]\nurl = "{url}"\n' + GIST + FILE_AUDIENCE)
    assert load_settings(path, ENV).state.url == url


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "gist.api_key (from ${GIST_KEY}) is empty"),
        ("   ", "gist.api_key (from ${GIST_KEY}) is empty"),
        ("SECRETKEY123\n", "holds white space or a character that is not printable ASCII"),
        (" SECRETKEY123", "holds white space"),
        ("SECRET KEY123", "holds white space"),
        ("SECRETKEY123\t", "holds white space"),
        ("SECRETKÉY123", "not printable ASCII"),
    ],
    ids=["empty", "blank", "trailing-newline", "leading-space", "inner-space", "tab", "non-ascii"],
)
def test_an_api_key_that_cannot_be_one_is_refused_naming_where_it_came_from(
    tmp_path: Path, value: str, fragment: str
) -> None:
    """A key with a trailing newline was retried for 35 s and then shown, header and all,
    in the error and in sync_runs.error; an empty one was retried as if Gist were down."""
    message = _load_error(_write(tmp_path, GIST + FILE_AUDIENCE), {"GIST_KEY": value})
    assert fragment in message
    assert value.strip() not in message or not value.strip()  # never the key itself


def test_an_api_key_written_in_the_file_is_checked_too(tmp_path: Path) -> None:
    message = _load_error(_write(tmp_path, '[gist]\napi_key = "abc def"\n' + FILE_AUDIENCE))
    assert "gist.api_key holds white space" in message
    assert "abc def" not in message


def test_commands_that_never_call_gist_do_not_check_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, GIST + FILE_AUDIENCE)
    assert load_settings(path, {"GIST_KEY": ""}, gist=False) is not None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("hooks.example.com/services/T0KEN", "it must be an http(s) URL"),
        ("htps://hooks.example.com/services/T0KEN", "htps://hooks.example.com/… must be"),
        ("file:///etc/passwd", "file:///… must be"),
        ("https:///services/T0KEN", "https:///… must be"),
    ],
    ids=["no-scheme", "misspelt-scheme", "file", "no-host"],
)
def test_a_webhook_url_that_cannot_work_is_refused(tmp_path: Path, url: str, shown: str) -> None:
    """Accepted before, the alert was then lost with a WARNING."""
    message = _load_error(
        _write(tmp_path, GIST + f'[alerts]\nwebhook_url = "{url}"\n' + FILE_AUDIENCE)
    )
    assert f"alerts.webhook_url: {shown}" in message
    assert "T0KEN" not in message


@pytest.mark.parametrize(("seconds", "ok"), [(10, False), (59, False), (119, False), (120, True)])
def test_a_health_stall_shorter_than_two_heartbeats_is_refused(
    tmp_path: Path, seconds: int, ok: bool
) -> None:
    """Between 10 and 59 s a healthy daemon flapped to 503: its heartbeat ticks every 60 s."""
    path = _write(tmp_path, GIST + f"[daemon]\nhealth_stall_seconds = {seconds}\n" + FILE_AUDIENCE)
    if ok:
        assert load_settings(path, ENV).daemon.health_stall_seconds == seconds
    else:
        assert "daemon.health_stall_seconds: Input should be greater than or equal to 120" in (
            _load_error(path)
        )
