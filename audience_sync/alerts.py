"""Webhook alerts: POST when an audience starts failing, keeps failing, or recovers.

Which run is owed an alert is derived from ``sync_runs`` (the run before it, and when the
failing streak began), so it holds for ``run`` from cron, where every invocation is a new
process, as for the daemon. Posting has a total deadline and reads at most a small answer;
the daemon posts from its own thread, so a slow webhook never holds up a sync.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.config import AlertsConfig, parse_duration
from audience_sync.models import sync_runs as runs
from audience_sync.runs import RunResult, result_fields
from audience_sync.statuses import DRY_RUN_KINDS, FAILED_STATUSES, RunStatus

__all__ = [
    "ALERT_STATUSES",
    "Alert",
    "AlertMemory",
    "AlertSender",
    "build_summary",
    "post_alert",
    "redact_webhook_url",
    "select_alerts",
    "send_alerts",
]

log = logging.getLogger(__name__)

ALERT_STATUSES = FAILED_STATUSES  # failed, guarded, partial, interrupted
ANSWER_LIMIT = 64 * 1024  # bytes of the webhook's answer read at most; the rest is dropped
# Least to most severe, for worst_status; a status not listed here ranks worst.
_SEVERITY: tuple[RunStatus, ...] = (
    "succeeded", "skipped", "partial", "guarded", "interrupted", "failed",
)  # fmt: skip

AlertEvent = Literal["failing", "reminder", "recovered", "still failing", "ok", "skipped"]
"""What a run means for its audience: ``failing`` (was ok), ``reminder`` (still failing and
a ``remind_every`` boundary passed since the streak began), ``recovered`` (succeeded after
failing); ``still failing``, ``ok`` and ``skipped`` are posted only with ``always``."""
NEWS: frozenset[AlertEvent] = frozenset({"failing", "reminder", "recovered"})


@dataclass(frozen=True)
class Alert:
    """One run in an alert, with what it means for its audience."""

    result: RunResult
    event: AlertEvent


class AlertMemory:
    """What this process last told the webhook per audience: for runs ``sync_runs`` cannot
    describe (the state database was down, so the run has no id) and to announce the
    recovery of a failure only this process saw."""

    def __init__(self) -> None:
        self._failing_since_alert: dict[str, float] = {}  # key → monotonic time of last alert
        self._lock = threading.Lock()

    def last_alert(self, key: str) -> float | None:
        with self._lock:
            return self._failing_since_alert.get(key)

    def failing(self, key: str, alerted: bool, now: float) -> None:
        with self._lock:
            if alerted or key not in self._failing_since_alert:
                self._failing_since_alert[key] = now if alerted else float("-inf")

    def ok(self, key: str) -> None:
        with self._lock:
            self._failing_since_alert.pop(key, None)


def select_alerts(
    config: AlertsConfig,
    results: Sequence[RunResult],
    engine: Engine | None = None,
    memory: AlertMemory | None = None,
    *,
    monotonic: Callable[[], float] = time.monotonic,
) -> list[Alert]:
    """The runs of ``results`` owed an alert (every run with ``config.always``).

    Each run is compared with its audience's previous run in ``sync_runs`` (dry runs
    ignored): a change between ok and failing is news, and so is a failing streak crossing
    a ``remind_every`` boundary. Without an engine, or when the state database cannot
    answer, every failing run counts as news unless ``memory`` says this process alerted
    about it within ``remind_every``.
    """
    if config.webhook_url is None:
        return []
    remind = timedelta(seconds=parse_duration(config.remind_every) or 0)
    memory = memory if memory is not None else AlertMemory()
    chosen: list[Alert] = []
    for result in results:
        event = _event(result, engine, memory, remind, monotonic())
        if config.always or event in NEWS:
            chosen.append(Alert(result, event))
    return chosen


def _event(
    result: RunResult, engine: Engine | None, memory: AlertMemory, remind: timedelta, now: float
) -> AlertEvent:
    key = result.audience_key
    if result.status == "skipped":
        return "skipped"
    failing = result.status in ALERT_STATUSES
    told_at = memory.last_alert(key)
    event: AlertEvent | None = None
    if engine is not None and result.run_id is not None:
        try:
            event = _event_from_history(engine, result, remind)
        except SQLAlchemyError as exc:
            log.warning("cannot read the alert history of %s: %s", key, type(exc).__name__)
    if not failing:
        memory.ok(key)
        # A failure only this process saw (no run id) was announced: announce its end too.
        return "recovered" if event == "recovered" or told_at is not None else "ok"
    if event is None or event == "failing":
        # No history, or history says "news": unless this process said so recently.
        recently = told_at is not None and now - told_at < remind.total_seconds()
        event = "still failing" if recently else ("failing" if told_at is None else "reminder")
    memory.failing(key, event in NEWS, now)
    return event


def _event_from_history(engine: Engine, result: RunResult, remind: timedelta) -> AlertEvent:
    """``failing``, ``reminder``, ``still failing``, ``recovered`` or ``ok`` from sync_runs."""
    key, run_id = result.audience_key, result.run_id
    real = (runs.c.audience_key == key, runs.c.kind.not_in(DRY_RUN_KINDS.values()))
    with engine.connect() as connection:
        started = connection.scalar(select(runs.c.started_at).where(runs.c.id == run_id))
        previous = connection.execute(
            select(runs.c.status, runs.c.started_at)
            .where(*real, runs.c.id < run_id, runs.c.status != "running")
            .order_by(runs.c.id.desc())
            .limit(1)
        ).first()
        was_failing = previous is not None and previous.status in ALERT_STATUSES
        if result.status not in ALERT_STATUSES:
            return "recovered" if was_failing else "ok"
        if not was_failing or previous is None or started is None:
            return "failing"
        last_ok = connection.scalar(
            select(func.max(runs.c.id)).where(
                *real, runs.c.id < run_id, runs.c.status == "succeeded"
            )
        )
        streak = connection.scalar(
            select(func.min(runs.c.started_at)).where(
                *real,
                runs.c.id > (last_ok or 0),
                runs.c.id <= run_id,
                runs.c.status.in_(ALERT_STATUSES),
            )
        )
    if streak is None or remind <= timedelta(0):
        return "still failing"
    # A reminder each time the streak's age crosses a multiple of remind_every.
    crossed = _periods(started, streak, remind) > _periods(previous.started_at, streak, remind)
    return "reminder" if crossed else "still failing"


def _periods(moment: datetime, start: datetime, length: timedelta) -> int:
    return int((moment - start) / length) if moment >= start else 0


def build_summary(alerts: Sequence[Alert]) -> dict[str, Any]:
    """The JSON body of an alert: where it comes from, every run with its ``alert`` event,
    and the worst status.

    ``text`` is a one-line human summary, so chat webhooks (Slack, Mattermost) that want
    a ``text`` field show something readable.
    """
    worst = max((a.result.status for a in alerts), key=_severity, default=None)
    parts = [
        f"{a.result.audience_key} {a.event}"
        + (f" ({a.result.status})" if a.event not in ("ok", "recovered", "skipped") else "")
        + (f": {a.result.error}" if a.result.error else "")
        for a in alerts
    ]
    host = socket.gethostname()
    return {
        "tool": "audience-sync",
        "host": host,
        "runs": [{**result_fields(a.result), "alert": a.event} for a in alerts],
        "worst_status": worst,
        "text": f"audience-sync on {host}: " + ("; ".join(parts) or "no runs"),
    }


def send_alerts(
    config: AlertsConfig,
    results: Sequence[RunResult],
    engine: Engine | None = None,
    *,
    memory: AlertMemory | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bool:
    """Select the runs owed an alert (:func:`select_alerts`) and POST them at once
    (:func:`post_alert`); True when the webhook answered 2xx. Never raises for the webhook."""
    alerts = select_alerts(config, results, engine, memory)
    if not alerts:
        return False
    return post_alert(config, alerts, transport=transport)


def post_alert(
    config: AlertsConfig,
    alerts: Sequence[Alert],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bool:
    """POST the summary of ``alerts``; True when the webhook answered 2xx in time.

    The whole exchange — connecting, sending, the answer's headers and at most
    ``ANSWER_LIMIT`` bytes of its body — must end within ``config.timeout_seconds``; a
    webhook that trickles its answer is cut off there. Failures are logged as warnings,
    never raised: alerting must not fail the sync. The URL's credentials are never logged.
    """
    url = config.webhook_url
    if url is None or not alerts:
        return False
    shown = redact_webhook_url(url)
    deadline = config.timeout_seconds
    try:
        status = asyncio.run(
            asyncio.wait_for(
                _post(url, shown, build_summary(alerts), deadline, transport), deadline
            )
        )
    except TimeoutError:
        log.warning("alert webhook %s did not answer within %gs", shown, deadline)
        return False
    except Exception as exc:
        log.warning("alert webhook %s failed: %s", shown, _describe_error(exc, url))
        return False
    if not 200 <= status < 300:
        log.warning("alert webhook %s answered HTTP %d", shown, status)
        return False
    log.info("alert webhook %s notified of %d runs", shown, len(alerts))
    return True


async def _post(
    url: str,
    shown: str,
    body: dict[str, Any],
    deadline: float,
    transport: httpx.AsyncBaseTransport | None,
) -> int:
    # httpx's own timeouts apply per read; the caller's wait_for is the real bound, so
    # these only need to be longer than it.
    timeout = httpx.Timeout(deadline + 1)
    async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
        request = client.build_request(
            "POST", url, json=body, headers={"User-Agent": "audience-sync"}
        )
        with _hide_url_in_httpx_log(request.url, shown):
            response = await client.send(request, stream=True)
        try:
            read = 0
            # (An in-memory answer, as a mock transport gives, is read already.)
            chunks = response.aiter_raw() if not response.is_stream_consumed else _nothing()
            async for chunk in chunks:
                read += len(chunk)
                if read >= ANSWER_LIMIT:
                    break  # an answer this big is not for us; the status is all we need
        finally:
            await response.aclose()
        return response.status_code


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # makes this an async generator


class AlertSender:
    """Posts alerts from a background thread, in order, so syncing never waits for a webhook.

    Each alert gets its own deadline (``timeout_seconds``); :meth:`close` waits a bounded
    time for what is queued and reports what it had to leave unsent.
    """

    def __init__(
        self,
        config: Callable[[], AlertsConfig],
        post: Callable[[AlertsConfig, Sequence[Alert]], bool] = post_alert,
    ) -> None:
        self._config = config
        self._post = post
        self._queue: queue.Queue[list[Alert] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        # A daemon thread: a webhook that hangs past close() must not keep the process.
        self._thread = threading.Thread(target=self._run, name="audience-sync-alerts", daemon=True)

    def submit(self, alerts: Sequence[Alert]) -> None:
        """Queue ``alerts`` for posting (nothing when empty); returns at once."""
        if not alerts:
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
            if not self._thread.is_alive():
                self._thread.start()
        self._queue.put(list(alerts))

    def close(self, timeout: float) -> bool:
        """Stop taking alerts; wait up to ``timeout`` seconds for the queued ones. True when
        every alert was handled; otherwise the unsent audiences are logged."""
        done = self._idle.wait(timeout)
        if self._thread.is_alive():
            self._queue.put(None)
        if not done:
            unsent = []
            with suppress(queue.Empty):
                while True:
                    item = self._queue.get_nowait()
                    if item:
                        unsent += [a.result.audience_key for a in item]
            log.warning(
                "stopping with an alert still in flight%s",
                f"; not sent for: {', '.join(unsent)}" if unsent else "",
            )
        return done

    def _run(self) -> None:
        while True:
            alerts = self._queue.get()
            if alerts is None:
                return
            try:
                self._post(self._config(), alerts)
            except Exception:
                log.exception("posting an alert failed")
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()


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
