"""The pages over HTTP, on SQLite and PostgreSQL: what each shows, 404s, escaping, writes
refused (by the routes and by the database), no secret, the bind rule and basic auth.

One history per store, made by real runs against the fake Gist, served once per module by
uvicorn on loopback; every test only reads it."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from audience_sync.cli import run_cli
from audience_sync.models import audiences, memberships, sync_runs
from audience_sync.web import PASSWORD_ENV
from audience_sync.web.app import create_app
from audience_sync.web.serve import background, check_bind, is_loopback
from audience_sync.web.state import read_only_engine
from tests.conftest import EXECUTABLE, assert_no_traceback
from tests.helpers import SCRIPT_USER, History, build_history, free_port, fresh_state_url

API_KEY = "web-key-SECRET-5678"
PAGE_PASSWORD = "pages-SECRET-pw"
ANYWHERE = "0.0.0.0"  # noqa: S104 - the address the bind rule guards
# On one pytest-xdist worker: one served history per store for the module, built once.
pytestmark = pytest.mark.xdist_group("web")


@dataclass(frozen=True)
class Served:
    history: History
    engine: Engine
    client: httpx.Client


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One history per store, served read-only on 127.0.0.1 for the whole module."""
    folder = tmp_path_factory.mktemp(f"web-{request.param}")
    with fresh_state_url(request.param, folder) as url:
        history = build_history(folder, url, API_KEY)
        engine = read_only_engine(url)
        try:
            with (
                background(create_app(engine, requests_per_second=1000)) as base,
                httpx.Client(base_url=base, timeout=10) as client,
            ):
                yield Served(history, engine, client)
        finally:
            engine.dispose()


def get(served: Served, path: str, status: int = 200) -> str:
    answer = served.client.get(path)
    assert answer.status_code == status, (path, answer.status_code, answer.text[:500])
    assert answer.headers["content-type"].startswith("text/html")
    assert_no_traceback(answer.text)
    return answer.text


def rows(page: str, table_id: str) -> list[str]:
    """The text of each body row of the table with ``table_id``, tags stripped."""
    table = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    return [
        " ".join(re.sub(r"<[^>]+>", " ", row).split())
        for row in body.split("</tr>")
        if "<td" in row
    ]


def test_runs_page_lists_every_run_newest_first(served: Served) -> None:
    h = served.history
    listed = rows(get(served, "/"), "runs")
    assert [int(r.split()[0]) for r in listed] == sorted(
        [*h.first.values(), *h.second.values(), h.dry], reverse=True
    )
    first_vip = next(r for r in listed if r.startswith(f"{h.first['vip_customers']} "))
    # run, audience, kind, status, started, members, entered, exited, delivered, failed,
    # rejected: u5 refused, one row rejected.
    assert first_vip.split()[1:4] == ["vip_customers", "run", "partial"]
    assert first_vip.split()[-6:] == ["6", "6", "0", "5", "1", "1"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=partial", lambda h: {h.first["vip_customers"], h.first["newsletter_b_fans_b"]}),
        ("kind=dry-run", lambda h: {h.dry}),
        ("audience=plan", lambda h: {h.first["plan"], h.second["plan"]}),
        (
            "audience=vip_customers&kind=run",
            lambda h: {h.first["vip_customers"], h.second["vip_customers"]},
        ),
        ("audience=nothing_like_it", lambda h: set()),
    ],
    ids=["status", "kind", "audience", "audience-and-kind", "unknown-audience"],
)
def test_runs_page_filters(served: Served, query: str, expected: object) -> None:
    page = get(served, f"/?{query}")
    want = expected(served.history)  # type: ignore[operator]
    found = {int(r.split()[0]) for r in rows(page, "runs")} if want else set()
    assert found == want
    if not want:
        assert "No runs match." in page


def test_runs_page_pages(served: Served) -> None:
    from audience_sync.web import app

    total = len(rows(get(served, "/"), "runs"))
    assert total < app.RUNS_PER_PAGE  # the whole history fits: page 2 is empty
    page = get(served, "/?page=2")
    assert "No runs match." in page
    assert 'rel="prev" href="?"' in page


@pytest.mark.parametrize(
    "query",
    ["status=bogus", "kind=<b>", "page=0", "page=x", "page=99999999999"],
    ids=["status", "kind", "page-zero", "page-text", "page-huge"],
)
def test_bad_filters_are_400_pages(served: Served, query: str) -> None:
    page = get(served, f"/?{query}", 400)
    assert "<b>" not in page.split("<main>", 1)[1]


def test_run_page_shows_figures_changes_and_rejected_rows(served: Served) -> None:
    run_id = served.history.first["vip_customers"]
    page = get(served, f"/runs/{run_id}")
    assert f"Run {run_id}" in page
    assert 'data-field="status">partial' in page
    changes = rows(page, "change-rows")
    assert len(changes) == 6
    # Failed first, with Gist's answer; then by user.
    assert changes[0].startswith("u5 u5@example.com vip_customers = true failed")
    assert "422 HTTP 422: Email is invalid" in changes[0]
    # (user ids as text: "<" sorts before "u")
    assert [c.split()[0] for c in changes[1:]] == [
        "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;", "u1", "u2", "u3", "u4",
    ]  # fmt: skip
    (rejected,) = rows(page, "rejected-rows")
    assert rejected.startswith("7 u9 not-an-email")
    assert "email" in rejected


@pytest.mark.parametrize(
    ("which", "users"),
    [("entered", ["u5", "u7"]), ("exited", ["u4"]), ("failed", []), ("all", ["u5", "u7", "u4"])],
    ids=["entered", "exited", "failed", "all"],
)
def test_run_page_filters_changes(served: Served, which: str, users: list[str]) -> None:
    run_id = served.history.second["vip_customers"]
    page = get(served, f"/runs/{run_id}?changes={which}")
    found = [r.split()[0] for r in rows(page, "change-rows")] if users else []
    assert sorted(found) == sorted(users)
    if not users:
        assert f"No {which} changes" in page


def test_dry_run_page_says_what_would_have_been_sent(served: Served) -> None:
    page = get(served, f"/runs/{served.history.dry}")
    assert "Would have sent (dry run: nothing was sent)" in page
    (change,) = rows(page, "change-rows")
    assert change.startswith("u8 u8@example.com vip_customers = true planned")


def test_trait_run_shows_values_as_json(served: Served) -> None:
    page = get(served, f"/runs/{served.history.second['plan']}")
    changes = sorted(rows(page, "change-rows"))
    assert changes[0].startswith("u1 u1@example.com plan = &#34;platinum&#34; delivered")
    assert changes[1].startswith("u2 u2@example.com plan = null delivered")


def test_audience_page_counts_charts_and_lists_runs(served: Served) -> None:
    h = served.history
    page = get(served, "/audiences/vip_customers")
    assert 'data-count="acknowledged">6<' in page  # u1 u2 u3 u5 u7 and the script user
    assert 'data-count="uncertain">0<' in page
    assert 'data-count="owed_changes">0<' in page
    assert '<svg id="growth-chart"' in page
    assert page.count('class="dot"') == 2  # two real runs; the dry run changed nothing
    assert page.count('class="entered"') == 2
    assert page.count('class="exited"') == 1
    assert [int(r.split()[0]) for r in rows(page, "audience-runs")] == [
        h.dry, h.second["vip_customers"], h.first["vip_customers"]
    ]  # fmt: skip


def test_audience_named_with_markup_is_shown_as_text(served: Served) -> None:
    page = get(served, "/audiences/newsletter_b_fans_b")
    assert "Newsletter &lt;b&gt;Fans&lt;/b&gt;" in page
    assert "<b>Fans" not in page


def test_trait_page_counts_users_holding_a_value(served: Served) -> None:
    page = get(served, "/audiences/plan")
    assert 'data-count="acknowledged">1<' in page  # u1 platinum; u2's is null now
    assert "holding a value" in page


def test_user_page_says_why_a_user_holds_a_value(served: Served) -> None:
    h = served.history
    page = get(served, "/users/u5")
    holdings = {r.split()[0]: r for r in rows(page, "holdings")}
    assert holdings["vip_customers"].startswith("vip_customers true acknowledged by Gist")
    assert holdings["vip_customers"].endswith(str(h.second["vip_customers"]))
    changes = rows(page, "user-changes")
    # Newest first: delivered by the second runs, refused by the first.
    assert [c.split()[0] for c in changes] == [
        str(h.second["newsletter_b_fans_b"]), str(h.second["vip_customers"]),
        str(h.first["newsletter_b_fans_b"]), str(h.first["vip_customers"]),
    ]  # fmt: skip
    assert "HTTP 422: Email is invalid" in changes[-1]
    assert 'id="contact-email">u5@example.com<' in page


def test_user_page_shows_exits_and_trait_values(served: Served) -> None:
    holdings = {r.split()[0]: r for r in rows(get(served, "/users/u4"), "holdings")}
    assert holdings["vip_customers"].startswith("vip_customers false acknowledged by Gist (left)")
    assert holdings["newsletter_b_fans_b"].startswith("newsletter_b_fans_b true")
    u2 = {r.split()[0]: r for r in rows(get(served, "/users/u2"), "holdings")}
    assert u2["plan"].startswith("plan null acknowledged by Gist")  # Gist holds null
    u1 = {r.split()[0]: r for r in rows(get(served, "/users/u1"), "holdings")}
    assert u1["plan"].startswith("plan &#34;platinum&#34; acknowledged by Gist")


def test_user_id_with_markup_is_escaped(served: Served) -> None:
    page = get(served, f"/users/{quote(SCRIPT_USER, safe='')}")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in page
    # An unknown one is a 404 page that names it, escaped too.
    missing = get(served, "/users/%3Cscript%3Ealert(1)%3C%2Fscript%3E", 404)
    assert "<script>" not in missing
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in missing


def test_find_user_form_redirects_to_the_user_page(served: Served) -> None:
    answer = served.client.get("/users", params={"user_id": " u7 "})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/users/u7"
    answer = served.client.get("/users", params={"user_id": "a/b?c#d"})
    assert answer.headers["location"] == "/users/a%2Fb%3Fc%23d"


def test_workers_page_lists_workers_and_the_shared_rate_limit(served: Served) -> None:
    page = get(served, "/workers")
    workers = rows(page, "workers")
    assert len(workers) == 3  # one per run_once
    assert all(" stopped run " in w for w in workers)
    (limit,) = rows(page, "rate-limits")
    assert "idle" in limit
    assert "1000" in page  # this config's budget


@pytest.mark.parametrize(
    "path",
    [
        "/runs/999999",
        "/runs/99999999999999999999999",
        "/runs/abc",
        "/runs/-1",
        "/audiences/nothing_like_it",
        "/users/nobody",
        "/nowhere",
        "/static/nothing.css",
    ],
    ids=["run", "run-past-int64", "run-text", "run-negative", "audience", "user", "page", "static"],
)
def test_unknown_ids_are_404_pages(served: Served, path: str) -> None:
    answer = served.client.get(path)
    assert answer.status_code == 404
    assert_no_traceback(answer.text)
    if not path.startswith("/static/"):
        assert "Not found" in answer.text


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize(
    "path", ["/", "/runs/1", "/audiences/vip_customers", "/users/u1", "/workers", "/users"]
)
def test_writes_are_refused(served: Served, method: str, path: str) -> None:
    answer = served.client.request(method, path, data={"status": "succeeded"})
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert_no_traceback(answer.text)


def test_the_engine_cannot_write(served: Served) -> None:
    # Read-only by construction: the database itself refuses, whatever a page would ask.
    with served.engine.connect() as connection:
        before = connection.scalar(select(func.count()).select_from(memberships))
    for statement in (
        sync_runs.update().values(status="succeeded"),
        memberships.delete(),
        audiences.insert().values(key="x", name="x", source="x"),
    ):
        with pytest.raises(DBAPIError, match=r"read-only|readonly"), served.engine.begin() as c:
            c.execute(statement)
    with pytest.raises(DBAPIError, match=r"read-only|readonly"), served.engine.begin() as c:
        c.execute(text("CREATE TABLE intruder (id INTEGER)"))
    with served.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(memberships)) == before


def test_no_secret_on_any_page(served: Served) -> None:
    # Every page a link reaches, from the start page: none carries the API key (nor any
    # page's markup a script).
    seen: set[str] = set()
    todo = ["/"]
    while todo and len(seen) < 200:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        answer = served.client.get(path)
        assert answer.status_code == 200, path
        body = answer.text
        assert API_KEY not in body, path
        assert "SECRET" not in body, path
        assert "<script" not in body, path
        if answer.headers["content-type"].startswith("text/html"):
            for link in re.findall(r'href="([^"]+)"', body):
                target = urljoin(path, link.replace("&amp;", "&"))
                if urlsplit(target).path and not target.startswith("http"):
                    todo.append(target.split("#")[0])
    assert {"/workers", "/audiences/plan", "/users/u7", "/static/style.css?v=0.1.0"} <= seen


def test_security_headers(served: Served) -> None:
    answer = served.client.get("/")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src" not in policy
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-frame-options"] == "DENY"
    assert float(answer.headers["server-timing"].split("dur=")[1]) >= 0


# --------------------------------------------------------------- guard, bind rule, CLI


@contextlib.contextmanager
def guarded(engine: Engine, **options: object) -> Iterator[httpx.Client]:
    """The pages with other options than ``served``'s, on their own server."""
    with (
        background(create_app(engine, **options)) as base,  # type: ignore[arg-type]
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        yield client


def test_basic_auth_when_a_password_is_set(served: Served) -> None:
    with guarded(served.engine, password=PAGE_PASSWORD) as client:
        answer = client.get("/")
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Basic ")
        assert client.get("/", auth=("anyone", "wrong")).status_code == 401
        assert client.get("/", headers={"authorization": "Basic %%%"}).status_code == 401
        assert client.get("/", auth=("anyone", PAGE_PASSWORD)).status_code == 200
        token = base64.b64encode(f"x:{PAGE_PASSWORD}".encode()).decode()
        assert client.get(
            "/static/style.css", headers={"authorization": f"Basic {token}"}
        ).is_success


def test_host_check_stops_dns_rebinding(served: Served) -> None:
    with guarded(served.engine, allowed_hosts={"127.0.0.1", "localhost"}) as client:
        assert client.get("/").status_code == 200
        assert client.get("/", headers={"host": "localhost:1234"}).status_code == 200
        assert client.get("/", headers={"host": "evil.example"}).status_code == 400


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
     ("[::1]", True), (ANYWHERE, False), ("::", False), ("192.168.1.5", False),
     ("example.com", False)],
    ids=str,
)  # fmt: skip
def test_bind_rule(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    check_bind(host, "pw")
    if loopback:
        check_bind(host, None)
    else:
        with pytest.raises(Exception, match=PASSWORD_ENV):
            check_bind(host, None)


def test_ui_refuses_another_address_without_a_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    port = free_port()
    code = run_cli(
        ["ui", "--host", ANYWHERE, "--port", str(port), "--config", str(tmp_path / "none.toml")]
    )
    _out, err = capsys.readouterr()
    assert code == 2
    assert "refusing to serve the history on 0.0.0.0" in err
    assert PASSWORD_ENV in err
    assert_no_traceback(err)
    monkeypatch.setenv(PASSWORD_ENV, "")  # empty is no password
    assert run_cli(["ui", "--host", ANYWHERE, "--config", str(tmp_path / "x.toml")]) == 2


def test_ui_never_creates_a_state_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "audience_sync.toml"
    config.write_text(
        '[state]\nurl = "sqlite:///state.db"\n[gist]\napi_key = "k"\n'
        '[[audiences]]\nname = "VIP"\nfile = "vip.csv"\n'
    )
    assert run_cli(["ui", "--port", "0", "--config", str(config)]) == 2
    assert "no state database at" in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()


def test_state_file_gone_is_a_503_page(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("gone")
    url = f"sqlite:///{folder / 'state.db'}"
    from audience_sync import db

    writer = db.make_engine(url)
    db.upgrade(writer)
    writer.dispose()
    engine = read_only_engine(url)
    try:
        with guarded(engine) as client:
            assert client.get("/").status_code == 200
            (folder / "state.db").unlink()
            answer = client.get("/")
            assert answer.status_code == 503
            assert "The state database cannot be read right now" in answer.text
            assert_no_traceback(answer.text)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_ui_command_serves_and_stops_on_sigterm(served: Served) -> None:
    # As a user runs it beside the daemon: the installed command, its own process.
    port = free_port()
    env = {**os.environ, PASSWORD_ENV: PAGE_PASSWORD, "GIST_API_KEY": API_KEY}
    process = subprocess.Popen(
        [EXECUTABLE, "ui", "--host", ANYWHERE, "--port", str(port),
         "--config", str(served.history.config_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.get(base + "/", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert answer.status_code == 401
        answer = httpx.get(base + "/workers", auth=("me", PAGE_PASSWORD), timeout=5)
        assert answer.status_code == 200
        assert API_KEY not in answer.text
        assert PAGE_PASSWORD not in answer.text
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert f"serving the history at http://0.0.0.0:{port} (read-only, basic auth)" in out
    assert_no_traceback(err)


@pytest.mark.parametrize("scan", [None, 3], ids=["whole-run", "window-of-3"])
@pytest.mark.parametrize("which", ["all", "entered", "failed"])
def test_changes_page_by_index_through_every_change(
    served: Served, which: str, scan: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two at a time, each page a seek after the last one's id: every change once, failed
    # first, then by status and user id; a filter's window that ends early is continued.
    from audience_sync import history
    from audience_sync.history import load_changes

    if scan is not None:
        monkeypatch.setattr(history, "SCAN_ROWS", scan)

    run_id = served.history.first["vip_customers"]
    seen: list[tuple[str, str]] = []
    after = None
    while True:
        page = load_changes(served.engine, run_id, which, after, limit=2)  # type: ignore[arg-type]
        seen += [(c["status"], c["user_id"]) for c in page.changes]
        if page.next_after is None:
            break
        after = page.next_after
    failed = [("failed", "u5")]
    delivered = sorted(("delivered", u) for u in [SCRIPT_USER, "u1", "u2", "u3", "u4"])
    assert seen == (failed if which == "failed" else failed + delivered)
    # The web's next link carries the cursor.
    first = get(
        served, f"/runs/{run_id}?after={load_changes(served.engine, run_id, limit=1).next_after}"
    )
    assert len(rows(first, "change-rows")) == 5
    assert "← first changes" in first


def test_pages_run_as_a_select_only_role(served: Served) -> None:
    # The GRANTs of docs/ui.md are enough: every page answers as a role that may only SELECT.
    url = served.history.state_url
    if not url.startswith("postgresql"):
        return  # roles and GRANTs are PostgreSQL's; SQLite is read-only by query_only
    schema = re.search(r"search_path%3D(\w+)", url).group(1)  # type: ignore[union-attr]
    role = f"pages_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url.split("?")[0], poolclass=NullPool)
    with admin.begin() as connection:
        for statement in (
            f"CREATE ROLE {role} LOGIN",
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}",
        ):
            connection.execute(text(statement))
    as_role = url.replace("://postgres@", f"://{role}@").replace("://root@", f"://{role}@")
    engine = read_only_engine(as_role)
    try:
        with guarded(engine) as client:
            for path in ("/", "/runs/1", "/audiences/vip_customers", "/users/u5", "/workers"):
                assert client.get(path).status_code == 200, path
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))
        admin.dispose()
