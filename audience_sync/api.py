"""The Python API for orchestrators (Airflow, Dagster, a notebook): one call, one sync.

``run`` is what ``audience-sync run`` does, without the CLI's output: the same engine,
leases, state, alerts and guarantees, returning each audience's ``RunResult``. ``exit_code`` maps
results to the CLI's exit codes (0 all succeeded, 1 any failed/partial/guarded, 3 skipped
because another worker holds the audience). A failing result's ``failure`` (and
``failure_kind(exc)`` of an exception ``run`` raised) says whether a retry can mend it
(``is_retriable``): a scheduler retries ``unavailable``, ``state`` and ``interrupted`` and fails
at once on the rest. ``audiences`` lists the configured keys, for a scheduler that gives each
audience its own asset or task.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from audience_sync import db
from audience_sync.alerts import post_alert, select_alerts
from audience_sync.config import load_settings, resolve_config_path
from audience_sync.errors import is_retriable
from audience_sync.runs import RunResult, exit_code, failure_kind
from audience_sync.statuses import Mode
from audience_sync.sync import run_once

__all__ = ["RunResult", "audiences", "exit_code", "failure_kind", "is_retriable", "run"]


def run(
    config: str | Path | None = None,
    audiences: str | Sequence[str] = (),
    *,
    mode: Mode = "run",
    dry_run: bool = False,
    allow_mass_exit: bool = False,
    stop: threading.Event | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[RunResult]:
    """Sync the audiences with these property keys (one key as a string, or several; every
    configured one when empty) once.

    ``config`` is found as the CLI finds it (this argument, else ``$AUDIENCE_SYNC_CONFIG``,
    else ``./audience_sync.toml``) and ``${VAR}`` in it are read from ``environ`` (default:
    the process's environment). The state database is created or migrated as ``run``
    does. ``mode`` is ``run``, ``backfill`` or ``retire``; setting ``stop`` ends the sync
    gracefully (what was sent is recorded; the next run sends the rest).

    A bad config raises ``ConfigError``, an unreachable or outdated state database
    ``StateError``; ``mode="retire"`` without keys raises ``ValueError`` and keys that are
    not strings ``TypeError``. What happened to each audience is in its result's
    ``status`` and, when it failed, ``failure`` (never an exception: one audience failing
    does not stop the others).
    """
    env = os.environ if environ is None else environ
    path = resolve_config_path(str(config) if config is not None else None, env)
    settings = load_settings(path, env)
    with db.open_state(settings) as engine:
        results = run_once(
            settings,
            engine,
            audiences,
            mode=mode,
            dry_run=dry_run,
            allow_mass_exit=allow_mass_exit,
            stop=stop,
        )
        # Decided from sync_runs as `run` does, so a failure the API met is alerted once,
        # and the next run, whoever starts it, knows the streak began here.
        alerts = [] if dry_run else select_alerts(settings.alerts, results, engine)
    post_alert(settings.alerts, alerts)
    return results


def audiences(
    config: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The configured audiences and computed traits, property key → name, in config order.

    The config is found and read as ``run`` reads it, but neither the state database nor
    Gist is touched, and the Gist API key is not needed (a scheduler loading its
    definitions may not have it). A bad config raises ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    path = resolve_config_path(str(config) if config is not None else None, env)
    settings = load_settings(path, env, gist=False)
    return {a.property_key: a.name for a in settings.computations}
