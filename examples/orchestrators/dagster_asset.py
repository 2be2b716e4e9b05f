"""audience-sync as a Dagster asset: Gist's audience properties, materialised hourly after
the warehouse table that computes the audiences.

Load it with ``dagster dev -f dagster_asset.py`` where both dagster and audience-sync are
installed (neither depends on the other). ``GIST_API_KEY`` comes from the environment.

A failed, partial or guarded audience fails the materialisation (Dagster's retry policy
then retries it, and a retry sends exactly what is still owed); an audience another worker
holds is reported in the metadata, not as a failure.
"""

from __future__ import annotations

import dagster as dg

import audience_sync

CONFIG = "/etc/audience-sync/audience_sync.toml"


@dg.asset(
    deps=["audience_members"],  # the warehouse table or view the audiences' queries read
    retry_policy=dg.RetryPolicy(max_retries=3, delay=300),
    description="Gist contact properties in step with audience membership",
)
def gist_audience_properties(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    results = audience_sync.run(CONFIG)
    for r in results:
        context.log.info(
            f"{r.audience_key}: {r.status}, +{r.entered} -{r.exited}, "
            f"{r.delivered} delivered, {r.failed} failed (run {r.run_id})"
        )
    if audience_sync.exit_code(results) == 1:
        failing = [
            f"{r.audience_key}: {r.status} ({r.error})"
            for r in results
            if r.status not in ("succeeded", "skipped")
        ]
        raise dg.Failure(description="; ".join(failing))
    return dg.MaterializeResult(
        metadata={
            "delivered": sum(r.delivered for r in results),
            "entered": sum(r.entered for r in results),
            "exited": sum(r.exited for r in results),
            "skipped (held by another worker)": [
                r.audience_key for r in results if r.status == "skipped"
            ],
        }
    )


hourly = dg.ScheduleDefinition(
    name="gist_audiences_hourly",
    target=dg.AssetSelection.assets(gist_audience_properties),
    cron_schedule="0 * * * *",
)

defs = dg.Definitions(assets=[gist_audience_properties], schedules=[hourly])
