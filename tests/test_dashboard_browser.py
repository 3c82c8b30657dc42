"""The operator dashboard in a real browser: headless Chromium (Selenium) against a real system
(Valkey, the simulator, serve, Celery worker and beat from DevStack) and the dashboard app served
by uvicorn on a loopback port. Run with ``make browser``; screenshots go to docs/screenshots/.

The tests run in file order and share one system: a job made to fail (the simulator fails every
generation at first), then a batch that succeeds; a webhook sink that refuses deliveries until the
dead-letter test lets it through.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dash_server import ServedApp
from kie_extend.api import enqueue_extend, enqueue_many, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.http.app import create_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKENS = "admin-token,read:viewer-token"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
WAIT = 60.0


# -- what the run needs: Chromium, its driver, Selenium ----------------------------------------------

def _ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when missing (root, non-interactive, bounded)."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are missing and cannot be installed here (needs root and "
                    "apt-get): apt-get install -y chromium chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if out.returncode != 0 and cmd[1] == "install":
            pytest.fail(f"apt-get install chromium chromium-driver failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium was installed but /usr/bin/chromium or /usr/bin/chromedriver is still missing")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium with a fresh profile, driven through /usr/bin/chromedriver."""
    _ensure_chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# -- the system under test ---------------------------------------------------------------------------

class Sink(http.server.ThreadingHTTPServer):
    """A webhook receiver that answers 503 while ``failing`` and records what it accepted."""

    failing = True
    accepted: list[dict[str, Any]]


class _SinkHandler(http.server.BaseHTTPRequestHandler):
    server: Sink

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.server.failing:
            self.send_response(503)
        else:
            self.server.accepted.append(json.loads(body or b"{}"))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        """Quiet."""


class Captured(logging.Handler):
    """Every log line of this process (the dashboard app runs here), to prove no token is logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class System:
    """The running stack, the dashboard's URL and the jobs the tests look at."""

    stack: DevStack
    url: str
    sink: Sink
    logs: Captured
    failed_job: str
    done_batch: str
    ok_jobs: list[str]


def _wait(what: str, check: Any, timeout: float = WAIT, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _request(stack: DevStack, **extra: Any) -> dict[str, Any]:
    req = {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True, "instrumental": False,
           "continueAt": 10, "model": "V5", "prompt": "[Verse]\nla la", "style": "folk", "title": "Song"}
    req.update(extra)
    return req


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    sys_ = System()
    sink = Sink(("127.0.0.1", 0), _SinkHandler)
    sink.accepted = []
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    logs = Captured()
    watched = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "kie_extend")]
    levels = [lg.level for lg in watched]
    for lg in watched[1:]:
        lg.setLevel(logging.INFO)
    logging.getLogger().addHandler(logs)
    workdir = tmp_path_factory.mktemp("dash")
    env = {"KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
           "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.5s",
           "KIE_HANDLERS": "redis_stream,webhook", "KIE_WEBHOOK_URL": f"http://127.0.0.1:{sink.server_port}/hook",
           "KIE_HANDLER_MAX_ATTEMPTS": "1", "KIE_WEBHOOK_TIMEOUT": "2s"}
    with DevStack(workdir, key_prefix=f"dash{uuid.uuid4().hex[:6]}", env=env) as stack:
        stack.start_simulator("--time-factor", "0.04", "--seed", "11", "--fault-generation-fail", "1.0")
        stack.start_serve(callbacks_only=True)
        stack.start_worker(concurrency=2)
        stack.start_beat()
        settings = stack.settings()
        # One job that fails retryably (its generation fails), then a batch that succeeds.
        sys_.failed_job = enqueue_extend(_request(stack, title="Fails first"), metadata={"case": "retry me"},
                                         tenant="acme", settings=settings)
        _wait("the first job to fail", lambda: get_job(sys_.failed_job, settings=settings)["state"] == "failed")
        stack.sim_config(fault_generation_fail=0.0)
        sys_.done_batch = f"b-done-{uuid.uuid4().hex[:4]}"
        sys_.ok_jobs = enqueue_many([{"request": _request(stack, title=f"Song {i}")} for i in range(3)],
                                    batch_id=sys_.done_batch, tenant="beta", settings=settings)
        _wait("the batch to succeed", lambda: all(get_job(j, settings=settings)["state"] == "succeeded"
                                                   for j in sys_.ok_jobs))
        # Every webhook delivery so far failed once and was dead-lettered (max attempts 1): four job
        # events and the finished batch's event.
        app = create_app(stack.settings(api_tokens=TOKENS, session_secret="dash-test-secret"),
                         parts=("api", "dashboard"))
        served = ServedApp(app)
        sys_.stack, sys_.url, sys_.sink, sys_.logs = stack, served.url, sink, logs
        _wait("5 dead letters", lambda: _dead_count(sys_) >= 5)
        try:
            yield sys_
        finally:
            served.stop()
            sink.shutdown()
            logging.getLogger().removeHandler(logs)
            for lg, level in zip(watched, levels):
                lg.setLevel(level)


def _dead_count(system: System) -> int:
    import redis

    from kie_extend.store.keys import Keys

    r = redis.Redis.from_url(system.stack.redis_url)
    try:
        return int(r.llen(Keys(system.stack.settings().key_prefix).dead_letters))
    finally:
        r.close()


# -- helpers on pages ---------------------------------------------------------------------------------

def _by(css: str, what: str | None = None) -> tuple[str, str]:
    """A Selenium locator: ``_by(css)``, or ``_by("xpath", expr)`` / ``_by("css", selector)``."""
    from selenium.webdriver.common.by import By

    if what is None:
        return (By.CSS_SELECTOR, css)
    return (By.XPATH if css == "xpath" else By.CSS_SELECTOR, what)


def find(driver: Any, css: str) -> Any:
    return driver.find_element(*_by(css))


def finds(driver: Any, css: str) -> list[Any]:
    return driver.find_elements(*_by(css))


def viewport(driver: Any, width: int, height: int = 1000) -> None:
    """Lay the page out in a viewport of exactly ``width`` x ``height`` CSS pixels (Chromium's device
    metrics override: the window's own size is capped by the headless screen)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def shot(driver: Any, name: str, width: int = 1400) -> None:
    """Save a PNG of the whole page laid out ``width`` px wide (the viewport grown to the page's height)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    viewport(driver, width)
    height = driver.execute_script("return document.documentElement.scrollHeight") if _scripts_ok(driver) else 1000
    viewport(driver, width, max(600, min(int(height), 4000)))
    try:
        assert driver.save_screenshot(str(SHOTS / f"{name}.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def inside(inner: Any, outer: Any) -> bool:
    """Whether element ``inner``'s box lies within ``outer``'s (WebDriver rects, CSS pixels)."""
    a, b = inner.rect, outer.rect
    return (a["x"] >= b["x"] - 0.5 and a["y"] >= b["y"] - 0.5 and a["x"] + a["width"] <= b["x"] + b["width"] + 0.5
            and a["y"] + a["height"] <= b["y"] + b["height"] + 0.5)


def _scripts_ok(driver: Any) -> bool:
    try:
        driver.execute_script("return 1")
        return True
    except Exception:
        return False


def click(driver: Any, css: str) -> None:
    """Click what matches ``css`` and wait until the browser has loaded the next page."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    page = find(driver, "html")
    find(driver, css).click()

    def gone(_: Any) -> bool:
        # Selenium's staleness_of only knows StaleElementReferenceException; Chromium may instead
        # answer "Node with given id does not belong to the document" while the next page loads.
        try:
            page.is_enabled()
            return False
        except WebDriverException:
            return True

    WebDriverWait(driver, 20).until(gone)
    WebDriverWait(driver, 20).until(lambda d: _ready(d))


def _ready(driver: Any) -> bool:
    from selenium.common.exceptions import WebDriverException

    try:
        return bool(driver.execute_script("return document.readyState") == "complete")
    except WebDriverException:
        return False


def login(driver: Any, base: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/login")
    find(driver, "#token").send_keys(token)
    click(driver, "#login")


def reload_until(driver: Any, what: str, check: Any, timeout: float = WAIT) -> None:
    def again() -> bool:
        driver.refresh()
        return bool(check())
    _wait(what, again, timeout, every=0.5)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token on the page"
    return m.group(1)


# -- the tests, in order ------------------------------------------------------------------------------

def test_login_is_required_and_the_overview_counts_the_run(system: System, browser: Any) -> None:
    browser.get(system.url + "/jobs")
    assert browser.current_url.startswith(system.url + "/login?next=")
    find(browser, "#token").send_keys("not-a-token")
    click(browser, "#login")
    assert "not valid" in find(browser, "#login-error").text
    find(browser, "#token").send_keys("admin-token")
    click(browser, "#login")
    assert browser.current_url == system.url + "/jobs"  # back where the login started
    cookie = browser.get_cookie("kie_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    browser.get(system.url + "/")
    counts = {td.get_attribute("data-state"): int(td.text) for td in finds(browser, "td[data-state]")}
    assert counts["failed"] == 1 and counts["succeeded"] == 3 and counts["queued"] == 0
    assert find(browser, "#jobs-total").text == "4"
    assert int(find(browser, "#subs-total").text) == 4  # one submission per job so far
    assert int(find(browser, "#dead-count").text) == 5
    assert find(browser, "#in-flight").text.startswith("0 /")
    assert "running" in find(browser, "#operator-pause").text
    assert "closed" in find(browser, "#breaker").text
    credits = find(browser, "#credits").text
    assert re.fullmatch(r"[0-9.]+", credits), credits  # the simulator's balance


def test_filter_failed_jobs_and_open_the_timeline(system: System, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(system.url + "/jobs")
    assert len(finds(browser, "#jobs-table tbody tr[data-job]")) == 4
    Select(find(browser, "#f-state")).select_by_value("failed")
    click(browser, "#apply")
    assert "state=failed" in browser.current_url
    rows = finds(browser, "#jobs-table tbody tr[data-job]")
    assert [r.get_attribute("data-job") for r in rows] == [system.failed_job]
    assert "generation_failed" in rows[0].text
    shot(browser, "jobs-failed")
    # Search by tenant and by batch.
    browser.get(system.url + "/jobs?q=beta")
    assert sorted(r.get_attribute("data-job") for r in finds(browser, "tr[data-job]")) == sorted(system.ok_jobs)
    browser.get(system.url + f"/jobs?batch={system.done_batch}&state=failed")
    assert finds(browser, "tr[data-job]") == []
    browser.get(system.url + "/jobs?state=failed")
    click(browser, f"tr[data-job='{system.failed_job}'] a")
    assert find(browser, "#job-state").text == "failed"
    moves = [li.get_attribute("data-to") for li in finds(browser, "#timeline li")]
    assert moves == ["queued", "submitting", "submitted", "failed"], moves
    assert "generation_failed" in find(browser, "#job-error").text
    assert '"case": "retry me"' in find(browser, "#metadata").text
    assert "Fails first" in find(browser, "#request").text
    assert int(find(browser, "#polls").text.split()[0]) >= 1
    assert finds(browser, "#cancel") == []  # a failed job cannot be cancelled
    shot(browser, "job-timeline")


def test_retry_a_failed_job_until_it_succeeds(system: System, browser: Any) -> None:
    browser.get(system.url + f"/jobs/{system.failed_job}")
    click(browser, "#retry")
    assert "requeued" in find(browser, "#flash").text
    reload_until(browser, "the retried job to succeed", lambda: find(browser, "#job-state").text == "succeeded")
    moves = [li.get_attribute("data-to") for li in finds(browser, "#timeline li")]
    assert moves[:4] == ["queued", "submitting", "submitted", "failed"]
    assert moves[4:] == ["queued", "submitting", "submitted", "succeeded"], moves
    players = finds(browser, "#tracks audio")
    assert len(players) == 2 and all(p.get_attribute("src").startswith(system.stack.sim_url) for p in players)
    assert finds(browser, "#retry") == []
    shot(browser, "job-succeeded")


def test_dead_letters_replay_one_then_all(system: System, browser: Any) -> None:
    settings = system.stack.settings()
    # The retried job's success was dead-lettered too (the sink still refuses): 6 in all.
    _wait("6 dead letters", lambda: _dead_count(system) >= 6)
    browser.get(system.url + "/dead-letters")
    assert find(browser, "#dead-total").text == "6"
    assert len(finds(browser, "#dead-table tr[data-job]")) == 6
    assert len(finds(browser, f"#dead-table tr[data-job='{system.failed_job}']")) == 2  # job.failed, job.succeeded
    assert finds(browser, f"#dead-table tr[data-job='@batch:{system.done_batch}']")
    shot(browser, "dead-letters")
    system.sink.failing = False
    click(browser, f"#dead-table tr[data-job='{system.ok_jobs[0]}'] .replay-one")
    assert find(browser, "#replayed").text == "Replayed 1."
    assert find(browser, "#dead-total").text == "5"
    click(browser, "#replay-all")
    assert find(browser, "#replayed").text == "Replayed 5."
    assert find(browser, "#dead-total").text == "0"
    _wait("every webhook delivered", lambda: all(
        get_job(j, settings=settings)["handlers"].get("webhook", {}).get("state") == "delivered"
        for j in [system.failed_job, *system.ok_jobs]))
    _wait("the batch event delivered", lambda: any(e.get("event") == "batch.finished" for e in system.sink.accepted))
    jobs = [e["job_id"] for e in system.sink.accepted if e.get("event", "").startswith("job.")]
    assert sorted(jobs) == sorted([system.failed_job, *system.ok_jobs])  # once each, the latest event
    assert next(e for e in system.sink.accepted if e.get("job_id") == system.failed_job)["event"] == "job.succeeded"


def test_pause_cancel_a_queued_batch_and_resume(system: System, browser: Any) -> None:
    settings = system.stack.settings()
    before = system.stack.sim_stats()["submissions_accepted"]
    login(browser, system.url, "admin-token")  # so the test also runs on its own (by node id)
    browser.get(system.url + "/")
    find(browser, "#pause-reason").send_keys("maintenance window")
    click(browser, "#pause")
    assert "paused" in find(browser, "#flash").text.lower()
    assert "maintenance window" in find(browser, "#operator-pause").text
    held = f"b-held-{uuid.uuid4().hex[:4]}"
    ids = enqueue_many([{"request": _request(system.stack, title=f"Held {i}")} for i in range(3)],
                       batch_id=held, tenant="gamma", priority=7, settings=settings)
    _wait("the held batch to be queued", lambda: all(get_job(j, settings=settings)["state"] == "queued" for j in ids))
    browser.get(system.url + "/")
    assert "gamma" in find(browser, "#waiting").text
    assert find(browser, "td[data-state='queued']").text == "3"
    shot(browser, "overview")
    browser.get(system.url + "/batches")
    rows = {r.get_attribute("data-batch"): r.text for r in finds(browser, "#batches-table tr[data-batch]")}
    assert "3 / 3" in rows[system.done_batch] and "0 / 3" in rows[held]
    shot(browser, "batches")
    click(browser, f"tr[data-batch='{held}'] a")
    assert len(finds(browser, "#jobs-table tr[data-job]")) == 3
    click(browser, "#cancel-batch")
    assert "cancelled" in find(browser, "#flash").text
    assert find(browser, "[data-count='cancelled']").text == "cancelled 3"
    assert finds(browser, "#cancel-batch") == []  # the batch has finished
    assert all(get_job(j, settings=settings)["state"] == "cancelled" for j in ids)
    browser.get(system.url + "/")
    click(browser, "#resume")
    assert "running" in find(browser, "#operator-pause").text
    assert finds(browser, "#pause")  # the pause form is back
    time.sleep(1.5)  # a few beat ticks: nothing cancelled may be sent
    assert system.stack.sim_stats()["submissions_accepted"] == before


def test_overview_in_both_pause_states_fits_its_cards_at_1280_and_1920(system: System, browser: Any) -> None:
    """The Pause form once spilled out of its card at 1400 px and wider; the Resume form is the other
    state. Each form, its field and its button lie inside the card at both widths; the charts draw."""
    from kie_extend.api import pause, resume

    settings = system.stack.settings()
    login(browser, system.url, "admin-token")
    try:
        for state in ("running", "paused"):
            if state == "paused":
                pause("maintenance window: new storage backend", settings=settings)
            else:
                resume(settings=settings)
            for width in (1280, 1920):
                browser.get(system.url + "/")
                viewport(browser, width)
                form = find(browser, "form[action='/pause']" if state == "running" else "form[action='/resume']")
                card = form.find_element(*_by("xpath", "./ancestor::div[contains(@class, 'card')][1]"))
                for part in [form, *form.find_elements(*_by("css", "input[type=text], button"))]:
                    assert inside(part, card), (state, width, part.get_attribute("outerHTML")[:80], part.rect, card.rect)
                for chart in ("#chart-throughput", "#chart-depth", "#chart-ttr"):
                    box = find(browser, chart)
                    assert box.rect["width"] > 200 and inside(box, box.find_element(
                        *_by("xpath", "./ancestor::div[contains(@class, 'card')][1]"))), chart
                assert finds(browser, "#chart-throughput polyline")  # this run's jobs are on it
                shot(browser, f"overview-{state}-{width}", width=width)
    finally:
        resume(settings=settings)
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_redis_down_page_has_navigation_says_what_is_wrong_and_reloads(system: System, browser: Any,
                                                                           tmp_path: Path) -> None:
    """A dashboard whose job store is unreachable (a closed port, with a password in its URL)."""
    from kie_extend.infra.embedded import free_port

    closed = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    app = create_app(system.stack.settings(api_tokens=TOKENS, session_secret="dash-test-secret", redis_url=closed,
                                           redis_socket_timeout=1), parts=("api", "dashboard"))
    served = ServedApp(app)
    try:
        login(browser, served.url, "admin-token")  # the login itself needs no job store
        for page in ("/", "/jobs", "/batches", "/dead-letters", "/jobs/some-job"):
            browser.get(served.url + page)
            assert find(browser, "h1").text == "Job store unreachable", page
            assert [a.text for a in finds(browser, "header nav a")] == ["Overview", "Jobs", "Batches", "Dead letters"]
            assert find(browser, "#store-url").text == closed.replace("hunter2", "***")
            assert "hunter2" not in browser.page_source
            refresh = find(browser, "meta[http-equiv='refresh']").get_attribute("content")
            assert refresh == "5" and "reloads itself every 5 seconds" in find(browser, "#refresh-note").text
        browser.get(served.url + "/")
        shot(browser, "redis-down")
        s = requests.Session()
        s.post(served.url + "/login", data={"token": "admin-token", "next": "/"}, headers={"Origin": served.url})
        r = s.get(served.url + "/", allow_redirects=False)
        assert r.status_code == 503 and r.headers["content-type"].startswith("text/html")
        assert requests.get(served.url + "/v1/system", headers={"Authorization": "Bearer admin-token"},
                            timeout=10).json()["error"]["kind"] == "unavailable"
    finally:
        served.stop()


def test_docs_render_with_the_network_blocked(system: System, tmp_path: Path) -> None:
    """/docs in a Chromium that can reach loopback only (every other host goes to a closed proxy
    port and resolves to nothing): Swagger UI still renders the API, from the vendored files."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from kie_extend.infra.embedded import free_port

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}",
                 f"--proxy-server=http://127.0.0.1:{free_port()}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(flag)
    offline = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    offline.set_page_load_timeout(30)
    try:
        # The block works: the CDN Swagger UI used to come from is unreachable.
        try:
            offline.get("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css")
        except Exception:
            pass
        assert ".swagger-ui" not in offline.page_source  # an error page, not the stylesheet
        offline.get(system.url + "/docs")
        _wait("Swagger UI to render", lambda: finds(offline, ".swagger-ui .info .title"), timeout=20)
        assert "kie-extend" in find(offline, ".swagger-ui .info .title").text
        _wait("the operations", lambda: len(finds(offline, ".opblock")) >= 5, timeout=20)
        paths = {e.text for e in finds(offline, ".opblock-summary-path")}
        assert "/v1/jobs" in paths, paths
        assert all(src.startswith(system.url) for src in
                   [e.get_attribute("src") for e in finds(offline, "script[src]")] +
                   [e.get_attribute("href") for e in finds(offline, "link[rel=stylesheet]")])
        shot(offline, "api-docs-offline")
    finally:
        offline.quit()


def test_read_only_session_sees_no_buttons_and_its_posts_are_refused(system: System, browser: Any) -> None:
    settings = system.stack.settings()
    from kie_extend.api import pause, resume

    pause("read-only check", settings=settings)
    queued = enqueue_extend(_request(system.stack, title="Stays queued"), settings=settings)
    _wait("a queued job", lambda: get_job(queued, settings=settings)["state"] == "queued")
    try:
        login(browser, system.url, "viewer-token")
        assert "read-only" in find(browser, "#who").text
        assert "read-only check" in find(browser, "#operator-pause").text
        assert finds(browser, "form[action='/pause'], form[action='/resume']") == []
        browser.get(system.url + f"/jobs/{queued}")
        assert find(browser, "#job-state").text == "queued"
        assert finds(browser, "#cancel") == [] and finds(browser, "#retry") == []
        browser.get(system.url + "/batches")
        browser.get(system.url + "/dead-letters")
        assert finds(browser, "#replay-all") == []

        # The same session's POSTs, sent by hand with a valid CSRF token and Origin: 403.
        ro = requests.Session()
        r = ro.post(system.url + "/login", data={"token": "viewer-token", "next": "/"}, headers={"Origin": system.url})
        assert r.status_code == 200 and "read-only" in r.text
        csrf = csrf_of(r.text)  # the logout form carries the session's token
        origin = {"Origin": system.url}
        for path, form in ((f"/jobs/{queued}/cancel", {}), ("/resume", {}), ("/pause", {"reason": "x"}),
                           ("/dead-letters/replay", {}), (f"/jobs/{queued}/retry", {})):
            r = ro.post(system.url + path, data={"csrf": csrf, **form}, headers=origin, allow_redirects=False)
            assert r.status_code == 403 and "read-only" in r.text, (path, r.status_code)
        assert get_job(queued, settings=settings)["state"] == "queued"

        # A write session still needs the CSRF token and a same-origin POST.
        rw = requests.Session()
        r = rw.post(system.url + "/login", data={"token": "admin-token", "next": "/"}, headers=origin)
        csrf = csrf_of(r.text)
        cancel = system.url + f"/jobs/{queued}/cancel"
        assert rw.post(cancel, data={"csrf": csrf}, allow_redirects=False).status_code == 403  # no Origin/Referer
        assert rw.post(cancel, data={"csrf": csrf}, headers={"Origin": "http://evil.example"},
                       allow_redirects=False).status_code == 403
        assert rw.post(cancel, data={"csrf": "forged"}, headers=origin, allow_redirects=False).status_code == 403
        assert requests.post(cancel, data={"csrf": csrf}, headers=origin, allow_redirects=False).status_code == 303
        assert get_job(queued, settings=settings)["state"] == "queued"  # that 303 was the login redirect
        r = rw.post(cancel, data={"csrf": csrf}, headers=origin)
        assert r.status_code == 200 and "was cancelled" in r.text
        assert get_job(queued, settings=settings)["state"] == "cancelled"
    finally:
        resume(settings=settings)


def test_logout_and_no_token_in_any_log(system: System, browser: Any) -> None:
    login(browser, system.url, "admin-token")
    click(browser, "#logout")
    assert browser.current_url.startswith(system.url + "/login")
    browser.get(system.url + "/")
    assert "/login" in browser.current_url
    lines = system.logs.lines
    assert any("dashboard login" in line for line in lines)  # the capture works
    assert any("POST /login" in line for line in lines)  # uvicorn's access log is in it
    child_logs = "".join(c.log_path.read_text(errors="replace") for c in system.stack.children)
    for secret in ("admin-token", "viewer-token", "not-a-token"):
        assert not any(secret in line for line in lines), secret
        assert secret not in child_logs
