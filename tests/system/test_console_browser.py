"""The console in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium) against ``recsvc serve`` on the sample shop, through the four views.

Run alone with ``make test-browser``; part of ``make test``. Screenshots of every view are saved
under ``var/screenshots/`` (the README's comes from here). ``.ci/run`` installs the browser.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import harness
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "var" / "screenshots"
KEY = "console-browser-key-0123456789abcdef"
CODES = ("viewed", "bought", "just_viewed", "seen", "popular", "trending")


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").exists() else None
    )
    if chromium is None or driver is None:
        pytest.fail(
            "the console's browser test needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The sample shop, trained and published, served with an API key; a user with fresh events,
    and an experiment with exposures, clicks and purchases that went through the service."""
    workdir = tmp_path_factory.mktemp("console")
    redis_proc = harness.RedisProc(workdir / "redis").start()
    service = None
    try:
        env = harness.base_env(redis_proc.url, workdir, RECSVC_API_KEYS=KEY)
        sample = workdir / "sample"
        harness.recsvc(
            ["sample-data", "--out", str(sample), "--users", "400", "--items", "150"], env, workdir
        )
        harness.recsvc(
            ["train", "--events", str(sample / "events.csv"), "--catalog", str(sample / "catalog.csv")],
            env,
            workdir,
        )
        harness.recsvc(["publish", "latest"], env, workdir)
        service = harness.Service(env, workdir, workers=2, threads=4, name="console").start(ready="ready")
        http = harness.Http(service.base)
        auth = {**harness.bearer(KEY), "Content-Type": "application/json"}
        with open(sample / "events.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["user_id"]] = counts.get(row["user_id"], 0) + 1
        with open(sample / "catalog.csv", newline="", encoding="utf-8") as f:
            items = [r["item_id"] for r in csv.DictReader(f)]
        definition = {
            "variants": [
                {"name": "control", "share": 50, "strategy": "realtime"},
                {"name": "popular", "share": 50, "strategy": "popular"},
            ]
        }
        put = http.request("PUT", "/v1/admin/experiments/homepage", json.dumps(definition).encode(), auth)
        assert put.status == 201, put.body
        # A customer of typical activity in the control arm, who has just looked at an item.
        by_activity = sorted(counts, key=lambda u: (abs(counts[u] - 12), u))
        user = next(
            u
            for u in by_activity
            if http.get(f"/v1/admin/experiments/homepage/assignment?user_id={u}", auth).json()["variant"]
            == "control"
        )
        now = int(time.time())
        fresh = {"user_id": user, "item_id": items[3], "event": "view", "timestamp": now}
        assert http.post_json("/v1/events", fresh, auth).status == 202
        # Shoppers see their lists; some click and buy the first item (control converts more).
        batch = []
        for k, shopper in enumerate(sorted(counts)[:80]):
            answer = http.get(f"/v1/users/{shopper}/recommendations?n=5&explain=false").json()
            first = answer["items"][0]["item_id"]
            arm = answer["variant"]
            if k % (2 if arm == "control" else 4) == 0:
                for event in ("click", "purchase"):
                    batch.append(
                        {"user_id": shopper, "item_id": first, "event": event, "timestamp": now + 5,
                         "rec_id": answer["rec_id"], "price": 20.0}
                    )  # fmt: skip
        assert http.post_json("/v1/events", batch, auth).status == 202
        http.close()
        yield {"base": service.base, "user": user, "fresh_item": items[3], "workdir": workdir}
    finally:
        if service is not None:
            service.stop()
        redis_proc.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1366,1000",  # a laptop screen
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"console-{name}.png"))


def wait_for(driver, css: str):
    """The element ``css`` once the page that has it has loaded (bounded: 15 s)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 15).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def test_the_console_in_a_browser(shop, browser):
    from selenium.webdriver.common.by import By

    base, user = shop["base"], shop["user"]
    # Without a key: refused, the login form instead of the page.
    status, _, body = harness.http_once(base, "GET", f"/console/users?user_id={user}")
    assert status == 401 and user.encode() not in body
    browser.get(f"{base}/console/users?user_id={quote(user)}")
    assert browser.find_elements(By.ID, "key") and not browser.find_elements(By.ID, "recommendations")
    shot(browser, "login")
    browser.find_element(By.ID, "key").send_keys("not-the-key-0123456789")
    browser.find_element(By.ID, "sign-in").click()
    assert "not valid" in wait_for(browser, "#login-error").text
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "sign-in").click()
    live = wait_for(browser, "#live-version").text
    assert browser.current_url.rstrip("/").endswith("/console")
    shot(browser, "overview")

    # Users: find the customer, read what they will be shown and why.
    field = browser.find_element(By.NAME, "user_id")
    field.send_keys(user)
    field.submit()
    assert wait_for(browser, "#user-id").text == user
    assert "known to model" in text_of(browser, "#user-summary")
    assert text_of(browser, "#segment") in ("new", "active", "high_value", "dormant")
    rows = browser.find_elements(By.CSS_SELECTOR, "#recommendations tr")[1:]
    assert len(rows) == 10
    reasons = browser.find_elements(By.CSS_SELECTOR, "#recommendations .why")
    assert len(reasons) == 10 and all(r.get_attribute("data-code") in CODES for r in reasons)
    api = harness.Http(base).get(f"/v1/users/{user}/recommendations?n=10").json()
    assert [r.text for r in reasons] == [it["explanation"]["text"] for it in api["items"]]
    assert any(r.text.startswith("Because you") for r in reasons)
    assert "view" in text_of(browser, "#recent")  # the fresh event, in real time
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history tr")) > 2
    assert "saves" in text_of(browser, "#bundles")
    assert text_of(browser, "#experiment").startswith("homepage / variant")
    shot(browser, "user")

    # Items: follow the first recommendation.
    first = browser.find_element(By.CSS_SELECTOR, "#recommendations td a")
    item_title = first.text
    first.click()
    assert wait_for(browser, "#item-title").text == item_title
    assert "stock" in text_of(browser, "#stock")
    assert "Bought by" in text_of(browser, "#buyers")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#similar tr")) == 11
    shot(browser, "item")

    # Models: the live version, its evaluation as charts, the history, the training report.
    browser.find_element(By.LINK_TEXT, "Models").click()
    card = wait_for(browser, f"#version-{live}")
    assert "live" in card.text
    assert len(card.find_elements(By.CSS_SELECTOR, "svg.chart")) >= 2  # overall + activity buckets
    assert "publish" in text_of(browser, "#history")
    shot(browser, "models")
    card.find_element(By.LINK_TEXT, "training report").click()
    assert wait_for(browser, "h1").text.startswith("Training report")
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 5 and all(i.get_attribute("naturalWidth") not in ("0", None) for i in images)
    shot(browser, "report")

    # Experiments: variants, exposures and conversions as charts, the verdict in words.
    browser.get(f"{base}/console/experiments")
    browser.find_element(By.LINK_TEXT, "homepage").click()
    verdict = wait_for(browser, "#verdict").text
    assert "control" in verdict and "popular" in verdict
    variants = text_of(browser, "#variants")
    assert "control" in variants and "popular" in variants
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    shot(browser, "experiment")

    # Logging out ends the session.
    browser.get(f"{base}/console")
    browser.find_element(By.XPATH, "//button[text()='Log out']").click()
    wait_for(browser, "#key")
    browser.get(f"{base}/console/models")
    assert browser.find_elements(By.ID, "key") and not browser.find_elements(By.ID, f"version-{live}")
