"""The pages: routes over ``history``, ``pages`` and ``workers``, rendered by Jinja2 with
autoescape, behind a guard that adds basic auth (when a password is set), a Host check and
the security headers. GET and HEAD only; every error is a page, never a traceback."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audience_sync import __version__
from audience_sync.db import describe_error
from audience_sync.errors import StateError
from audience_sync.history import CHANGE_FILTERS, ChangeFilter, load_changes, load_run, load_runs
from audience_sync.pages import (
    load_audience,
    load_audience_keys,
    load_growth,
    load_rate_limits,
    load_user,
)
from audience_sync.statuses import DRY_RUN_KINDS, RUN_STATUSES, RunKind
from audience_sync.web.charts import growth_chart
from audience_sync.workers import list_workers

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
RUNS_PER_PAGE = 50
CHANGES_PER_PAGE = 100
ROWS_PER_RUN = 100  # rejected rows and email conflicts shown on a run's page (the first)
AUDIENCE_RECENT_RUNS = 20
MAX_ID = 2**63 - 1  # the largest id a database column holds; past it, no such run
MAX_PAGE = 1_000_000
NO_VALUE = "\N{EN DASH}"
RUN_KINDS: tuple[RunKind, ...] = (
    "run", "backfill", "retire", "dry-run", "backfill-dry-run", "retire-dry-run",
    "reconcile", "dry-reconcile",
)  # fmt: skip
STORED_STATUSES = tuple(s for s in RUN_STATUSES if s != "skipped")  # skipped is never stored
RUN_FIELDS = (
    "audience_key", "kind", "status", "started_at", "finished_at", "source_rows", "members",
    "entered", "exited", "resent", "delivered", "failed", "rejected", "email_conflicts",
    "fast_path",
)  # fmt: skip
# No script, no frame, nothing from elsewhere: the pages work offline, and a value that
# escaped escaping still could not run.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def create_app(
    engine: Engine,
    *,
    password: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    requests_per_second: float | None = None,
) -> ASGIApp:
    """The pages over the state database ``engine`` (make it read-only:
    ``web.state.read_only_engine``). ``password``: HTTP basic auth (any user name).
    ``allowed_hosts``: the Host names accepted (None: any), so that a page on a loopback
    address cannot be read by another site through DNS rebinding."""
    templates = Jinja2Templates(env=_environment())
    pages = Pages(engine, templates, requests_per_second)
    routes = [
        Route("/", pages.runs, methods=["GET"]),
        Route("/runs/{run_id:int}", pages.run, methods=["GET"]),
        Route("/audiences/{key}", pages.audience, methods=["GET"]),
        Route("/users", pages.find_user, methods=["GET"]),
        Route("/users/{user_id:path}", pages.user, methods=["GET"]),
        Route("/workers", pages.workers, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: pages.http_error,
            StateError: pages.state_error,
            SQLAlchemyError: pages.state_error,
            Exception: pages.server_error,
        },
    )
    return Guard(app, password=password, allowed_hosts=allowed_hosts)


def _environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template is HTML: every value is escaped
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(when=_when, value=_value, number=_number, segment=_segment)
    environment.globals.update(version=__version__, dry_kinds=set(DRY_RUN_KINDS.values()))
    return environment


class Pages:
    """The routes' endpoints: parse the request, ask the queries, render a template."""

    def __init__(
        self, engine: Engine, templates: Jinja2Templates, requests_per_second: float | None
    ) -> None:
        self.engine = engine
        self.templates = templates
        self.requests_per_second = requests_per_second

    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> Response:
        context["base"] = request.scope.get("root_path", "")
        context["query"] = _query_builder(request)
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    def runs(self, request: Request) -> Response:
        audience = _choice(request, "audience", None)
        kind = _choice(request, "kind", RUN_KINDS)
        status = _choice(request, "status", STORED_STATUSES)
        page = _page(request)
        found = load_runs(
            self.engine,
            audience,
            RUNS_PER_PAGE + 1,
            status=status,  # type: ignore[arg-type]  # checked against STORED_STATUSES
            kind=kind,  # type: ignore[arg-type]  # checked against RUN_KINDS
            offset=(page - 1) * RUNS_PER_PAGE,
        )
        return self.render(
            request,
            "runs.html",
            runs=found[:RUNS_PER_PAGE],
            more=len(found) > RUNS_PER_PAGE,
            page=page,
            keys=load_audience_keys(self.engine),
            kinds=RUN_KINDS,
            statuses=STORED_STATUSES,
            audience=audience,
            kind=kind,
            status=status,
        )

    def run(self, request: Request) -> Response:
        run_id: int = request.path_params["run_id"]
        which = cast(ChangeFilter, _choice(request, "changes", CHANGE_FILTERS) or "all")
        after = _after(request)
        found = (
            load_run(self.engine, run_id, ROWS_PER_RUN, changes=False) if run_id <= MAX_ID else None
        )
        if found is None:
            raise HTTPException(404, f"There is no run {run_id} in the history.")
        page = load_changes(self.engine, run_id, which, after, CHANGES_PER_PAGE)
        return self.render(
            request,
            "run.html",
            run=found,
            changes=page,
            fields=RUN_FIELDS,
            which=which,
            filters=CHANGE_FILTERS,
            after=after,
            rows_shown=ROWS_PER_RUN,
        )

    def audience(self, request: Request) -> Response:
        key: str = request.path_params["key"]
        state = load_audience(self.engine, key)
        if state is None:
            raise HTTPException(404, f"There is no audience or trait {key!r} in the history.")
        return self.render(
            request,
            "audience.html",
            audience=state,
            chart=growth_chart(load_growth(self.engine, key)),
            runs=load_runs(self.engine, key, AUDIENCE_RECENT_RUNS),
        )

    def find_user(self, request: Request) -> Response:
        user_id = request.query_params.get("user_id", "").strip()
        if not user_id:
            raise HTTPException(400, "Give a user id to look for.")
        base = request.scope.get("root_path", "")
        return RedirectResponse(f"{base}/users/{_segment(user_id)}", status_code=303)

    def user(self, request: Request) -> Response:
        user_id: str = request.path_params["user_id"]
        found = load_user(self.engine, user_id)
        if found is None:
            raise HTTPException(404, f"There is no user {user_id!r} in the history.")
        return self.render(request, "user.html", user=found)

    def workers(self, request: Request) -> Response:
        return self.render(
            request,
            "workers.html",
            workers=list_workers(self.engine),
            rate_limits=load_rate_limits(self.engine),
            requests_per_second=self.requests_per_second,
        )

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = exc.detail if exc.status_code != 405 else "This page only reads: GET it."
        response = self.render(
            request, "error.html", exc.status_code, code=exc.status_code, message=detail
        )
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def state_error(self, request: Request, exc: Exception) -> Response:
        # The first line of the database's error only: never its SQL, its bound parameters
        # (members' emails) or the state URL.
        cause = exc.__cause__ if isinstance(exc, StateError) and exc.__cause__ else exc
        log.warning("state database error on %s: %s", request.url.path, describe_error(cause))
        return self.render(
            request,
            "error.html",
            503,
            code=503,
            message=f"The state database cannot be read right now ({describe_error(cause)}).",
        )

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return self.render(
            request, "error.html", 500, code=500, message="Something went wrong on this page."
        )


def _choice(request: Request, name: str, allowed: Iterable[str] | None) -> str | None:
    """A filter's value from the query string; None when absent or empty; a 400 page when
    it is not one of ``allowed``."""
    value = request.query_params.get(name) or None
    if value is not None and allowed is not None and value not in allowed:
        raise HTTPException(400, f"{name} must be one of: {', '.join(allowed)}.")
    return value


def _page(request: Request) -> int:
    text = request.query_params.get("page") or "1"
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise HTTPException(400, f"page must be a whole number from 1 to {MAX_PAGE:,}.")
    return int(text)


def _after(request: Request) -> int | None:
    """Where a page of changes starts: after the change with this id."""
    text = request.query_params.get("after") or None
    if text is not None and (not text.isdigit() or int(text) > MAX_ID):
        raise HTTPException(400, "after must be a change id.")
    return None if text is None else int(text)


def _query_builder(request: Request) -> Callable[..., str]:
    """``query(page=2)``: this page's query string with some parameters changed (None or
    an empty string drops one; so does page 1)."""

    def query(**changes: Any) -> str:
        params = {**request.query_params, **changes}
        kept = {
            k: str(v) for k, v in params.items() if v not in (None, "") and (k, v) != ("page", 1)
        }
        return "?" + urlencode(kept) if kept else "?"

    return query


def _when(value: str | None) -> str:
    """``2026-12-01T03:01:02.123Z`` → ``2026-12-01 03:01:02``."""
    if not value:
        return NO_VALUE
    return value.replace("T", " ")[:19]


def _value(value: Any) -> str:
    """A property value as JSON spells it: ``true``, ``"gold"``, ``null``."""
    return json.dumps(value, ensure_ascii=False)


def _number(value: int | None) -> str:
    return NO_VALUE if value is None else f"{value:,}"


def _segment(value: str) -> str:
    """``value`` as one path segment: a user id may hold ``/``, ``?``, ``#``."""
    return quote(str(value), safe="")


class Guard:
    """ASGI middleware in front of every page: the Host check, basic auth and the security
    headers, plus ``Server-Timing`` (the time the page took on the server)."""

    def __init__(
        self, app: ASGIApp, *, password: str | None, allowed_hosts: Iterable[str] | None
    ) -> None:
        self.app = app
        self.password = password
        self.allowed_hosts = None if allowed_hosts is None else set(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None and _host(headers) not in self.allowed_hosts:
            await _plain(send, 400, "unknown Host header")
            return
        if self.password is not None and not self._authorized(headers):
            await _plain(
                send,
                401,
                "a password is needed",
                {"www-authenticate": 'Basic realm="audience-sync", charset="UTF-8"'},
            )
            return
        started = time.perf_counter()
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = {
                    **SECURITY_HEADERS,
                    # The pages show members' emails: no cache keeps a copy.
                    "cache-control": "public, max-age=3600" if static else "no-store",
                    "server-timing": f"app;dur={(time.perf_counter() - started) * 1000:.1f}",
                }
                kept = [(k, v) for k, v in message["headers"] if k.decode() not in extra]
                message["headers"] = kept + [(k.encode(), v.encode()) for k, v in extra.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        assert self.password is not None
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _user, _, given = decoded.partition(":")
        return hmac.compare_digest(given.encode(), self.password.encode())


def _host(headers: Mapping[str, str]) -> str:
    """The Host header's name without its port (``[::1]:8000`` → ``::1``)."""
    host = headers.get("host", "")
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def _plain(
    send: Send, status: int, text: str, headers: Mapping[str, str] | None = None
) -> None:
    body = f"{status}: {text}\n".encode()
    extra = {**SECURITY_HEADERS, **(headers or {})}
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *((k.encode(), v.encode()) for k, v in extra.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
