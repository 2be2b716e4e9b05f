"""audience-sync as an Airflow task: one sync of every configured audience each hour.

For Airflow 3.2 and later (tested with 3.3.2), with audience-sync installed in the workers'
environment: Airflow 2.10 to 2.11 and 3.0 pin SQLAlchemy below 2, which audience-sync needs,
so the two cannot share an environment there (3.1 installs beside it but is untested); use
``airflow_separate_env.py`` instead. Neither
depends on the other. Copy this file into your DAGs folder; ``AUDIENCE_SYNC_CONFIG`` (or
``CONFIG`` below) names the config, and the Gist API key comes from the Airflow connection
``gist`` (its password), handed to the config's ``${GIST_API_KEY}``.

What the task does with the results:
- every audience succeeded → the task succeeds and returns each one's counts (an XCom);
- an audience is held by another worker (a daemon, or an earlier try still running) → a
  warning names it and its holder and the task still succeeds with the others' results;
  only when every audience was held is the task skipped (nothing was synced here);
- an audience failed, was partly delivered or stopped by the mass-exit guard → the results
  are kept as the XCom ``results`` and the task fails. Airflow retries it only when a retry
  can mend it (Gist unavailable, the state database down, a stopped run): a retry sends
  exactly what is still owed. A refused key, a bad config or source, changes Gist refused
  or the mass-exit guard fail at once: a retry would only meet them again.
- a task stopped from Airflow (marked failed or success, its run cancelled) stops the sync
  gracefully (``on_kill``): requests in flight finish and are recorded. One past its
  ``execution_timeout`` is cut short; either way nothing is lost (what Gist did not
  acknowledge is sent by the next run).

``python airflow_dag.py`` runs it once with ``dag.test()``.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseHook, BaseOperator, dag
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

CONFIG = os.environ.get("AUDIENCE_SYNC_CONFIG", "/etc/audience-sync/audience_sync.toml")
GIST_CONNECTION = "gist"


class AudienceSyncOperator(BaseOperator):
    """Sync the audiences ``keys`` (every configured one when empty) once."""

    def __init__(self, *, config: str = CONFIG, keys: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.keys = keys
        self.stop: threading.Event | None = None

    def execute(self, context: Any) -> list[dict[str, Any]]:
        import audience_sync  # imported in the task, so the scheduler never needs it

        api_key = BaseHook.get_connection(GIST_CONNECTION).password or ""
        environ = {**os.environ, "GIST_API_KEY": api_key}
        self.stop = threading.Event()
        try:
            results = audience_sync.run(self.config, self.keys, stop=self.stop, environ=environ)
        except Exception as exc:  # the config or the state database: nothing was synced
            kind = audience_sync.failure_kind(exc)
            if audience_sync.is_retriable(kind):
                raise AirflowException(f"audience-sync ({kind}): {exc}") from exc
            raise AirflowFailException(f"audience-sync ({kind}): {exc}") from exc
        summary = [summarize(r) for r in results]
        for r in results:
            if r.status == "skipped":
                self.log.warning("%s: not synced: %s", r.audience_key, r.error)
        failed = [r for r in results if r.failure is not None]
        if failed:
            context["ti"].xcom_push(key="results", value=summary)
            message = "; ".join(f"{r.audience_key}: {r.status} ({r.failure}): {r.error}"
                                for r in failed)  # fmt: skip
            if any(audience_sync.is_retriable(r.failure) for r in failed):
                raise AirflowException(message)
            raise AirflowFailException(message)
        if all(r.status == "skipped" for r in results):
            raise AirflowSkipException("; ".join(str(r.error) for r in results))
        return summary  # `audience-sync show RUN_ID` has each run's details

    def on_kill(self) -> None:
        if self.stop is not None:
            self.stop.set()


def summarize(r: Any) -> dict[str, Any]:
    """One audience's result as a JSON-able dict."""
    return {
        "audience": r.audience_key, "status": r.status, "failure": r.failure,
        "entered": r.entered, "exited": r.exited, "delivered": r.delivered,
        "failed": r.failed, "rejected": r.rejected, "run_id": r.run_id, "error": r.error,
    }  # fmt: skip


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 12, 1, tzinfo=UTC),
    catchup=False,  # a sync always sends the current membership: missed hours need no replay
    max_active_runs=1,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=5),
        # Past this the task is stopped (gracefully, see on_kill) and retried.
        "execution_timeout": timedelta(minutes=50),
    },
)
def audience_sync_hourly() -> None:
    AudienceSyncOperator(task_id="sync")


audience_sync_dag = audience_sync_hourly()

if __name__ == "__main__":
    audience_sync_dag.test()
