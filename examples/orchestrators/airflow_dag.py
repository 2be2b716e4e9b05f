"""audience-sync as an Airflow task: one sync of every configured audience each hour.

Copy into your DAGs folder on a worker where audience-sync is installed (it is not an
Airflow dependency, nor is Airflow one of audience-sync's). Secrets come from the worker's
environment (``GIST_API_KEY``) as the config's ``${GIST_API_KEY}`` says.

What the task does with the result:
- every audience succeeded → the task succeeds;
- an audience failed, was partly delivered or stopped by the mass-exit guard → the task
  fails, so Airflow retries it: a retry sends exactly what is still owed;
- another worker (a daemon, or a previous try still running) holds an audience → the task is
  skipped, not failed: that worker is syncing it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.decorators import dag, task
from airflow.exceptions import AirflowException, AirflowSkipException

CONFIG = "/etc/audience-sync/audience_sync.toml"


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 12, 1),
    catchup=False,  # a sync always sends the current membership: missed hours need no replay
    max_active_runs=1,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
)
def audience_sync_hourly() -> None:
    @task
    def sync() -> list[dict[str, object]]:
        import audience_sync  # imported in the task, so the scheduler never needs it

        results = audience_sync.run(CONFIG)
        summary = [
            {"audience": r.audience_key, "status": r.status, "entered": r.entered,
             "exited": r.exited, "delivered": r.delivered, "failed": r.failed,
             "run_id": r.run_id, "error": r.error}
            for r in results
        ]  # fmt: skip
        code = audience_sync.exit_code(results)
        if code == 1:
            raise AirflowException(f"audience-sync: {summary}")
        if code == 3:
            raise AirflowSkipException("another worker is syncing these audiences")
        return summary  # an XCom: `audience-sync show RUN_ID` has the details

    sync()


audience_sync_hourly()
