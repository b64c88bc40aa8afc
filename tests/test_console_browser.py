"""The dev console page in a real headless Chromium (Selenium + chromedriver), on `token-proxy
demo` as a user runs it: mint a token, try it, try an expired one, watch a request arrive.

`TOKEN_PROXY_SCREENSHOT=docs/console.png pytest tests/test_console_browser.py` also writes the
README's screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import free_port_pair, start_demo

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,  # a real browser
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="chromium and chromedriver are not installed (.ci/run installs them)",
    ),
]
WAIT = 20  # seconds any one thing may take to show up on the page


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[int, str, list[str]]]:
    """`token-proxy demo` on free ports: (port, console URL, the lines it printed)."""
    port = free_port_pair()
    process, lines = start_demo(port)
    try:
        found = [m for line in lines if (m := re.fullmatch(r"dev console: (\S+)", line))]
        assert found, lines
        yield port, found[0].group(1), lines
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 0


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    # The driver is the system's: Selenium must not look for (or download) one of its own.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(browser: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(condition)


def text_of(browser: Any, element_id: str) -> str:
    return str(browser.find_element("id", element_id).text)


def fill(browser: Any, element_id: str, value: str) -> None:
    element = browser.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def mint_and_try(browser: Any, claims: str, ttl: str) -> str:
    """Mint with the form, press "Try it", and return the verdict line once it is there."""
    fill(browser, "mint-claims", claims)
    fill(browser, "mint-ttl", ttl)
    old = browser.find_element("id", "mint-token").get_attribute("value")
    browser.find_element("id", "mint-button").click()
    wait_for(browser, lambda b: b.find_element("id", "mint-token").get_attribute("value") != old)
    old_verdict = text_of(browser, "try-verdict")
    browser.find_element("id", "mint-try").click()
    wait_for(browser, lambda b: text_of(b, "try-verdict") not in ("", old_verdict))
    return text_of(browser, "try-verdict")


def test_console_mints_tries_and_shows_recent_decisions(
    demo: tuple[int, str, list[str]], browser: Any, tmp_path: Path
) -> None:
    port, console, lines = demo
    browser.get(console)
    assert browser.title == "token-proxy dev console"
    # The mint form knows the demo's HS256 app and prefills its claims.
    wait_for(browser, lambda b: "demo-app" in text_of(b, "mint-app"))
    prefilled = browser.find_element("id", "mint-claims").get_attribute("value")
    assert '"appId": "demo-app"' in prefilled and '"userId"' in prefilled

    fill(browser, "try-path", "/v1/users/42/threads")
    verdict = mint_and_try(browser, '{"appId": "demo-app", "userId": "42"}', "600")
    assert verdict == "forwarded"
    steps = text_of(browser, "try-steps")
    assert "ok signature: verified with secrets[0]" in steps
    assert "ok bind userId: equals path.userId" in steps
    assert "failed" not in steps
    assert "X-Auth-User-Id 42" in text_of(browser, "try-identity")
    curl = text_of(browser, "mint-curl")
    assert curl.startswith("curl -si -H 'Authorization: Bearer ey")
    assert curl.endswith(f"http://127.0.0.1:{port}/v1/users/42/threads")

    verdict = mint_and_try(browser, '{"appId": "demo-app", "userId": "42"}', "-3600")
    assert verdict == "rejected: 401 TokenExpired (code 40), expired"
    assert text_of(browser, "try-code") == "40"
    assert text_of(browser, "try-reason") == "expired"
    assert "failed times: exp is " in text_of(browser, "try-steps")
    assert not browser.find_element("id", "try-identity-box").is_displayed()

    # Requests from an ordinary HTTP client show up in Recent decisions, live: one with the
    # valid token the demo printed, one without a token.
    printed = next(m for line in lines if (m := re.search(r"Bearer (\S+)' (\S+/42/\S+)", line)))
    auth = {"Authorization": f"Bearer {printed[1]}"}
    request = urllib.request.Request(printed[2], headers=auth)  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        assert response.status == 200
    row = wait_for(browser, lambda b: _row(b, "/v1/users/42/threads"))
    assert row[1:] == ["GET", "/v1/users/42/threads", "/v1/users/{userId}/*", "200",
                       "forwarded", "-", "demo-app"]  # fmt: skip
    probe = f"http://127.0.0.1:{port}/v1/users/7/browser-probe?token=not-shown"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(probe, timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    row = wait_for(browser, lambda b: _row(b, "/v1/users/7/browser-probe"))
    assert row[1:] == ["GET", "/v1/users/7/browser-probe", "/v1/users/{userId}/*", "401",
                       "TokenRequired", "missing", "-"]  # fmt: skip
    assert "not-shown" not in text_of(browser, "recent")

    screenshot = os.environ.get("TOKEN_PROXY_SCREENSHOT") or str(tmp_path / "console.png")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1100, min(int(height) + 140, 2400))  # the whole page, one image
    assert browser.save_screenshot(screenshot)
    browser.set_window_size(1280, 1000)
    assert Path(screenshot).read_bytes().startswith(b"\x89PNG")


def test_console_fits_a_phone_width_window(demo: tuple[int, str, list[str]], browser: Any) -> None:
    _, console, _ = demo
    browser.set_window_size(390, 844)
    try:
        browser.get(console)
        wait_for(browser, lambda b: "demo-app" in text_of(b, "mint-app"))
        # No sideways scrolling of the page: wide tables scroll inside their own box.
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        assert browser.find_element("id", "try-button").is_displayed()
    finally:
        browser.set_window_size(1280, 1000)


def _row(browser: Any, path: str) -> list[str] | None:
    """The cells of the Recent decisions row for `path`, once it is there."""
    for row in browser.find_elements("css selector", "#recent-rows tr"):
        cells = [cell.text for cell in row.find_elements("tag name", "td")]
        if len(cells) > 2 and cells[2] == path:
            return [str(cell) for cell in cells[:8]]
    return None
