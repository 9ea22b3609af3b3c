"""The status page end to end: headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against the real daemon and a loopback target. A screenshot is saved to
test-artifacts/status-page.png."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.integration import test_ha as ha
from tests.integration.conftest import ROOT, Daemon, base_env, run_cli
from tests.integration.test_ha import Cluster
from tests.support import RedisServer, Reply, Target, free_port

TOKEN = "app-token"
ADMIN = "page-admin-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them: "
    "apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,900", "--disable-gpu"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(condition: Callable[[], object], timeout: float = 15.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the element is not there yet, or was just re-rendered
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {condition}")


def click(driver: object, selector: str) -> None:
    """Click what `selector` finds; the page re-renders its table every 5 s, so an element found
    a moment before may be replaced by then: find it again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    page: WebDriver = driver  # type: ignore[assignment]

    def attempt() -> bool:
        page.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait(attempt)


def serve_page(
    daemon: Callable[..., Daemon], api_url: str, jobs: Path, tmp_path: Path
) -> tuple[Daemon, str]:
    """A daemon with SQLite state and its admin API on a free port, once it answers."""
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    process = daemon(
        API_URL=api_url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(jobs),
        SCHEDULER_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        SCHEDULER_ADMIN_BIND=f"127.0.0.1:{port}", SCHEDULER_ADMIN_TOKEN=ADMIN,
    )  # fmt: skip
    wait(lambda: httpx.get(f"{admin}/healthz", timeout=1).status_code == 200)
    return process, admin


def test_the_page_lists_jobs_triggers_pauses_and_refuses_a_wrong_token(
    browser: object,
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    driver: WebDriver = browser  # type: ignore[assignment]
    jobs = jobs_file(
        '[jobs.tick]\nschedule = "every 1s"\nendpoint = "/tick"\n'
        '[jobs.hourly]\nschedule = "every 1h"\nendpoint = "/hourly"\n'
        '[jobs.berlin]\nschedule = "daily 02:30"\ntimezone = "Europe/Berlin"\nendpoint = "/b"\n'
    )
    process, admin = serve_page(daemon, target.url, jobs, tmp_path)
    later = datetime.now(UTC) + timedelta(hours=1)
    created = httpx.put(
        f"{admin}/api/schedules/remind-1",
        json={"schedule": f"at {later:%Y-%m-%dT%H:%M:%S}Z", "endpoint": "/r", "group": "reminders"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 201

    # Without a token: health only.
    driver.get(admin)
    assert driver.title == "cronclock status"
    assert driver.find_element(By.ID, "health").get_attribute("data-status") == "ok"
    assert driver.find_element(By.ID, "login").is_displayed()
    assert not driver.find_element(By.ID, "jobs-section").is_displayed()
    assert "tick" not in driver.find_element(By.TAG_NAME, "body").text

    # A wrong token is refused and forgotten.
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(lambda: "refused" in driver.find_element(By.ID, "login-message").text)
    assert not driver.find_element(By.ID, "jobs-section").is_displayed()
    assert driver.execute_script("return sessionStorage.length") == 0

    # The right token: every job, its next run, its runs.
    driver.find_element(By.ID, "token").send_keys(ADMIN)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(lambda: driver.find_element(By.ID, "jobs-section").is_displayed())
    names = [
        row.get_attribute("data-job")
        for row in driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    ]
    assert names == ["tick", "hourly", "berlin"]
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-job="berlin"]')
    assert "Europe/Berlin" in row.text and "UTC" in row.text and "in " in row.text
    wait(
        lambda: (
            len(
                driver.find_elements(
                    By.CSS_SELECTOR, 'tr[data-job="tick"] .strip li[data-outcome="success"]'
                )
            )
            >= 3
        )
    )
    cell = driver.find_element(
        By.CSS_SELECTOR, 'tr[data-job="tick"] .strip li[data-outcome="success"]'
    )
    assert "success" in (cell.get_attribute("title") or "") and "HTTP 200" in (
        cell.get_attribute("title") or ""
    )
    assert "late " in (cell.get_attribute("title") or "")
    groups = driver.find_element(By.ID, "groups").text
    assert "reminders" in groups and "1" in groups
    headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#jobs thead th[scope=col]")]
    assert headers[:4] == ["Job", "Schedule", "Time zone", "Next run"]
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "status-page.png"))

    # Trigger: a call reaches the target.
    click(driver, 'button[aria-label="Trigger hourly now"]')
    assert target.wait_for(lambda calls: any(c.path == "/hourly" for c in calls), timeout=15)
    hourly = target.calls("/hourly")[0]
    assert (hourly.header("Idempotency-Key") or "").startswith("hourly@manual-")
    wait(lambda: "hourly: triggered" in driver.find_element(By.ID, "message").text)

    # Pause: shown as paused after a refresh, and the button offers resume.
    click(driver, 'button[aria-label="Pause tick"]')
    wait(
        lambda: driver.find_element(By.CSS_SELECTOR, 'tr[data-job="tick"] td.next').text == "paused"
    )
    assert driver.find_elements(By.CSS_SELECTOR, 'button[aria-label="Resume tick"]')
    status = httpx.get(f"{admin}/api/jobs/tick", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status.json()["paused"] is True
    driver.refresh()  # still signed in (this tab's sessionStorage), still paused
    wait(lambda: "paused" in driver.find_element(By.CSS_SELECTOR, 'tr[data-job="tick"]').text)

    # The token is in no URL and no log line; the page broke no rule of its CSP.
    assert ADMIN not in driver.current_url
    # (the network log holds the wrong token's expected 401; a CSP breach is a console error)
    severe = [
        e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"
    ]
    assert severe == []
    assert process.stop() == 0
    assert ADMIN not in process.log_path.read_text()


def test_a_standby_names_its_leader_and_redis_away_shows_unhealthy(
    browser: object,
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    redis_server: RedisServer,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    driver: WebDriver = browser  # type: ignore[assignment]
    cluster = Cluster(daemon, target, jobs_file('[jobs.a]\nschedule = "every 1h"\nendpoint = "/a"\n'),
                      redis_server, ttl=3.0)  # fmt: skip
    replicas = [cluster.add(), cluster.add()]
    leader = cluster.leader()
    standby = next(r for r in replicas if r is not leader)
    leader_name = str(leader.health()["replica"])
    wait(lambda: standby.health().get("role") == "standby")  # its admin API is up
    driver.get(standby.admin)
    driver.find_element(By.ID, "token").send_keys(ha.ADMIN)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    # (a standby that has just started may not know the leader's name at the first refresh)
    wait(
        lambda: (
            f"standby: {leader_name} leads"
            in driver.find_element(By.CSS_SELECTOR, ".banner-standby").text
        ),
        timeout=20,
    )
    assert driver.find_element(By.ID, "health").get_attribute("data-status") == "standby"
    redis_server.stop()
    alert = wait(lambda: driver.find_element(By.CSS_SELECTOR, ".banner-error").text, timeout=20)
    assert "Unhealthy" in str(alert) and "Redis" in str(alert)
    assert driver.find_element(By.ID, "health").get_attribute("data-status") == "unhealthy"
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "status-page-unhealthy-standby.png"))
    redis_server.start()
    cluster.stop_all()


def _rows(driver: object, selector: str) -> list[object]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    page: WebDriver = driver  # type: ignore[assignment]
    return list(page.find_elements(By.CSS_SELECTOR, selector))


def _sign_in(driver: object, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    page: WebDriver = driver  # type: ignore[assignment]
    page.get(url)
    page.find_element(By.ID, "token").send_keys(ADMIN)
    page.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(lambda: page.find_element(By.ID, "jobs-section").is_displayed())


def test_the_page_shows_last_runs_failures_slots_history_and_dst_inline(
    browser: object,
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """Issue 19, the screenshot review: last run, last success, last failure with its status
    and error, lateness, paused instead of a next run, one strip cell per slot with its
    retries inside and a legend, a job's history filtered by outcome, DST effects below."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select

    driver: WebDriver = browser  # type: ignore[assignment]
    target.script["/broken"] = [Reply(500)]
    target.script["/gone"] = [Reply(410)]
    target.script["/flaky"] = [Reply(503, headers={"Retry-After": "0"}), Reply(200)] * 50
    jobs = jobs_file(
        '[jobs.tick]\nschedule = "every 1s"\nendpoint = "/tick"\n'
        '[jobs.broken]\nschedule = "every 2s"\nendpoint = "/broken"\npause_after_failures = 50\n'
        '[jobs.gone]\nschedule = "every 2s"\nendpoint = "/gone"\n'
        '[jobs.flaky]\nschedule = "every 2s"\nendpoint = "/flaky"\nretries = 1\n'
        '[jobs.nightly]\nschedule = "every 1h"\nendpoint = "/n"\n'
        '[jobs.berlin]\nschedule = "daily 02:30"\ntimezone = "Europe/Berlin"\nendpoint = "/b"\n'
    )
    process, admin = serve_page(daemon, target.url, jobs, tmp_path)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{admin}/api/jobs/nightly/pause", headers=headers).status_code == 200
    assert target.wait_for(lambda calls: len([c for c in calls if c.path == "/flaky"]) >= 4,
                           timeout=20)  # two slots, each retried once  # fmt: skip
    _sign_in(driver, admin)

    def cell(job: str, column: str) -> str:
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(5):  # the table re-renders every 5 s: an element found may go at once
            try:
                found = driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{job}"] td.{column}')
                return str(found.text)
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{job} {column}: re-rendered five times while read")

    # Last run, last success and lateness inline, not only on hover.
    wait(lambda: "ago" in cell("tick", "last") and "sent " in cell("tick", "last"))
    tick = cell("tick", "last")
    assert "success" in tick and "HTTP 200" in tick and "last success:" in tick
    assert re.search(r"sent \d+ ms after its slot", tick), tick
    # The last failure: when, its HTTP status and the application's error text.
    wait(lambda: "last failure" in cell("broken", "last"))
    broken = cell("broken", "last")
    assert "failed" in broken and "HTTP 500" in broken and "last success: never" in broken
    assert re.search(r"last failure (\d+ s ago|just now): HTTP 500: ", broken), broken
    assert "HTTP 500: HTTP 500" not in broken and "in 0 s" not in broken
    # Paused: "paused", no next run in N s; paused by the daemon: why, in words.
    assert cell("nightly", "next") == "paused"
    wait(lambda: "disabled" in (gone := cell("gone", "next")) and "410 Gone" in gone)
    wait(lambda: "failed slots in a row of 50 before it pauses" in cell("broken", "last"))
    # A next run that has come reads "due now" until the refresh, never "1 s ago".
    for _ in range(15):
        assert "ago" not in cell("tick", "next"), cell("tick", "next")
        time.sleep(0.2)

    # One strip cell per slot, the retry inside it; newest last; a legend.
    def retried() -> tuple[str, bool, str]:  # read at once: the table re-renders every 5 s
        first = _rows(driver, 'tr[data-job="flaky"] .strip li[data-attempts="2"]')[0]
        return (first.get_attribute("data-outcome"),  # type: ignore[attr-defined]
                bool(first.find_elements(By.CSS_SELECTOR, "i.retry.outcome-failed")),  # type: ignore[attr-defined]
                first.get_attribute("title") or "")  # type: ignore[attr-defined]  # fmt: skip

    outcome, marked, title = wait(retried)  # type: ignore[misc]
    assert outcome == "success" and marked
    assert "HTTP 503" in title and "HTTP 200" in title and "attempt 2" in title
    slots_shown = wait(lambda: [c.get_attribute("title").split(" · ")[0]  # type: ignore[attr-defined]
                                for c in _rows(driver, 'tr[data-job="tick"] .strip li')])  # fmt: skip
    assert slots_shown == sorted(slots_shown) and len(set(slots_shown)) == len(slots_shown)
    legend = driver.find_element(By.ID, "legend").text
    assert "success" in legend and "skipped: the previous run was still in flight" in legend
    assert "retried" in legend
    # DST effects: below the table, every one per job, not a banner.
    assert not _rows(driver, ".banner-dst")
    dst = driver.find_element(By.ID, "dst")
    assert dst.is_displayed() and "berlin: " in dst.text and "02:30" in dst.text
    table = driver.find_element(By.ID, "jobs")
    assert dst.location["y"] > table.location["y"] + table.size["height"] - 1
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "status-page-inline.png"))
    # A job's name opens its history; the filter keeps one outcome.
    click(driver, 'button[data-history="flaky"]')
    wait(lambda: driver.find_element(By.ID, "history").is_displayed())
    assert "History of flaky" in driver.find_element(By.ID, "history-title").text
    wait(lambda: len(_rows(driver, "#history-runs tbody tr[data-outcome]")) >= 4)
    outcomes = {r.get_attribute("data-outcome") for r in _rows(driver, "#history-runs tbody tr")}  # type: ignore[attr-defined]
    assert outcomes == {"success", "failed"}

    def only_failed() -> bool:  # the history re-renders its filter as runs arrive: choose again
        Select(driver.find_element(By.ID, "history-filter")).select_by_value("failed")
        shown = _rows(driver, "#history-runs tbody tr")
        return bool(shown) and all(
            r.get_attribute("data-outcome") == "failed" and "503" in r.text  # type: ignore[attr-defined]
            for r in shown
        )

    wait(only_failed)
    driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.ID, "history"))
    assert driver.save_screenshot(str(ARTIFACTS / "status-page-history.png"))
    click(driver, "#history-close")
    wait(lambda: not driver.find_element(By.ID, "history").is_displayed())
    # no script error and no CSP breach (the network log has the favicon's 404)
    severe = [e for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and e["source"] != "network"]  # fmt: skip
    assert severe == []
    assert process.stop() == 0


def test_an_application_that_refuses_connections_is_degraded_since_the_first(
    browser: object, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    driver: WebDriver = browser  # type: ignore[assignment]
    began = datetime.now(UTC)
    jobs = jobs_file('[jobs.tick]\nschedule = "every 1s"\nendpoint = "/t"\n')
    process, admin = serve_page(daemon, f"http://127.0.0.1:{free_port()}", jobs, tmp_path)
    health = wait(lambda: (lambda h: h if h.json()["status"] == "degraded" else None)(
        httpx.get(f"{admin}/healthz", timeout=2)))  # fmt: skip
    answer: httpx.Response = health  # type: ignore[assignment]
    assert answer.status_code == 200  # the daemon is fine: restarting it would not help
    unreachable = answer.json()["target"]
    assert unreachable["status"] == "unreachable" and unreachable["consecutive_failures"] >= 3
    assert "connection failed" in unreachable["last_error"]
    since = datetime.fromisoformat(unreachable["since"].replace("Z", "+00:00"))
    assert began <= since <= datetime.now(UTC)
    status = run_cli("status", env=base_env(SCHEDULER_ADMIN_BIND=admin.removeprefix("http://"),
                                            SCHEDULER_ADMIN_TOKEN=ADMIN))  # fmt: skip
    assert status.returncode == 0 and ": solo, degraded -- the application is unreachable since " in (
        status.stdout.splitlines()[0]), status.stdout  # fmt: skip
    _sign_in(driver, admin)
    banner = wait(lambda: driver.find_element(By.ID, "unreachable").text)
    assert "The application is unreachable since" in str(banner) and "could not connect" in str(
        banner
    )
    assert driver.find_element(By.ID, "health").get_attribute("data-status") == "degraded"
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "status-page-degraded.png"))
    assert process.stop() == 0
