"""The pages in a real browser: Debian's headless Chromium driven by Selenium over a history
made by real runs against the fake Gist. Each page renders its facts, links and filters
navigate, the chart is drawn, nothing comes from elsewhere, and each page is saved as a
screenshot (``build/screenshots/``, or ``$AUDIENCE_SYNC_SCREENSHOTS``; docs/ui.md's come
from here).

One browser and one served history for the whole module; each test opens its own page.
Skips, saying why, where Chromium or its driver is not installed (``.ci/run`` installs both
and sets ``AUDIENCE_SYNC_REQUIRE_BROWSER``, which turns that skip into a failure).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait
from sqlalchemy import Engine

from audience_sync import db
from audience_sync.web.app import create_app
from audience_sync.web.serve import allowed_hosts, background
from audience_sync.web.state import read_only_engine
from audience_sync.workers import Presence
from tests.helpers import SCRIPT_USER, History, build_history

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
REQUIRE_BROWSER = "AUDIENCE_SYNC_REQUIRE_BROWSER"  # .ci/run sets it: no browser is a failure
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("AUDIENCE_SYNC_SCREENSHOTS", ROOT / "build" / "screenshots"))
# On one pytest-xdist worker: one browser and one history for the module, built once.
pytestmark = pytest.mark.xdist_group("web_browser")


def _browser_paths() -> tuple[str, str]:
    binary = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = " and ".join(
            what for what, path in (("chromium", binary), ("chromedriver", driver)) if not path
        )
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"{REQUIRE_BROWSER} is set but {missing} is not on PATH")
        pytest.skip(
            f"no browser: {missing} not found on PATH "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    return binary, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for the module, with a profile of its own and no network."""
    binary, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp(), prefix="chromium-")
    for argument in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(argument)
    # The driver's path is given: Selenium Manager would try to download one.
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    session.set_page_load_timeout(30)
    try:
        yield session
    finally:
        session.quit()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    folder = tmp_path_factory.mktemp("browser")
    return build_history(folder, f"sqlite:///{folder / 'state.db'}", "browser-key-SECRET")


@pytest.fixture(scope="module")
def site(history: History) -> Iterator[str]:
    """The pages served as ``audience-sync ui`` serves them (loopback, Host check)."""
    engine: Engine = read_only_engine(history.state_url)
    app = create_app(engine, allowed_hosts=allowed_hosts("127.0.0.1", None))
    try:
        with background(app) as url:
            yield url
    finally:
        engine.dispose()


def shoot(browser: WebDriver, name: str) -> None:
    """Save the whole page as ``<name>.png`` (the window grows to the page's height)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(int(height) + 20, 600), 2400))
    try:
        assert browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    finally:
        browser.set_window_size(1280, 900)


def follow(browser: WebDriver, element: WebElement, *, submit: bool = False) -> None:
    """Click a link (or submit a form) and wait until the next page has replaced this one."""
    page = browser.find_element(By.TAG_NAME, "html")
    if submit:
        element.submit()
    else:
        element.click()
    WebDriverWait(browser, 10).until(lambda _: replaced(page))


def replaced(page: WebElement) -> bool:
    """Whether ``page`` (a document's root) is gone. Asked mid-navigation, chromedriver may
    answer that the node "does not belong to the document" instead of calling it stale:
    the same answer, in other words (Selenium's ``staleness_of`` raised it)."""
    try:
        page.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def texts(browser: WebDriver, selector: str) -> list[str]:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def assert_offline(browser: WebDriver, site: str) -> None:
    """Everything the page loaded came from the site itself: no CDN, no font service."""
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(url.startswith(site) for url in loaded), loaded
    styled = browser.execute_script(
        "return getComputedStyle(document.querySelector('header.top')).display"
    )
    assert styled == "flex"  # the shipped style sheet applied


def test_runs_page_lists_runs_and_links_to_a_run(
    browser: WebDriver, site: str, history: History
) -> None:
    browser.get(site + "/")
    assert browser.title == "Runs · audience-sync"
    ids = [int(t) for t in texts(browser, "#runs tr.run td:first-child")]
    assert ids == sorted([*history.first.values(), *history.second.values(), history.dry])[::-1]
    assert_offline(browser, site)
    shoot(browser, "runs")
    first = history.first["vip_customers"]
    follow(browser, browser.find_element(By.CSS_SELECTOR, f'tr[data-run-id="{first}"] a.run-link'))
    assert urlsplit(browser.current_url).path == f"/runs/{first}"
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Run {first} · vip_customers partial"


def test_runs_page_filters(browser: WebDriver, site: str, history: History) -> None:
    browser.get(site + "/")
    Select(browser.find_element(By.NAME, "status")).select_by_visible_text("partial")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    assert "status=partial" in browser.current_url
    assert set(texts(browser, "#runs .status")) == {"partial"}
    Select(browser.find_element(By.NAME, "status")).select_by_visible_text("any")
    Select(browser.find_element(By.NAME, "audience")).select_by_visible_text("plan")
    Select(browser.find_element(By.NAME, "kind")).select_by_visible_text("run")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    ids = {int(t) for t in texts(browser, "#runs tr.run td:first-child")}
    assert ids == {history.first["plan"], history.second["plan"]}
    follow(browser, browser.find_element(By.LINK_TEXT, "clear"))
    assert len(texts(browser, "#runs tr.run")) == 7


def test_run_page_shows_changes_and_filters_them(
    browser: WebDriver, site: str, history: History
) -> None:
    run_id = history.second["vip_customers"]
    browser.get(f"{site}/runs/{run_id}")
    figures = {
        e.get_attribute("data-field"): e.text
        for e in browser.find_elements(By.CSS_SELECTOR, "#figures dd")
    }
    assert figures["entered"] == "2"
    assert figures["exited"] == "1"
    assert figures["status"] == "succeeded"
    users = texts(browser, "#change-rows .user-link")
    assert sorted(users) == ["u4", "u5", "u7"]
    shoot(browser, "run")
    follow(browser, browser.find_element(By.LINK_TEXT, "exited"))
    assert "changes=exited" in browser.current_url
    assert texts(browser, "#change-rows .user-link") == ["u4"]
    assert texts(browser, "#change-rows code") == ["vip_customers = false"]
    follow(browser, browser.find_element(By.LINK_TEXT, "failed"))
    assert texts(browser, "#change-rows .user-link") == []
    assert "No failed changes" in browser.find_element(By.TAG_NAME, "main").text


def test_run_page_of_a_partial_run_shows_refusals_and_rejected_rows(
    browser: WebDriver, site: str, history: History
) -> None:
    browser.get(f"{site}/runs/{history.first['vip_customers']}")
    first = browser.find_element(By.CSS_SELECTOR, "#change-rows tr.change")
    assert first.get_attribute("class") == "change change-failed"
    assert "HTTP 422: Email is invalid" in first.text
    rejected = texts(browser, "#rejected-rows tbody tr")
    assert len(rejected) == 1
    assert rejected[0].startswith("7 u9 not-an-email")


def test_audience_page_draws_the_chart(browser: WebDriver, site: str) -> None:
    browser.get(site + "/audiences/vip_customers")
    counts = {
        e.get_attribute("data-count"): e.text
        for e in browser.find_elements(By.CSS_SELECTOR, "#counts dd")
    }
    assert counts == {
        "acknowledged": "6",
        "uncertain": "0",
        "owed_changes": "0",
        "owed_events": "0",
    }
    chart = browser.find_element(By.ID, "growth-chart")
    assert chart.is_displayed()
    assert chart.size["width"] > 300
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle.dot")) == 2
    assert len(chart.find_elements(By.CSS_SELECTOR, "rect.entered")) == 2
    assert len(chart.find_elements(By.CSS_SELECTOR, "rect.exited")) == 1
    assert_offline(browser, site)
    shoot(browser, "audience")
    follow(browser, browser.find_element(By.LINK_TEXT, "All runs of vip_customers"))
    assert set(texts(browser, "#runs tr.run td:nth-child(2)")) == {"vip_customers"}


def test_user_page_answers_why_a_user_holds_a_value(
    browser: WebDriver, site: str, history: History
) -> None:
    # From a run to the user in one click, then to the run that made the value.
    browser.get(f"{site}/runs/{history.second['vip_customers']}")
    follow(browser, browser.find_element(By.LINK_TEXT, "u5"))
    assert urlsplit(browser.current_url).path == "/users/u5"
    row = browser.find_element(By.CSS_SELECTOR, '#holdings tr[data-key="vip_customers"]')
    assert row.text.split()[:5] == ["vip_customers", "true", "acknowledged", "by", "Gist"]
    assert browser.find_element(By.ID, "contact-email").text == "u5@example.com"
    statuses = texts(browser, "#user-changes .status")
    assert statuses == ["delivered", "delivered", "failed", "failed"]
    shoot(browser, "user")
    row = browser.find_element(By.CSS_SELECTOR, '#holdings tr[data-key="vip_customers"]')
    follow(browser, row.find_element(By.LINK_TEXT, str(history.second["vip_customers"])))
    assert urlsplit(browser.current_url).path == f"/runs/{history.second['vip_customers']}"


def test_find_user_box(browser: WebDriver, site: str) -> None:
    browser.get(site + "/workers")
    box = browser.find_element(By.ID, "find-user")
    box.send_keys("u7")
    follow(browser, box, submit=True)
    assert urlsplit(browser.current_url).path == "/users/u7"
    assert browser.find_element(By.ID, "user-id").text == "u7"


def test_markup_in_ids_and_names_stays_text(browser: WebDriver, site: str) -> None:
    browser.get(f"{site}/users/{quote(SCRIPT_USER, safe='')}")
    assert browser.find_element(By.ID, "user-id").text == SCRIPT_USER
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check
    browser.get(site + "/audiences/newsletter_b_fans_b")
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Newsletter <b>Fans</b>")
    assert browser.find_elements(By.CSS_SELECTOR, "h1 b") == []


def test_workers_page(browser: WebDriver, site: str, history: History) -> None:
    # A daemon syncing now beside the three finished runs.
    writer = db.make_engine(history.state_url)
    try:
        with Presence(writer, "daemon") as daemon:
            daemon.running(["vip_customers"])
            WebDriverWait(browser, 10).until(lambda b: _running(b, site) == ["vip_customers"])
            assert texts(browser, "#workers .status") == ["alive", *["stopped"] * 3]
            assert texts(browser, "#workers td:nth-child(3)") == ["daemon", *["run"] * 3]
            assert len(texts(browser, "#rate-limits tbody tr")) == 1
            shoot(browser, "workers")
    finally:
        writer.dispose()


def _running(browser: WebDriver, site: str) -> list[str]:
    browser.get(site + "/workers")
    return texts(browser, "#workers tr.worker-alive td:nth-child(4) a")


def test_unknown_page_is_a_404_page(browser: WebDriver, site: str) -> None:
    browser.get(site + "/runs/424242")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"
    assert "There is no run 424242 in the history." in browser.page_source
    follow(browser, browser.find_element(By.LINK_TEXT, "All runs"))
    assert urlsplit(browser.current_url).path == "/"
