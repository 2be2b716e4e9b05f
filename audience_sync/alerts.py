"""Webhook alerts: POST a JSON summary of runs that need a human; never fails the sync."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import httpx

from audience_sync.config import AlertsConfig
from audience_sync.statuses import FAILED_STATUSES, RunStatus
from audience_sync.sync import RunResult

__all__ = ["ALERT_STATUSES", "build_summary", "redact_webhook_url", "send_alerts"]

log = logging.getLogger(__name__)

ALERT_STATUSES = FAILED_STATUSES  # failed, guarded, partial, interrupted
# Least to most severe, for worst_status; a status not listed here ranks worst.
_SEVERITY: tuple[RunStatus, ...] = (
    "succeeded", "skipped", "partial", "guarded", "interrupted", "failed",
)  # fmt: skip


def build_summary(results: Sequence[RunResult]) -> dict[str, Any]:
    """The JSON body of an alert: where it comes from, every run, and the worst status.

    ``text`` is a one-line human summary, so chat webhooks (Slack, Mattermost) that want
    a ``text`` field show something readable.
    """
    worst = max((r.status for r in results), key=_severity, default=None)
    parts = [f"{r.audience_key} {r.status}" + (f" ({r.error})" if r.error else "") for r in results]
    host = socket.gethostname()
    return {
        "tool": "audience-sync",
        "host": host,
        "runs": [asdict(r) for r in results],
        "worst_status": worst,
        "text": f"audience-sync on {host}: " + ("; ".join(parts) or "no runs"),
    }


def send_alerts(
    config: AlertsConfig,
    results: Sequence[RunResult],
    *,
    transport: httpx.BaseTransport | None = None,
) -> bool:
    """POST a summary of the runs that need attention; True when the webhook answered 2xx.

    Does nothing (False) without ``webhook_url`` or when no run is failed, guarded, partial
    or interrupted (unless ``config.always``). A failing webhook is logged as a warning and
    never raised: alerting must not fail the sync. The URL's credentials are never logged.
    """
    url = config.webhook_url
    if url is None:
        return False
    selected = (
        list(results) if config.always else [r for r in results if r.status in ALERT_STATUSES]
    )
    if not selected:
        return False
    shown = redact_webhook_url(url)
    try:
        with httpx.Client(timeout=config.timeout_seconds, transport=transport) as client:
            request = client.build_request(
                "POST", url, json=build_summary(selected), headers={"User-Agent": "audience-sync"}
            )
            with _hide_url_in_httpx_log(request.url, shown):
                response = client.send(request)
    except Exception as exc:
        log.warning("alert webhook %s failed: %s", shown, _describe_error(exc, url))
        return False
    if not response.is_success:
        log.warning("alert webhook %s answered HTTP %d", shown, response.status_code)
        return False
    log.info("alert webhook %s notified of %d runs", shown, len(selected))
    return True


def redact_webhook_url(url: str) -> str:
    """``scheme://host[:port]/…`` for logs.

    Userinfo and query go, and so does the path: Slack and Discord webhooks carry
    their token in it.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or not host:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def _describe_error(exc: Exception, url: str) -> str:
    """The error's class and message, the message dropped if it quotes any part of the URL."""
    message = str(exc)
    try:
        parts = urlsplit(url)
        secrets = [url, parts.netloc, parts.path, parts.query, parts.username, parts.password]
    except ValueError:
        secrets = [url]
    # Parts of two characters or fewer ("/", "a") are no secret and would match anything.
    if any(s and len(s) > 2 and s in message for s in secrets):
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _severity(status: RunStatus) -> int:
    return _SEVERITY.index(status) if status in _SEVERITY else len(_SEVERITY)


class _ReplaceArg(logging.Filter):
    """Replaces one URL among a log record's arguments (httpx logs each request's URL)."""

    def __init__(self, value: httpx.URL, replacement: str) -> None:
        super().__init__()
        self._value = value
        self._replacement = replacement

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(map(self._matches, record.args)):
            record.args = tuple(self._replacement if self._matches(a) else a for a in record.args)
        return True

    def _matches(self, arg: object) -> bool:
        return isinstance(arg, httpx.URL) and arg == self._value


@contextmanager
def _hide_url_in_httpx_log(url: httpx.URL, shown: str) -> Iterator[None]:
    # httpx logs "HTTP Request: POST <full URL>" at INFO (shown with -vv), token included.
    logger = logging.getLogger("httpx")
    hide = _ReplaceArg(url, shown)
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)
