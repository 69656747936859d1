"""The web chat page in the system's headless Chromium (Debian's chromium and chromium-driver; nothing is
downloaded): upload a PNG, send a question, wait for the streamed answer, see an error, save a screenshot."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (the serve-test extra)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="Chromium is not installed (Debian: apt-get install chromium chromium-driver)",
    ),
]

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from tiny_server import live_server, tiny_parts  # noqa: E402

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def test_page_uploads_an_image_and_streams_the_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for a browser online
    image = tmp_path / "question.png"
    Image.fromarray(np.full((48, 48, 3), (30, 120, 220), dtype=np.uint8)).save(image)
    model, processor, _ = tiny_parts()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    with live_server(model, processor) as (url, engine):
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-eve")
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("8")
            driver.find_element(By.ID, "image").send_keys(str(image))
            driver.find_element(By.ID, "text").send_keys("what is in this image")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant span"))
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant span").text
            assert answer.strip()
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the uploaded image is shown
            # An error from the server is shown on the page.
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("100000")
            driver.find_element(By.ID, "text").send_keys("what")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
            assert "context" in driver.find_element(By.CSS_SELECTOR, ".msg.error").text
            shot = os.environ.get("EVE_SCREENSHOT_DIR", str(tmp_path))
            assert driver.save_screenshot(os.path.join(shot, "chat-page.png"))
        finally:
            driver.quit()
    assert engine.stats.completed >= 1
