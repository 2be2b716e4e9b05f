"""Prometheus metrics: exact samples, the textfile, the /metrics + /healthz server, a real sync."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from audience_sync.fakegist import FakeGist
from audience_sync.metrics import Metrics, MetricsServer
from audience_sync.sync import RunResult, run_once
from tests.conftest import Workspace, write_members

NOW = 1_700_000_000.0

RESULTS = [
    RunResult("vip", "VIP", "run", "succeeded", run_id=1, source_rows=11, members=10,
              entered=5, delivered=5, rejected=1),
    RunResult("churned", "Churned", "run", "partial", run_id=2, source_rows=7, members=7,
              entered=5, delivered=3, failed=2, error="2 changes failed"),
    RunResult("news", "News", "run", "skipped", error="lease held by another process"),
    RunResult("broken", "Broken", "run", "failed", run_id=3, error="no such table: users"),
]  # fmt: skip


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(clock=lambda: NOW)


def test_record_results_counts_runs_changes_and_sets_gauges(metrics: Metrics) -> None:
    metrics.record_results(RESULTS)

    runs = {
        (a, s): sample(metrics, "audience_sync_runs_total", audience=a, status=s)
        for a, s in [("vip", "succeeded"), ("churned", "partial"), ("news", "skipped"),
                     ("broken", "failed"), ("vip", "failed")]
    }  # fmt: skip
    assert runs == {
        ("vip", "succeeded"): 1.0,
        ("churned", "partial"): 1.0,
        ("news", "skipped"): 1.0,
        ("broken", "failed"): 1.0,
        ("vip", "failed"): None,
    }
    changes = {
        (a, o): sample(metrics, "audience_sync_changes_total", audience=a, outcome=o)
        for a in ("vip", "churned")
        for o in ("delivered", "failed", "rejected")
    }
    assert changes == {
        ("vip", "delivered"): 5.0,
        ("vip", "failed"): 0.0,
        ("vip", "rejected"): 1.0,
        ("churned", "delivered"): 3.0,
        ("churned", "failed"): 2.0,
        ("churned", "rejected"): 0.0,
    }
    last_success = "audience_sync_last_success_timestamp_seconds"
    assert sample(metrics, last_success, audience="vip") == NOW
    assert sample(metrics, last_success, audience="churned") is None
    assert sample(metrics, last_success, audience="broken") is None
    assert sample(metrics, "audience_sync_members", audience="vip") == 10.0
    assert sample(metrics, "audience_sync_members", audience="churned") == 7.0
    assert sample(metrics, "audience_sync_members", audience="news") is None  # skipped
    assert sample(metrics, "audience_sync_members", audience="broken") is None  # source unread


def test_counters_add_up_across_runs(metrics: Metrics) -> None:
    metrics.record_results(RESULTS)
    metrics.record_results([RunResult("vip", "VIP", "run", "succeeded", run_id=9, members=12,
                                      source_rows=12, entered=2, delivered=2)])  # fmt: skip

    assert sample(metrics, "audience_sync_runs_total", audience="vip", status="succeeded") == 2.0
    assert sample(metrics, "audience_sync_changes_total", audience="vip", outcome="delivered") == 7
    assert sample(metrics, "audience_sync_members", audience="vip") == 12.0


@pytest.mark.parametrize(
    ("result", "members"),
    [
        (RunResult("a", "A", "run", "failed", run_id=1, source_rows=40, members=40), 40.0),
        (RunResult("a", "A", "run", "failed", run_id=1, error="bad query"), 99.0),
        (RunResult("a", "A", "run", "interrupted", run_id=1), 99.0),
        (RunResult("a", "A", "run", "interrupted", run_id=None, error="stopped"), 99.0),
        (RunResult("a", "A", "run", "guarded", run_id=1, source_rows=0, members=0), 0.0),
        (RunResult("a", "A", "run", "skipped"), 99.0),
        (RunResult("a", "A", "dry-run", "succeeded", run_id=1, source_rows=3, members=3), 3.0),
    ],
    ids=[
        "gist-failure-after-reading",
        "source-unreadable-keeps-last",
        "stopped-while-reading-keeps-last",
        "stopped-before-start-keeps-last",
        "empty-source-is-zero",
        "skipped-keeps-last",
        "dry-run-read-the-source",
    ],
)
def test_members_gauge_only_moves_when_the_source_was_read(
    metrics: Metrics, result: RunResult, members: float
) -> None:
    metrics.record_results([RunResult("a", "A", "run", "succeeded", run_id=0, members=99)])
    metrics.record_results([result])
    assert sample(metrics, "audience_sync_members", audience="a") == members


def test_dry_run_does_not_count_as_a_success(metrics: Metrics) -> None:
    metrics.record_results([RunResult("a", "A", "dry-run", "succeeded", run_id=1)])
    assert sample(metrics, "audience_sync_runs_total", audience="a", status="succeeded") == 1.0
    assert sample(metrics, "audience_sync_last_success_timestamp_seconds", audience="a") is None


def test_observe_request_counts_statuses_and_times(metrics: Metrics) -> None:
    for endpoint, status, seconds in [
        ("push_contact", 200, 0.003),
        ("push_contact", 200, 0.2),
        ("push_contact", 429, 0.04),
        ("push_contact", None, 31.0),
        ("fetch_contact", 404, 0.01),
    ]:
        metrics.observe_request(endpoint, status, seconds)

    responses = "audience_sync_gist_responses_total"
    assert sample(metrics, responses, endpoint="push_contact", status="200") == 2.0
    assert sample(metrics, responses, endpoint="push_contact", status="429") == 1.0
    assert sample(metrics, responses, endpoint="push_contact", status="none") == 1.0
    assert sample(metrics, responses, endpoint="fetch_contact", status="404") == 1.0
    hist = "audience_sync_gist_request_seconds"
    assert sample(metrics, f"{hist}_count", endpoint="push_contact") == 4.0
    assert sample(metrics, f"{hist}_sum", endpoint="push_contact") == pytest.approx(31.243)
    buckets = {
        le: sample(metrics, f"{hist}_bucket", endpoint="push_contact", le=le)
        for le in ("0.005", "0.05", "0.25", "30.0", "+Inf")
    }
    assert buckets == {"0.005": 1.0, "0.05": 2.0, "0.25": 3.0, "30.0": 3.0, "+Inf": 4.0}


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # a shared registry would refuse the second
    first.record_results(RESULTS[:1])
    assert sample(second, "audience_sync_runs_total", audience="vip", status="succeeded") is None
    assert REGISTRY.get_sample_value("audience_sync_runs_total", {"audience": "vip"}) is None
    assert "audience_sync_runs" not in {m.name for m in REGISTRY.collect()}


def test_write_textfile_is_node_exporter_format(metrics: Metrics, tmp_path: Path) -> None:
    metrics.record_results(RESULTS)
    metrics.observe_request("push_contact", 200, 0.1)
    path = tmp_path / "audience_sync.prom"

    metrics.write_textfile(path)
    metrics.write_textfile(path)  # replaced in place, never appended to

    lines = path.read_text().splitlines()
    assert 'audience_sync_runs_total{audience="vip",status="succeeded"} 1.0' in lines
    assert 'audience_sync_runs_total{audience="news",status="skipped"} 1.0' in lines
    assert 'audience_sync_changes_total{audience="churned",outcome="failed"} 2.0' in lines
    assert 'audience_sync_last_success_timestamp_seconds{audience="vip"} 1.7e+09' in lines
    assert 'audience_sync_gist_responses_total{endpoint="push_contact",status="200"} 1.0' in lines
    assert "# TYPE audience_sync_gist_request_seconds histogram" in lines
    assert os.listdir(tmp_path) == ["audience_sync.prom"]  # the temporary file was renamed
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    assert {
        "audience_sync_runs",
        "audience_sync_changes",
        "audience_sync_gist_request_seconds",
        "audience_sync_gist_responses",
        "audience_sync_last_success_timestamp_seconds",
        "audience_sync_members",
    } <= set(families)


class Health:
    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        self.calls += 1
        if not self.ok:
            return False, {"status": "stale", "last_run": "2024-01-01T00:00:00"}
        return True, {"status": "ok", "audiences": 2}


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def server(metrics: Metrics, health: Health) -> Iterator[MetricsServer]:
    with MetricsServer(metrics, "127.0.0.1", 0, health) as running:
        yield running


def test_metrics_endpoint_serves_the_exposition_format(
    metrics: Metrics, server: MetricsServer
) -> None:
    metrics.record_results(RESULTS)
    metrics.observe_request("push_contact", 200, 0.1)

    response = httpx.get(f"{server.url}/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert server.url.startswith("http://127.0.0.1:")
    assert not server.url.endswith(":0")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {
        "audience_sync_runs",
        "audience_sync_changes",
        "audience_sync_gist_request_seconds",
        "audience_sync_gist_responses",
        "audience_sync_last_success_timestamp_seconds",
        "audience_sync_members",
    } <= set(families)
    assert 'audience_sync_runs_total{audience="vip",status="succeeded"} 1.0' in response.text


def test_healthz_answers_200_with_json_when_healthy(server: MetricsServer, health: Health) -> None:
    response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok", "audiences": 2}


def test_healthz_answers_503_when_unhealthy(server: MetricsServer, health: Health) -> None:
    health.ok = False
    response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "stale", "last_run": "2024-01-01T00:00:00"}
    health.ok = True
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # asked on every request
    assert health.calls == 2


def test_healthz_answers_503_when_the_check_raises(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("database is locked")

    with MetricsServer(metrics, "127.0.0.1", 0, broken) as server:
        response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 503
    assert response.json() == {"error": "health check failed: RuntimeError"}
    assert "health check failed" in caplog.text


@pytest.mark.parametrize(
    "path", ["/", "/metric", "/metrics/extra", "/health"], ids=["root", "typo", "below", "health"]
)
def test_other_paths_are_404(server: MetricsServer, path: str) -> None:
    assert httpx.get(f"{server.url}{path}").status_code == 404


def test_query_strings_are_ignored(server: MetricsServer) -> None:
    assert httpx.get(f"{server.url}/healthz?verbose=1").status_code == 200


def test_stop_closes_the_port_and_is_idempotent(metrics: Metrics, health: Health) -> None:
    server = MetricsServer(metrics, "127.0.0.1", 0, health)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    server.start()
    url = server.url
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    assert httpx.get(f"{url}/metrics").status_code == 200

    server.stop()
    server.stop()

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/metrics")


def test_a_client_keeping_its_connections_does_not_hold_up_stop(
    metrics: Metrics, health: Health
) -> None:
    with httpx.Client() as client:
        server = MetricsServer(metrics, "127.0.0.1", 0, health).start()
        for _ in range(3):
            assert client.get(f"{server.url}/healthz").status_code == 200
        started = time.monotonic()
        server.stop()  # each connection was closed after its answer (HTTP/1.0)
        assert time.monotonic() - started < 1.0


def test_scrape_after_a_real_sync(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    source = workspace.add_file_audience("VIP Customers")
    write_members(source, [*range(6), ("u6", "not-an-email")])
    gist.fail_next(1, 503)  # one retried request
    gist.fail_user("u3", 422)  # one refused change
    metrics = Metrics()

    results = run_once(workspace.settings(), engine, observer=metrics.observe_request)
    metrics.record_results(results)
    with MetricsServer(metrics, "127.0.0.1", 0, lambda: (True, {})) as server:
        text = httpx.get(f"{server.url}/metrics").text

    [result] = results
    assert (result.status, result.delivered, result.failed, result.rejected) == ("partial", 5, 1, 1)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("audience_sync_runs_total", audience="vip_customers", status="partial") == 1.0
    changes = "audience_sync_changes_total"
    assert value(changes, audience="vip_customers", outcome="delivered") == 5.0
    assert value(changes, audience="vip_customers", outcome="failed") == 1.0
    assert value(changes, audience="vip_customers", outcome="rejected") == 1.0
    assert value("audience_sync_members", audience="vip_customers") == 6.0
    recorded = gist.requests()
    assert len(recorded) == 7  # 6 members, one of them twice
    by_status = Counter(str(r.status) for r in recorded)
    assert by_status == {"200": 5, "503": 1, "422": 1}
    for status, count in by_status.items():
        assert value(
            "audience_sync_gist_responses_total", endpoint="push_contact", status=status
        ) == float(count)
    timed = value("audience_sync_gist_request_seconds_count", endpoint="push_contact")
    assert timed == float(len(recorded))
