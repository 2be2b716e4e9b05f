"""audience-sync from Airflow, installed in an environment of its own: one sync of every
configured audience each hour.

For any Airflow whose environment cannot hold audience-sync: Airflow 2.10 to 2.11 and 3.0
pin SQLAlchemy below 2, which audience-sync needs (pip reports ResolutionImpossible). The
task runs the ``audience-sync`` command of a virtualenv made for it on every worker::

    python3.11 -m venv /opt/audience-sync
    /opt/audience-sync/bin/pip install audience-sync   # plus [postgres] for PostgreSQL

Tested with Airflow 3.3.2 (the imports fall back to Airflow 2's names). Copy this file into
your DAGs folder; ``AUDIENCE_SYNC_CONFIG`` names the config, ``AUDIENCE_SYNC_EXECUTABLE``
the command, and the Gist API key comes from the Airflow connection ``gist`` (its password)
as ``GIST_API_KEY``.

The operator reads ``audience-sync run --json`` and treats each audience as
``airflow_dag.py`` does: held audiences named in a warning (the task is skipped only when
every one was held), a failure retried only when a retry can mend it (exit 1 and a failure
kind of ``unavailable``, ``state`` or ``interrupted``), and at once otherwise: a refused
key, a source or changes Gist refused, the mass-exit guard, and exit 2 (the config, or a
state database it cannot use: the command does not tell the two apart; the next scheduled
run tries again). A plain ``BashOperator`` with ``skip_on_exit_code=3`` works too, but it
retries every other non-zero exit: a wrong key would be retried for 15 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timedelta, timezone
from typing import Any

try:  # Airflow 3
    from airflow.sdk import BaseHook, BaseOperator, dag
except ImportError:  # Airflow 2
    from airflow.decorators import dag
    from airflow.hooks.base import BaseHook
    from airflow.models import BaseOperator
try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
except ImportError:  # Airflow 2 (and 3 before the SDK had them)
    from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException

CONFIG = os.environ.get("AUDIENCE_SYNC_CONFIG", "/etc/audience-sync/audience_sync.toml")
EXECUTABLE = os.environ.get("AUDIENCE_SYNC_EXECUTABLE", "/opt/audience-sync/bin/audience-sync")
GIST_CONNECTION = "gist"
# audience_sync.RETRIABLE_FAILURES (the package is not importable here).
RETRIABLE = frozenset({"unavailable", "state", "interrupted"})
EXIT_CONFIG = 2  # usage, config or state-database error: nothing was synced
STOP_SECONDS = 60  # how long a stopped sync may take to record what it sent


class AudienceSyncCommandOperator(BaseOperator):
    """Run ``audience-sync run`` for the audiences ``keys`` (every configured one when empty)."""

    def __init__(
        self,
        *,
        config: str = CONFIG,
        keys: tuple[str, ...] = (),
        executable: str = EXECUTABLE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.keys = keys
        self.executable = executable
        self.process: subprocess.Popen[str] | None = None

    def execute(self, context: Any) -> list[dict[str, Any]]:
        api_key = BaseHook.get_connection(GIST_CONNECTION).password or ""
        command = [self.executable, "run", "--json", "--config", self.config]
        for key in self.keys:
            command += ["--audience", key]
        # stderr (the tool's log lines and errors) goes to the task log as it comes.
        self.process = subprocess.Popen(  # noqa: S603 - our own command, no shell
            command,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "GIST_API_KEY": api_key},
        )
        try:
            out, _ = self.process.communicate()
        except BaseException:  # a timeout: let the sync record what it sent, then go
            self.on_kill()
            raise
        code = self.process.returncode
        if code == EXIT_CONFIG:
            raise AirflowFailException(f"audience-sync exited {code}: see the log above")
        try:
            results: list[dict[str, Any]] = json.loads(out)
        except ValueError:
            raise AirflowException(f"audience-sync exited {code} without results") from None
        summary = [{k: r.get(k) for k in SUMMARY} for r in results]
        for r in results:
            if r["status"] == "skipped":
                self.log.warning("%s: not synced: %s", r["audience"], r["error"])
        failed = [r for r in results if r.get("failure")]
        if failed:
            context["ti"].xcom_push(key="results", value=summary)
            message = "; ".join(
                f"{r['audience']}: {r['status']} ({r['failure']}): {r['error']}" for r in failed
            )
            if any(r["failure"] in RETRIABLE for r in failed):
                raise AirflowException(message)
            raise AirflowFailException(message)
        if code != 0 and code != 3:
            raise AirflowException(f"audience-sync exited {code}")
        if all(r["status"] == "skipped" for r in results):
            raise AirflowSkipException("; ".join(str(r["error"]) for r in results))
        return summary  # `audience-sync show RUN_ID` has each run's details

    def on_kill(self) -> None:
        """Stop the sync as SIGTERM does: requests in flight finish and are recorded."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()


SUMMARY = (
    "audience", "status", "failure", "entered", "exited", "delivered", "failed", "rejected",
    "run_id", "error",
)  # fmt: skip


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 12, 1, tzinfo=timezone.utc),  # noqa: UP017 - Python < 3.11
    catchup=False,  # a sync always sends the current membership: missed hours need no replay
    max_active_runs=1,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=5),
        "execution_timeout": timedelta(minutes=50),
    },
)
def audience_sync_hourly_separate_env() -> None:
    AudienceSyncCommandOperator(task_id="sync")


audience_sync_dag = audience_sync_hourly_separate_env()

if __name__ == "__main__":
    audience_sync_dag.test()
