"""The Gist API client: builds contact payloads and classifies every answer once, here."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import httpx

from audience_sync.config import GistConfig
from audience_sync.errors import AuthError, FatalApiError, RetriableApiError, UnreachableError

log = logging.getLogger(__name__)
USER_AGENT = "audience-sync"
MAX_MESSAGE = 500


def make_http_client(
    config: GistConfig, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """An async client with keep-alive, sized for ``max_concurrency`` connections."""
    return httpx.AsyncClient(
        base_url=config.base_url.rstrip("/"),
        headers={
            "Authorization": f"Bearer {config.api_key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        },
        timeout=httpx.Timeout(config.timeout_seconds),
        limits=httpx.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency,
        ),
        transport=transport,
        verify=_tls(),
    )


@cache
def _tls() -> ssl.SSLContext:
    """The TLS context every client of this process shares: httpx builds one per client
    otherwise, loading the CA bundle each time (about 28 ms, for every run)."""
    return httpx.create_ssl_context()


def build_contact(user_id: str, email: str, properties: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /contacts`` body that sets ``properties`` on one contact. An email not
    known (``""``: a contact ``reconcile`` found in Gist without one) is left out, not sent
    empty: the user id names the contact, and an empty email is no address Gist accepts."""
    if not email:
        return {"user_id": user_id, "custom_properties": properties}
    return {"user_id": user_id, "email": email, "custom_properties": properties}


@dataclass(frozen=True)
class ContactPage:
    """One page of ``GET /contacts``: its contacts, and whether another page follows
    (``pages.next`` when Gist gives it, else the page count; None when it says neither)."""

    contacts: list[dict[str, Any]]
    more: bool | None


@dataclass(frozen=True)
class BatchAnswer:
    """Gist's 2xx answer to ``POST /contacts/batch``.

    ``failed``: positions of the contacts the answer reports errors for (not acknowledged);
    None when it reports errors it does not tie to a contact, so none is acknowledged.
    """

    status: int
    failed: frozenset[int] | None


_ON_WIRE: ContextVar[Callable[[], None] | None] = ContextVar("on_wire", default=None)
_GUARD: ContextVar[Callable[[], None] | None] = ContextVar("send_guard", default=None)


@contextmanager
def guarded_by(check: Callable[[], None]) -> Iterator[None]:
    """Call ``check`` just before each request made in this block goes out — before it is
    handed to the HTTP client, and again as its first bytes are about to be written to the
    socket (a connection may take a while to open) — and let it raise to keep the request
    from leaving (the lease fence: ``lease.Holder.check``)."""
    token = _GUARD.set(check)
    try:
        yield
    finally:
        _GUARD.reset(token)


@contextmanager
def on_wire(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` when a request made in this block has been written to the socket
    (the pacer counts a request from then, not from when it let it go: a connection being
    opened, or a busy loop, can hold a request back for tens of milliseconds)."""
    token = _ON_WIRE.set(callback)
    try:
        yield
    finally:
        _ON_WIRE.reset(token)


async def _trace(event: str, info: dict[str, Any]) -> None:
    """httpx's trace hook: asks the guard before the request's first byte is written, and
    tells the ``on_wire`` callback when the request is on the wire."""
    if event.endswith(".send_request_headers.started") and (guard := _GUARD.get()):
        guard()
    elif event.endswith(".send_request_body.complete") and (callback := _ON_WIRE.get()):
        callback()


RequestObserver = Callable[[str, int | None, float], None]
"""Told of every request: endpoint ("push_contact", "fetch_contact"), status (None when no
answer came) and seconds taken. The metrics module is one."""


class GistClient:
    """Calls Gist over an injected ``httpx.AsyncClient``; raises the errors of ``errors.py``.

    ``deadline`` bounds each request as a whole, answer included (httpx's own timeouts bound
    each read, so an answer that trickles in a byte at a time would not end): the lease
    fence relies on no request outliving it.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        observer: RequestObserver | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        self._http = http
        self._observer = observer
        self._deadline = deadline

    def _secrets(self) -> list[str]:
        """What no message may show: the Authorization header's value and the key in it."""
        header = self._http.headers.get("Authorization", "")
        return [v for v in (header, header.removeprefix("Bearer ").strip()) if v]

    async def push_contact(self, user_id: str, email: str, properties: dict[str, Any]) -> int:
        """Create or update a contact; returns Gist's 2xx status or raises an ApiError."""
        response = await self._request(
            "push_contact", "POST", "/contacts", json=build_contact(user_id, email, properties)
        )
        check_response(response)
        return response.status_code

    async def push_contacts(self, contacts: list[tuple[str, str, dict[str, Any]]]) -> BatchAnswer:
        """Create or update many contacts in one ``POST /contacts/batch``.

        A 2xx acknowledges every contact but those its body reports errors for.
        """
        body = {"contacts": [build_contact(u, e, p) for u, e, p in contacts]}
        response = await self._request("push_contacts", "POST", "/contacts/batch", json=body)
        check_response(response)
        return BatchAnswer(response.status_code, batch_failures(response, contacts))

    async def push_event(self, event: dict[str, Any]) -> int:
        """Record a custom event on a contact (``POST /events``)."""
        response = await self._request("push_event", "POST", "/events", json=event)
        check_response(response)
        return response.status_code

    async def fetch_contact(self, user_id: str) -> dict[str, Any] | None:
        """The contact with this user_id as Gist holds it, or None when Gist has none."""
        response = await self._request(
            "fetch_contact", "GET", "/contacts", params={"user_id": user_id}
        )
        if response.status_code == 404:
            return None
        check_response(response)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        # {"contact": {...}}, or {"contact": null} for none; any other answer says nothing
        # about the contact, so nothing can be concluded from it.
        if isinstance(body, dict) and "contact" in body:
            contact = body["contact"]
            if contact is None or isinstance(contact, dict):
                return contact
        shown = response.text[:100].replace("\n", " ")
        raise FatalApiError(
            f"HTTP {response.status_code}: an answer that is not a contact ({shown!r})",
            status=response.status_code,
        )

    async def fetch_contacts(self, page: int, per_page: int) -> ContactPage:
        """Page ``page`` (from 1) of every contact, ``per_page`` at a time (Gist may give
        fewer). An answer that is not a page of contacts raises FatalApiError."""
        response = await self._request(
            "fetch_contacts", "GET", "/contacts", params={"page": page, "per_page": per_page}
        )
        check_response(response)
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        contacts = body.get("contacts") if isinstance(body, dict) else None
        if not isinstance(contacts, list) or not all(isinstance(c, dict) for c in contacts):
            shown = response.text[:100].replace("\n", " ")
            raise FatalApiError(
                f"HTTP {response.status_code}: an answer that is not a page of contacts "
                f"({shown!r})",
                status=response.status_code,
            )
        pages = body.get("pages") if isinstance(body, dict) else None
        more: bool | None = None
        if isinstance(pages, dict):
            if "next" in pages:
                more = bool(pages["next"])
            elif isinstance(pages.get("total_pages"), int):
                more = page < pages["total_pages"]
        return ContactPage(contacts, more)

    async def _request(self, endpoint: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started = time.monotonic()
        status: int | None = None
        if "json" in kwargs and log.isEnabledFor(logging.DEBUG):
            # -vv shows what is sent; the key travels in a header and is never logged.
            log.debug("%s %s %s", method, url, json.dumps(kwargs["json"], default=str))
        if guard := _GUARD.get():
            guard()
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._http.request(
                    method, url, extensions={"trace": _trace}, **kwargs
                )
            status = response.status_code
            return response
        except httpx.TransportError as exc:
            raise transport_error(exc, str(self._http.base_url), self._secrets()) from exc
        except TimeoutError as exc:
            where = str(self._http.base_url).rstrip("/")
            raise RetriableApiError(
                f"Gist at {where} timed out: no whole answer within {self._deadline:g} s"
            ) from exc
        finally:
            if self._observer is not None:
                self._observer(endpoint, status, time.monotonic() - started)


def batch_failures(
    response: httpx.Response, contacts: list[tuple[str, str, dict[str, Any]]]
) -> frozenset[int] | None:
    """Positions of the contacts a 2xx batch answer reports errors for.

    Gist does not document the shape, so the common ones are read: an ``errors`` array whose
    entries name a contact (``index``, ``user_id`` or ``email``), and per-contact entries
    (``contacts``, or the body itself when it is an array; naming their contact, else in
    request order when there is one per contact) that carry ``errors`` or ``error``. An
    error that names no contact, or an email several contacts of the batch share, or JSON of
    another shape returns None: then no contact counts as acknowledged.
    """
    if not response.content.strip():
        return frozenset()  # no body: a bare 2xx acknowledges the whole batch
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return frozenset()  # not JSON (a bare "OK"): nothing names an error
    if isinstance(body, list):
        body = {"contacts": body}
    if not isinstance(body, dict):
        return None
    by_user = {str(user_id): i for i, (user_id, _, _) in enumerate(contacts)}
    by_email: dict[str, int | None] = {}
    for i, (_, address, _) in enumerate(contacts):
        if address:  # None: shared by several contacts, so naming none of them for sure
            by_email[address] = None if address in by_email else i
    failed: set[int] = set()
    errors = body.get("errors")
    if errors:
        for error in errors if isinstance(errors, list) else [errors]:
            position = _position(error, by_user, by_email, len(contacts))
            if position is None:
                return None
            failed.add(position)
    entries = body.get("contacts")
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not (entry.get("errors") or entry.get("error")):
                continue
            position = _position(entry, by_user, by_email, len(contacts))
            if position is None and len(entries) == len(contacts):
                position = i  # one entry per contact: in request order
            if position is None:
                return None
            failed.add(position)
    return frozenset(failed)


def _position(
    item: Any, by_user: dict[str, int], by_email: dict[str, int | None], size: int
) -> int | None:
    """Which contact of the batch ``item`` names, if any."""
    if not isinstance(item, dict):
        return None
    index = item.get("index")
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < size:
        return index
    user_id = item.get("user_id")
    if user_id is not None and str(user_id) in by_user:
        return by_user[str(user_id)]
    email = item.get("email")
    if isinstance(email, str) and email in by_email:
        return by_email[email]
    return None


def transport_error(
    exc: httpx.TransportError, base_url: str, secrets: Sequence[str] = ()
) -> RetriableApiError | FatalApiError:
    """What a request that got no answer means: retry what can succeed later (a refused
    connection, an unknown host, a timeout, a dropped connection), stop on what never can
    (a scheme or a TLS set-up that is wrong). Every message names the URL and the cause,
    and none shows ``secrets`` (an illegal header's error quotes the header)."""
    error = _classify(exc, base_url)
    text = str(error)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    if text != str(error):
        error.args = (text,)
    return error


def _classify(exc: httpx.TransportError, base_url: str) -> RetriableApiError | FatalApiError:
    url = base_url.rstrip("/")
    where = f"cannot reach Gist at {url}"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return UnreachableError(f"{where}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return RetriableApiError(f"Gist at {url} timed out: {type(exc).__name__}")
    cause = _root_cause(exc)
    if isinstance(cause, ssl.SSLError) and isinstance(exc, httpx.ConnectError):
        # The handshake failed: no request can get through. Read or written after it, a
        # TLS error is a connection that broke (the request may have been applied).
        reason = cause.reason or str(cause)
        return UnreachableError(
            f"{where}: TLS failed ({reason}), check base_url's scheme (http or https)"
        )
    if isinstance(cause, ConnectionRefusedError):
        return RetriableApiError(f"{where}: connection refused")
    if isinstance(cause, socket.gaierror):
        return RetriableApiError(f"{where}: host not found ({cause.strerror or cause})")
    if isinstance(exc, httpx.ConnectError):
        return RetriableApiError(f"{where}: connection failed: {type(exc).__name__}: {exc}")
    return RetriableApiError(f"Gist at {url}: connection failed: {type(exc).__name__}: {exc}")


def _root_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(exc))
        exc = nxt
    return exc


def check_response(response: httpx.Response) -> None:
    """Return for 2xx; otherwise raise the error class that says what to do next."""
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"HTTP {status}: {error_message(response)}"
    if status in (401, 403):
        raise AuthError(message, status=status)
    if status == 429 or status == 408 or status >= 500:
        raise RetriableApiError(
            message,
            status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    raise FatalApiError(message, status=status)


def error_message(response: httpx.Response) -> str:
    """Gist's own words for an error (``{"errors": [{"message": ...}]}``), else the body."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list):
            messages = [str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors]
            if messages:
                return "; ".join(messages)[:MAX_MESSAGE]
        if "message" in body:
            return str(body["message"])[:MAX_MESSAGE]
    text = response.text.strip()
    return (text[:MAX_MESSAGE] or response.reason_phrase) if text else response.reason_phrase


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
