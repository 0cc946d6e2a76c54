"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, and a real API served by
uvicorn in a thread: what the web-page tests run against.

scripts/setup.sh installs the browser where it can (root with apt-get, as CI runs); elsewhere the browser tests
are skipped with the reason.
"""

from __future__ import annotations

import base64
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.live_server import serve  # noqa: F401 - the browser tests serve the app with it

T = TypeVar("T")
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def browser_binaries() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when either is missing."""
    driver = shutil.which("chromedriver")
    browser = next((path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chromium(download_dir: Path, width: int = 1280, height: int = 800) -> Any:
    """A headless Chromium that saves downloads to `download_dir` without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binaries = browser_binaries()
    assert binaries is not None
    browser, driver_path = binaries
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    driver.set_page_load_timeout(60)
    return driver


def wait_for(check: Callable[[], T | None], timeout_s: float = 60.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; its last value, or an AssertionError naming `what`."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except (StaleElementReferenceException, NoSuchElementException):
            # The page reloads itself when a job ends (and after form posts): the element is looked up again, as
            # Selenium's own WebDriverWait does.
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def full_page_screenshot(driver: Any, path: Path) -> Path:
    """The whole page (beyond the viewport) as a PNG, through the DevTools protocol."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
