"""audience-sync as Dagster assets: one asset per configured audience (its Gist property),
materialised hourly after the warehouse table the audiences read.

Install dagster (1.13; tested with 1.13.29) and audience-sync in one environment, point
``AUDIENCE_SYNC_CONFIG`` at the config and load it with ``dagster dev -f dagster_asset.py``.
The assets are read from the config when the definitions load (``audience_sync.audiences``:
no Gist key or state database needed then); ``GIST_API_KEY`` reaches the sync through the
resource as a ``dg.EnvVar``, so Dagster never shows it.

What a materialisation does with each audience's result:
- succeeded: the asset is materialised with the run's counts, and its ``no_rejected_rows``
  check warns when source rows were rejected (`audience-sync show RUN_ID` lists them);
- held by another worker (a daemon, or an earlier run still going): not materialised, a
  warning in the event log names the audience and the holder;
- failed, partial or guarded: not materialised; once the others are recorded the step
  fails, naming each with its failure kind. Dagster retries it (a retry sends exactly what
  is still owed) only when a retry can mend it (Gist unavailable, the state database down,
  a stopped run); a refused key, a bad config or source, refused changes or the mass-exit
  guard fail at once.

The tool's log lines go to Dagster's event log through ``context.log`` while it runs (or
list ``audience_sync`` under ``python_logs: managed_python_loggers`` in dagster.yaml).
"""

# No `from __future__ import annotations` here: Dagster reads the `context` annotation at
# definition time and rejects it as a string.

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

import audience_sync

CONFIG = os.environ.get("AUDIENCE_SYNC_CONFIG", "/etc/audience-sync/audience_sync.toml")
AUDIENCES = audience_sync.audiences(CONFIG)  # property key → name, in config order
CHECK = "no_rejected_rows"


class AudienceSync(dg.ConfigurableResource):
    """Where the config is, and the Gist API key its ``${GIST_API_KEY}`` reads."""

    config: str
    gist_api_key: str

    def run(self, keys: list[str]) -> list[audience_sync.RunResult]:
        environ = {**os.environ, "GIST_API_KEY": self.gist_api_key}
        return audience_sync.run(self.config, keys, environ=environ)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            key,
            description=f"Gist contact property for the audience {name!r}",
            deps=["audience_members"],  # the warehouse table or view the queries read
            group_name="gist",
            kinds={"gist"},
            skippable=True,  # a held audience is not materialised
        )
        for key, name in AUDIENCES.items()
    ],
    check_specs=[
        dg.AssetCheckSpec(CHECK, asset=key, description="the source had no rejected rows")
        for key in AUDIENCES
    ],
    can_subset=True,
    retry_policy=dg.RetryPolicy(max_retries=3, delay=300),
)
def gist_audiences(
    context: dg.AssetExecutionContext, audience_sync_resource: AudienceSync
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    keys = [key.to_user_string() for key in context.selected_asset_keys]
    checks = {key.asset_key.to_user_string() for key in context.selected_asset_check_keys}
    try:
        with logs_to(context):
            results = audience_sync_resource.run(keys)
    except Exception as exc:  # the config or the state database: nothing was synced
        kind = audience_sync.failure_kind(exc)
        raise dg.Failure(
            description=f"audience-sync ({kind}): {exc}",
            allow_retries=audience_sync.is_retriable(kind),
        ) from exc
    for r in results:
        if r.status == "skipped":
            context.log.warning(f"{r.audience_key}: not synced: {r.error}")
            continue
        if r.status == "succeeded":
            yield dg.MaterializeResult(asset_key=r.audience_key, metadata=counts(r))
        if r.audience_key in checks and r.run_id is not None:
            yield dg.AssetCheckResult(
                asset_key=r.audience_key,
                check_name=CHECK,
                passed=r.rejected == 0,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"rejected": r.rejected, "run_id": r.run_id},
            )
    failed = [r for r in results if r.failure is not None]
    if failed:
        raise dg.Failure(
            description="; ".join(
                f"{r.audience_key}: {r.status} ({r.failure}): {r.error}" for r in failed
            ),
            metadata={r.audience_key: dg.MetadataValue.json(counts(r)) for r in failed},
            # A retry sends what is owed; it is only worth it when it can mend something.
            allow_retries=any(audience_sync.is_retriable(r.failure) for r in failed),
        )


def counts(r: audience_sync.RunResult) -> dict[str, str | int | bool]:
    """The run's result as asset metadata (`audience-sync show RUN_ID` has the details)."""
    fields: dict[str, str | int | bool] = {
        "status": r.status,
        "members": r.members,
        "entered": r.entered,
        "exited": r.exited,
        "delivered": r.delivered,
        "failed": r.failed,
        "rejected": r.rejected,
        "fast_path": r.fast_path,
    }
    if r.run_id is not None:
        fields["run_id"] = r.run_id
    if r.failure is not None:
        fields["failure"] = r.failure
    if r.error is not None:
        fields["error"] = r.error
    return fields


@contextmanager
def logs_to(context: dg.AssetExecutionContext) -> Iterator[None]:
    """Send the tool's log lines (INFO and up) to the run's event log while it syncs."""
    logger = logging.getLogger("audience_sync")
    handler = _EventLog(context)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _EventLog(logging.Handler):
    def __init__(self, context: dg.AssetExecutionContext) -> None:
        super().__init__(logging.INFO)
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        self.context.log.log(record.levelno, record.getMessage())


hourly = dg.ScheduleDefinition(
    name="gist_audiences_hourly",
    target=dg.AssetSelection.assets(gist_audiences),
    cron_schedule="0 * * * *",
)

defs = dg.Definitions(
    assets=[gist_audiences],
    schedules=[hourly],
    resources={
        "audience_sync_resource": AudienceSync(
            config=CONFIG, gist_api_key=dg.EnvVar("GIST_API_KEY")
        )
    },
)
