"""Prometheus metrics for runs and Gist requests, as a textfile or served on /metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    write_to_textfile,
)

from audience_sync.httpserver import BackgroundServer, JoiningHTTPServer
from audience_sync.statuses import DRY_RUN_KINDS
from audience_sync.sync import RunResult

__all__ = ["REQUEST_BUCKETS", "HealthCheck", "Metrics", "MetricsServer"]

log = logging.getLogger(__name__)

# From a fast loopback answer to the 30 s default Gist timeout.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
"""Says whether the process is healthy, with details shown as JSON on /healthz."""


class Metrics:
    """The audience-sync metrics, in their own registry (never the process-global one)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self.runs = Counter(
            "audience_sync_runs_total",
            "Runs of one audience, by how they ended (skipped: another process held the lease).",
            ["audience", "status"],
            registry=self.registry,
        )
        self.changes = Counter(
            "audience_sync_changes_total",
            "Membership changes delivered to or refused by Gist, and source rows rejected.",
            ["audience", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "audience_sync_gist_request_seconds",
            "Time taken by one Gist request, answered or not.",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "audience_sync_gist_responses_total",
            'Gist requests by HTTP status ("none" when no answer came).',
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "audience_sync_last_success_timestamp_seconds",
            "Unix time at which a run of the audience last succeeded.",
            ["audience"],
            registry=self.registry,
        )
        self.source_rows = Counter(
            "audience_sync_source_rows_total",
            "Source rows read, by where they were checked: python (read into the process) or "
            "database (warehouse-native: staged inside the state database).",
            ["audience", "path"],
            registry=self.registry,
        )
        self.members = Gauge(
            "audience_sync_members",
            "Members of the audience in the source, as last read.",
            ["audience"],
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, status: int | None, seconds: float) -> None:
        """Record one Gist request; matches ``gist.RequestObserver``."""
        self.request_seconds.labels(endpoint).observe(seconds)
        self.responses.labels(endpoint, "none" if status is None else str(status)).inc()

    def record_results(self, results: Sequence[RunResult]) -> None:
        """Count the runs and their changes, and update the per-audience gauges."""
        for result in results:
            audience = result.audience_key
            self.runs.labels(audience, result.status).inc()
            # inc(0) still creates the series, so rate() works from the first change on.
            self.changes.labels(audience, "delivered").inc(result.delivered)
            self.changes.labels(audience, "failed").inc(result.failed)
            self.changes.labels(audience, "rejected").inc(result.rejected)
            # A dry run sends nothing, so it must not make a stale audience look fresh.
            if result.status == "succeeded" and result.kind not in DRY_RUN_KINDS.values():
                self.last_success.labels(audience).set(self._clock())
            if _has_read_source(result):
                self.members.labels(audience).set(result.members)
            if result.staged_in is not None:
                self.source_rows.labels(audience, result.staged_in).inc(result.source_rows)

    def set_last_successes(self, finished: Mapping[str, datetime]) -> None:
        """Set the last-success gauge from ``sync_runs`` (naive UTC finish times), so it is
        there after a failed run and after a restart, once an audience ever succeeded."""
        for audience, at in finished.items():
            moment = at.replace(tzinfo=UTC) if at.tzinfo is None else at
            self.last_success.labels(audience).set(moment.timestamp())

    def write_textfile(self, path: Path) -> None:
        """Write every metric for node-exporter's textfile collector, atomically."""
        write_to_textfile(os.fspath(path), self.registry)


def _has_read_source(result: RunResult) -> bool:
    """Whether ``result.members`` is a real count rather than the default 0."""
    if result.status == "skipped" or result.run_id is None:
        return False
    # A source that could not be read (or a stop while reading) leaves members at 0;
    # keeping the last known count avoids a false "audience emptied" signal.
    return not (
        result.status in ("failed", "interrupted")
        and result.source_rows == 0
        and result.members == 0
    )


class _Server(JoiningHTTPServer):
    """Carries the metrics and the health check to its request handlers."""

    def __init__(self, address: tuple[str, int], metrics: Metrics, health: HealthCheck) -> None:
        self.metrics = metrics
        self.health = health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "audience-sync"
    timeout = 5.0  # an idle client cannot hold a handler thread (and stop()) for longer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging."""

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.metrics.registry))
        elif path == "/healthz":
            try:
                healthy, info = server.health()
            except Exception as exc:
                log.warning("health check failed", exc_info=True)
                healthy, info = False, {"error": f"health check failed: {type(exc).__name__}"}
            body = json.dumps(info, default=str).encode()
            self._send(200 if healthy else 503, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class MetricsServer(BackgroundServer):
    """Serves ``/metrics`` and ``/healthz`` from a background thread; port 0 picks a free one."""

    thread_name = "audience-sync-metrics"

    def __init__(self, metrics: Metrics, host: str, port: int, health: HealthCheck) -> None:
        super().__init__(host, port)
        self.metrics = metrics
        self.health = health

    def _make_server(self, address: tuple[str, int]) -> JoiningHTTPServer:
        return _Server(address, self.metrics, self.health)
