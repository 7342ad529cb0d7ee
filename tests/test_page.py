"""The page in a real headless Chromium: type a message, see the text stream in, see the stats
panel fill with non-zero figures; a screenshot is saved."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.serving import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra) is missing")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

# slow: starting the server and the browser takes ~40 s on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no browser: install Chromium and its driver (apt-get install -y chromium "
    "chromium-driver; .ci/run does)")]


@pytest.fixture(scope="module")
def server(demo_store):
  # a memory budget, so that the page shows a memory plan too
  srv = Server(demo_store, "--memory_budget_gb=1.5")
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def browser():
  from selenium.webdriver.chrome.options import Options  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  opts = Options()
  opts.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,860"):
    opts.add_argument(arg)
  drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
  yield drv
  drv.quit()


def _wait(predicate, timeout=60.0, what=""):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what}")


def test_page_streams_and_shows_figures(server, browser, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  browser.get(server.url + "/")
  _wait(lambda: browser.find_element(By.ID, "health").text == "ready", what="ready")
  box = browser.find_element(By.ID, "prompt")
  box.send_keys("def read_lines(path):")
  browser.find_element(By.ID, "send").click()
  reply = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"), what="reply")[0]
  # streamed: the text is seen growing before the reply is done
  lengths = []
  while not reply.get_attribute("data-done"):
    lengths.append(len(reply.text))
    time.sleep(0.02)
    assert len(lengths) < 3000, "the reply never finished"
  assert reply.text.strip() and reply.get_attribute("data-finish") in ("stop", "length")
  assert len(set(lengths)) >= 2 or len(lengths) < 3, lengths  # seen part-way at least once

  def figure(name):
    text = browser.find_element(By.ID, "stat-" + name).text
    try:
      return float(text.split()[0])
    except ValueError:
      return 0.0
  names = ("tok_s", "hit_rate", "mb_per_token", "pool_slots", "generated", "ttft", "rss")
  _wait(lambda: all(figure(n) > 0 for n in names), timeout=10, what="non-zero figures")
  assert float(browser.find_element(By.ID, "stat-kv").text.split("/")[1].split()[0]) > 0
  assert "memory plan for 1.50 GB" in browser.find_element(By.ID, "plan").text
  shot = os.environ.get("LAZYMOE_SCREENSHOT") or str(tmp_path / "page.png")
  browser.save_screenshot(shot)
  print(f"screenshot: {shot}")
  assert os.path.getsize(shot) > 10_000
