"""Fake Gist API: a real HTTP server on loopback with latency, rate-limit and fault knobs."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import FrameType
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from audience_sync.httpserver import BackgroundServer, JoiningHTTPServer

__all__ = ["DEFAULT_KEY", "DEFAULT_PORT", "FakeGist", "RecordedRequest", "main", "serve"]

# `audience-sync fake-gist` serves here by default, and a kept demo's config points here.
DEFAULT_PORT = 8099
DEFAULT_KEY = "demo-key-not-secret"  # a fake's key, printed for pasting; never a real one

_Headers = dict[str, str]
_Answer = tuple[int, Any, _Headers]
DEFAULT_PER_PAGE = 50  # contacts per page of GET /contacts when none is asked
MAX_PER_PAGE = 100  # the most the list endpoint gives per page, whatever is asked
EMAIL = re.compile(r"[^@\s]+@[^@\s]+")  # what the fake takes for an address: loose on purpose


@dataclass(frozen=True)
class _Raw:
    """An answer's body sent as these bytes, not as JSON."""

    data: bytes
    content_type: str


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake answered (status 0 when the connection was dropped)."""

    method: str
    path: str
    body: Any
    status: int
    at: float
    answered: bool = True  # False when the connection was dropped (after applying, or not)
    query: str = ""  # the URL's query string, as sent

    @property
    def page(self) -> int | None:
        """The ``page`` a list request asked for (1 when it asked for none)."""
        if self.method != "GET" or self.path != "/contacts":
            return None
        params = parse_qs(self.query)
        if "user_id" in params or "email" in params:
            return None
        return int(params.get("page", ["1"])[0])


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _errors(message: str) -> dict[str, Any]:
    return {"errors": [{"message": message}]}


class _Server(JoiningHTTPServer):
    """A server that can cut live keep-alive connections."""

    request_queue_size = 128

    def __init__(self, address: tuple[str, int], gist: FakeGist) -> None:
        self.gist = gist
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._conn_lock:
            live = list(self._connections)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeGist/1.0"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        gist = cast(_Server, self.server).gist
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        split = urlsplit(self.path)
        answer = gist._answer(
            method=self.command,
            path=split.path,
            query=split.query,
            raw=raw,
            authorization=self.headers.get("Authorization"),
        )
        if answer is None:  # dropped: close without a response
            self.close_connection = True
            return
        status, body, headers = answer
        # No body at all (a redirect): a 304 must not have one, or it would be read as the
        # start of the next answer on the connection.
        if body is None:
            payload = b""
        elif isinstance(body, _Raw):
            payload = body.data
        else:
            payload = json.dumps(body).encode()
        trickle = gist._take_trickle()
        if trickle is not None:
            length, every = trickle
            payload = payload.ljust(length)  # JSON still, should it ever arrive whole
        self.send_response(status)
        if payload:
            self.send_header(
                "Content-Type", body.content_type if isinstance(body, _Raw) else "application/json"
            )
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if trickle is None:
            self.wfile.write(payload)
            return
        self.close_connection = True
        self.wfile.flush()
        for byte in range(len(payload)):
            # One byte per `every` seconds; the fake's stop (or the client leaving) ends it.
            if byte and gist._closing.wait(every):
                return
            try:
                self.wfile.write(payload[byte : byte + 1])
                self.wfile.flush()
            except OSError:
                return


class FakeGist(BackgroundServer):
    """In-memory Gist `/contacts` and `/events` API served over real HTTP on 127.0.0.1.

    ``start()``/``stop()``, ``url`` and ``with FakeGist(...)`` come from ``BackgroundServer``.
    """

    thread_name = "fakegist"

    def __init__(
        self, api_key: str = "test-key", *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self._lock = threading.RLock()
        self._contacts: dict[int, dict[str, Any]] = {}
        self._order: list[int] = []  # contact ids in creation order: the list endpoint's pages
        self._in_flight = 0  # requests received and waiting out their latency
        self._by_user: dict[str, int] = {}  # user_id → contact id
        self._by_email: dict[str, list[int]] = {}  # email → contact ids, oldest first
        self._next_id = 1
        self._events: list[dict[str, Any]] = []
        self._log: list[RecordedRequest] = []
        self._latency = 0.0
        self._rate_limit: float | None = None
        self._window: deque[float] = deque()
        self._fail_next = 0
        self._fail_next_status = 503
        self._fail_next_retry_after: str | None = None
        self._fail_next_message = "Service unavailable"
        self._redirect_next = 0
        self._redirect_status = 302
        self._redirect_location = "/moved"
        self._drop_next = 0
        self._drop_applied = 0
        self._fail_users: dict[str, tuple[int, str]] = {}
        self._lose_then_refuse: dict[str, tuple[int, str]] = {}
        self._refuse_events: dict[str, int] = {}  # user id: how many more of its events
        self._fail_in_batch: dict[str, str] = {}
        self._batch_error_shape = "errors"
        self._fail_after: int | None = None
        self._fail_after_status = 503
        self._fail_after_message = ""
        self._raw_next: list[tuple[int, _Raw]] = []  # answers given as they are, not applied
        self._trickle_next = 0
        self._trickle = (1000, 1.0)  # answer length, seconds per byte
        self._closing = threading.Event()

    # ----------------------------------------------------------------- lifecycle

    def _make_server(self, address: tuple[str, int]) -> JoiningHTTPServer:
        return _Server(address, self)

    def start(self) -> FakeGist:
        self._closing.clear()
        return super().start()

    def _before_close(self, server: JoiningHTTPServer) -> None:
        # Idle keep-alive connections (and trickling answers) would otherwise hold their
        # handler threads, and stop().
        self._closing.set()
        cast(_Server, server).cut_connections()

    # ------------------------------------------------------------------- state

    def contacts(self) -> dict[str, dict[str, Any]]:
        """Contacts keyed by user_id (by email for contacts that have no user_id)."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for contact in self._contacts.values():
                key = contact["user_id"] if contact["user_id"] is not None else contact["email"]
                out[str(key)] = {
                    "user_id": contact["user_id"],
                    "email": contact["email"],
                    "custom_properties": dict(contact["custom_properties"]),
                }
            return out

    def properties(self, key: str) -> dict[str, Any]:
        return {
            uid: c["custom_properties"][key]
            for uid, c in self.contacts().items()
            if key in c["custom_properties"]
        }

    @property
    def in_flight(self) -> int:
        """Requests received whose answer is still being held back by ``latency``."""
        with self._lock:
            return self._in_flight

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._log if path is None or r.path == path]

    def busiest_second(self) -> int:
        """The most requests answered (429s aside) in any one-second window."""
        times = sorted(r.at for r in self.requests() if r.status != 429)
        most, start = 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._events]

    def add_contact(
        self, user_id: str | None, email: str | None, properties: dict[str, Any] | None = None
    ) -> None:
        """Create or update a contact as another tool would have (Segment's destination,
        say); ``user_id=None`` makes a lead."""
        with self._lock:
            self._upsert(
                {
                    "user_id": None if user_id is None else str(user_id),
                    "email": email,
                    "custom_properties": dict(properties or {}),
                }
            )

    def remove_contact(self, user_id: str) -> None:
        """Delete a user's contact, as someone in Gist's own UI would."""
        with self._lock:
            contact = self._find(str(user_id), None)
            if contact is None:
                raise KeyError(user_id)
            del self._contacts[contact["id"]]
            self._order.remove(contact["id"])
            del self._by_user[str(user_id)]
            if contact["email"]:
                self._by_email[contact["email"]].remove(contact["id"])

    def drop_property(self, user_id: str, key: str) -> None:
        """Remove a property from a user's contact, as someone in Gist's own UI would."""
        with self._lock:
            contact = self._find(str(user_id), None)
            if contact is None:
                raise KeyError(user_id)
            contact["custom_properties"].pop(key, None)

    def edit_contact(self, user_id: str, properties: dict[str, Any]) -> None:
        """Change a contact's properties as someone in Gist's own UI would, behind the
        tool's back (what ``verify`` is for)."""
        with self._lock:
            contact = self._find(str(user_id), None)
            if contact is None:
                raise KeyError(user_id)
            contact["custom_properties"].update(properties)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ faults

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = max(0.0, float(seconds))

    @property
    def rate_limit(self) -> float | None:
        with self._lock:
            return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, per_second: float | None) -> None:
        with self._lock:
            self._rate_limit = None if per_second is None else float(per_second)
            self._window.clear()

    def fail_next(
        self,
        n: int,
        status: int = 503,
        *,
        retry_after: str | None = None,
        message: str = "Service unavailable",
    ) -> None:
        with self._lock:
            self._fail_next = n
            self._fail_next_status = status
            self._fail_next_retry_after = retry_after
            self._fail_next_message = message

    def redirect_next(self, n: int, status: int = 302, location: str = "/moved") -> None:
        """Answer the next ``n`` requests with a 3xx naming ``location``, an empty body and
        nothing applied: a proxy or a moved API, which the client must not take for a yes."""
        if not 300 <= status < 400:
            raise ValueError(f"not a redirect status: {status}")
        with self._lock:
            self._redirect_next = n
            self._redirect_status = status
            self._redirect_location = location

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._drop_next = n

    def drop_after_applying(self, n: int) -> None:
        """The next ``n`` requests are applied, then their connection is dropped unanswered:
        the client cannot know that Gist holds the change."""
        with self._lock:
            self._drop_applied = n

    def fail_in_batch(
        self, user_id: str, message: str = "Email is invalid", *, shape: str = "errors"
    ) -> None:
        """In ``POST /contacts/batch``, leave this user's contact unapplied and report it in a
        2xx answer: ``shape="errors"`` lists ``{"user_id", "message"}`` under ``errors``;
        ``shape="entries"`` gives that contact's entry in ``contacts`` an ``errors`` list."""
        with self._lock:
            self._fail_in_batch[str(user_id)] = message
            self._batch_error_shape = shape

    def trickle_next(self, n: int, *, length: int = 1000, every: float = 1.0) -> None:
        """The next ``n`` answers are applied and announced with ``Content-Length: length``,
        then sent one byte per ``every`` seconds: an answer that never ends for a client
        that bounds each read, not the whole request."""
        with self._lock:
            self._trickle_next = n
            self._trickle = (length, every)

    def _take_trickle(self) -> tuple[int, float] | None:
        with self._lock:
            if self._trickle_next <= 0:
                return None
            self._trickle_next -= 1
            return self._trickle

    def fail_user(self, user_id: str, status: int = 422, message: str = "Email is invalid") -> None:
        with self._lock:
            self._fail_users[str(user_id)] = (status, message)

    def lose_then_refuse(
        self, user_id: str, status: int = 422, message: str = "Contact is locked"
    ) -> None:
        """The user's next contact request (alone or in a batch) is applied and its answer
        lost; every later one is refused (``status``), so a retry's refusal says nothing of
        what the first try did."""
        with self._lock:
            self._lose_then_refuse[str(user_id)] = (status, message)

    def refuse_events(self, user_id: str, n: int = 1) -> None:
        """Refuse (422) the user's next ``n`` ``POST /events``; their contacts go through."""
        with self._lock:
            self._refuse_events[str(user_id)] = n

    def fail_after(self, n: int, status: int, *, message: str = "Service unavailable") -> None:
        with self._lock:
            self._fail_after = n
            self._fail_after_status = status
            self._fail_after_message = message

    def answer_next(
        self, n: int, status: int, body: bytes, content_type: str = "text/plain"
    ) -> None:
        """Answer the next ``n`` requests ``status`` with exactly ``body`` (say a proxy's
        HTML page, or JSON of another shape) without applying them."""
        with self._lock:
            self._raw_next = [(status, _Raw(body, content_type))] * n

    def reset_faults(self) -> None:
        with self._lock:
            self._raw_next.clear()
            self._fail_next = 0
            self._redirect_next = 0
            self._drop_next = 0
            self._drop_applied = 0
            self._trickle_next = 0
            self._fail_users.clear()
            self._lose_then_refuse.clear()
            self._refuse_events.clear()
            self._fail_in_batch.clear()
            self._fail_after = None
            self._latency = 0.0
            self._rate_limit = None
            self._window.clear()

    # ---------------------------------------------------------------- handling

    def _answer(
        self, *, method: str, path: str, query: str, raw: bytes, authorization: str | None
    ) -> _Answer | None:
        """Decide the response for one request; None means drop the connection."""
        at = time.monotonic()
        body: Any = None
        bad_json = False
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True

        with self._lock:
            if self._drop_next > 0:
                self._drop_next -= 1
                self._log.append(RecordedRequest(method, path, body, 0, at, False, query))
                return None
            latency = self._latency
            self._in_flight += 1
        try:
            if latency > 0:
                time.sleep(latency)
        finally:
            with self._lock:
                self._in_flight -= 1

        with self._lock:
            answer = self._decide(method, path, query, body, bad_json, authorization)
            dropped = self._drop_applied > 0 and 200 <= answer[0] < 300
            if dropped:
                self._drop_applied -= 1
            self._log.append(RecordedRequest(method, path, body, answer[0], at, not dropped, query))
            return None if dropped else answer

    def _decide(
        self,
        method: str,
        path: str,
        query: str,
        body: Any,
        bad_json: bool,
        authorization: str | None,
    ) -> _Answer:
        if authorization != f"Bearer {self.api_key}":
            return 401, _errors("Unauthorized"), {}
        if self._raw_next:
            status, raw = self._raw_next.pop()
            return status, raw, {}
        if self._redirect_next > 0:
            self._redirect_next -= 1
            return self._redirect_status, None, {"Location": self._redirect_location}
        if self._fail_next > 0:
            self._fail_next -= 1
            headers: _Headers = {}
            if self._fail_next_retry_after is not None:
                headers["Retry-After"] = self._fail_next_retry_after
            return self._fail_next_status, _errors(self._fail_next_message), headers
        if self._rate_limit is not None:
            now = time.monotonic()
            while self._window and self._window[0] <= now - 1.0:
                self._window.popleft()
            if len(self._window) >= max(1, math.floor(self._rate_limit)):
                wait = max(1, math.ceil(self._window[0] + 1.0 - now))
                return 429, _errors("Too many requests"), {"Retry-After": str(wait)}
            self._window.append(now)
        if self._fail_after is not None and self._fail_after <= 0:
            return self._fail_after_status, _errors(self._fail_after_message), {}
        for uid in self._user_ids(body, query):
            if uid in self._fail_users:
                status, message = self._fail_users[uid]
                return status, _errors(message), {}
            if path == "/events" and self._refuse_events.get(uid, 0) > 0:
                self._refuse_events[uid] -= 1
                return 422, _errors("Event refused"), {}
        if bad_json:
            return 400, _errors("Invalid JSON"), {}
        try:
            result = self._route(method, path, query, body)
        except _ApiError as err:
            return err.status, _errors(err.message), {}
        writes = method == "POST" and path.startswith("/contacts")
        for uid in self._user_ids(body, query) if writes else ():
            if uid in self._lose_then_refuse:  # applied: its answer is lost, the rest refused
                self._fail_users[uid] = self._lose_then_refuse.pop(uid)
                self._drop_applied += 1
                break
        if self._fail_after is not None:
            self._fail_after -= 1
        return 200, result, {}

    @staticmethod
    def _user_ids(body: Any, query: str) -> list[str]:
        ids = [str(v) for v in parse_qs(query).get("user_id", [])]
        items: list[Any] = [body]
        if isinstance(body, dict) and isinstance(body.get("contacts"), list):
            items.extend(body["contacts"])
        for item in items:
            if isinstance(item, dict) and item.get("user_id") is not None:
                ids.append(str(item["user_id"]))
        return ids

    def _route(self, method: str, path: str, query: str, body: Any) -> Any:
        path = path.rstrip("/") or "/"
        if path == "/contacts" and method == "POST":
            return {"contact": self._upsert(self._validate_contact(body))}
        if path == "/contacts/batch" and method == "POST":
            items = body.get("contacts") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise _ApiError(400, "contacts must be a list")
            valid = [self._validate_contact(item) for item in items]
            refused = [self._fail_in_batch.get(str(item["user_id"])) for item in valid]
            applied = [
                self._upsert(item)
                if error is None
                else {"user_id": item["user_id"], "errors": [{"message": error}]}
                for item, error in zip(valid, refused, strict=True)
            ]
            if self._batch_error_shape == "entries" or not any(refused):
                return {"contacts": applied}
            return {
                "contacts": [c for c, error in zip(applied, refused, strict=True) if error is None],
                "errors": [
                    {"user_id": item["user_id"], "message": error}
                    for item, error in zip(valid, refused, strict=True)
                    if error is not None
                ],
            }
        if path == "/contacts" and method == "GET":
            params = parse_qs(query)
            user_id = params.get("user_id", [None])[0]
            email = params.get("email", [None])[0]
            if user_id is None and email is None:
                return self._page(params)
            found = self._find(user_id, email)
            if found is None:
                raise _ApiError(404, "Not found")
            return {"contact": self._public(found)}
        if path == "/events" and method == "POST":
            if not isinstance(body, dict) or not body.get("event_name"):
                raise _ApiError(400, "event_name is required")
            _valid_email(body)
            event = {"id": len(self._events) + 1, **body}
            self._events.append(event)
            return {"event": dict(event)}
        raise _ApiError(404, "Not found")

    def _page(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """``GET /contacts?page=N&per_page=P``: contacts in creation order, ``per_page``
        capped at ``MAX_PER_PAGE``; ``pages.next`` names the next page while there is one."""
        try:
            page = max(1, int(params.get("page", ["1"])[0]))
            per_page = int(params.get("per_page", [str(DEFAULT_PER_PAGE)])[0])
        except ValueError:
            raise _ApiError(400, "page and per_page must be numbers") from None
        per_page = min(max(1, per_page), MAX_PER_PAGE)
        total = len(self._order)
        ids = self._order[(page - 1) * per_page : page * per_page]
        total_pages = -(-total // per_page)
        return {
            "contacts": [self._public(self._contacts[i]) for i in ids],
            "pages": {
                "page": page,
                "per_page": per_page,
                "total_count": total,
                "total_pages": total_pages,
                "next": (
                    f"/contacts?page={page + 1}&per_page={per_page}" if page < total_pages else None
                ),
            },
        }

    @staticmethod
    def _validate_contact(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _ApiError(400, "Body must be a JSON object")
        user_id = body.get("user_id")
        email = _valid_email(body)
        if (user_id is None or user_id == "") and not email:
            raise _ApiError(400, "user_id or email is required")
        props = body.get("custom_properties", {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise _ApiError(400, "custom_properties must be an object")
        return {
            "user_id": None if user_id is None or user_id == "" else str(user_id),
            "email": email or None,
            "custom_properties": props,
        }

    def _find(self, user_id: str | None, email: str | None) -> dict[str, Any] | None:
        # Indexed, so a fake holding millions of contacts (benchmarks) answers in O(1); the
        # answers are those of scanning the contacts in creation order.
        if user_id is not None and user_id in self._by_user:
            return self._contacts[self._by_user[user_id]]
        if email:
            for contact_id in self._by_email.get(email, ()):
                contact = self._contacts[contact_id]
                if user_id is None or contact["user_id"] is None:
                    return contact
        return None

    def _upsert(self, item: dict[str, Any]) -> dict[str, Any]:
        contact = self._find(item["user_id"], item["email"])
        if contact is None:
            contact = {"id": self._next_id, "user_id": None, "email": None, "custom_properties": {}}
            self._contacts[self._next_id] = contact
            self._order.append(self._next_id)
            self._next_id += 1
        if item["user_id"] is not None and contact["user_id"] is None:
            self._by_user.setdefault(item["user_id"], contact["id"])
        if item["user_id"] is not None:
            contact["user_id"] = item["user_id"]
        if item["email"] and item["email"] != contact["email"]:
            if contact["email"]:
                self._by_email[contact["email"]].remove(contact["id"])
            bisect.insort(self._by_email.setdefault(item["email"], []), contact["id"])
            contact["email"] = item["email"]
        contact["custom_properties"].update(item["custom_properties"])
        return self._public(contact)

    @staticmethod
    def _public(contact: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": contact["id"],
            "user_id": contact["user_id"],
            "email": contact["email"],
            "custom_properties": dict(contact["custom_properties"]),
        }


def _valid_email(body: dict[str, Any]) -> str | None:
    """The body's email, if it has one; an email that is there but no address (empty, not
    text, no ``@``) is refused, as a strict Gist would (what it does is not documented)."""
    if "email" not in body or body["email"] is None:
        return None
    email = body["email"]
    if not isinstance(email, str) or not EMAIL.fullmatch(email):
        raise _ApiError(400, f"email is invalid: {email!r}")
    return email


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(gist: FakeGist, ready: Callable[[FakeGist], None]) -> None:
    """Serve ``gist`` in the foreground until Ctrl-C or SIGTERM; ``ready`` is called once it
    listens. ``OSError`` when it cannot bind (a port in use)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)  # as cleanly on SIGTERM as on Ctrl-C
    try:
        with contextlib.suppress(KeyboardInterrupt), gist:
            ready(gist)
            threading.Event().wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """``python -m audience_sync.fakegist``: the fake with its fault knobs, for benchmarks."""
    parser = argparse.ArgumentParser(description="Serve a fake Gist API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    args = parser.parse_args(argv)
    gist = FakeGist(args.api_key, port=args.port)
    gist.latency = args.latency
    gist.rate_limit = args.rate_limit
    serve(gist, lambda served: print(served.url, flush=True))
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
