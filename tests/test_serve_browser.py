"""The web chat page in a real headless browser (Debian's chromium + chromedriver, driven by
selenium; nothing downloaded): upload a DICOM, see its rendered preview, ask, get the streamed
answer the Generator gives, ask again with the conversation kept, stop a long answer. A screenshot
of the page lands in $SERVE_SCREENSHOT (default: the test's tmp dir), one of the stopped answer
beside it."""
import os
import shutil

import pytest

from data.image import load_image
from tests.serve_fixture import DICOM, LIMITS, MODEL, shared_server
from tests.test_serve import expected

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver packages "
    "(`make test` installs them: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
    opts.add_argument(arg)
  driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
  driver.set_script_timeout(60)
  yield driver
  driver.quit()


def wait(driver, condition, timeout=60):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def ask(driver, question, max_tokens):
  from selenium.webdriver.common.by import By
  box = driver.find_element(By.ID, "max-tokens")
  box.clear()
  box.send_keys(str(max_tokens))
  driver.find_element(By.ID, "question").send_keys(question)
  n = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
  driver.find_element(By.ID, "send").click()
  wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > n)
  return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n]


def text(driver, answer) -> str:
  """The answer exactly as streamed into the page (textContent: no whitespace normalizing)."""
  return driver.execute_script("return arguments[0].querySelector('.text').textContent", answer)


def test_chat_page_upload_stream_multi_turn_and_stop(browser, tmp_path):
  from selenium.webdriver.common.by import By
  srv = shared_server()
  ct = load_image(DICOM)
  browser.get(srv.url + "/")
  wait(browser, lambda d: d.find_element(By.ID, "model").text == MODEL)
  browser.find_element(By.ID, "file").send_keys(DICOM)
  preview = browser.find_element(By.ID, "preview")
  wait(browser, lambda d: d.execute_script("return arguments[0].complete && "
                                           "arguments[0].naturalWidth", preview) == 128)
  first_q, second_q, long_q = "What is shown in the image?", "Where?", "Tell me everything."

  answer = ask(browser, first_q, 12)
  wait(browser, lambda d: answer.get_attribute("data-state") == "done")
  first, _ = expected(srv, first_q, [ct])
  assert text(browser, answer) == first.text
  user_img = browser.find_elements(By.CSS_SELECTOR, ".msg.user img")
  assert len(user_img) == 1   # the image went with the first question only

  answer = ask(browser, second_q, 12)
  wait(browser, lambda d: answer.get_attribute("data-state") == "done")
  second, _ = expected(srv, second_q, [ct], history=[(first_q, first.text)])
  assert text(browser, answer) == second.text
  shot = os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "chat_page.png"))
  browser.save_screenshot(shot)

  # New chat: the same image goes with the next question. Stop is pressed the moment the first
  # words appear (by an observer in the page: a tiny model on CPU outruns any remote click).
  browser.find_element(By.ID, "reset").click()
  assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
  full, _ = expected(srv, long_q, [ct], max_tokens=LIMITS["max_tokens"])
  assert full.finish_reason == "length"   # left alone it would run to the token limit
  cancelled = srv.get("/health")["cancelled"]
  browser.execute_script("""
    new MutationObserver((changes, obs) => {
      const last = [...document.querySelectorAll('.msg.assistant .text')].pop();
      if (last && last.textContent) { obs.disconnect(); document.getElementById('stop').click(); }
    }).observe(document.getElementById('log'), {childList: true, subtree: true,
                                                characterData: true});""")
  answer = ask(browser, long_q, LIMITS["max_tokens"])
  wait(browser, lambda d: answer.get_attribute("data-state") == "stopped")
  partial = text(browser, answer)
  assert partial and full.text.startswith(partial) and len(partial) < len(full.text)
  assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1
  assert "(stopped)" in answer.text
  wait(browser, lambda d: srv.get("/health")["cancelled"] > cancelled, timeout=20)
  assert browser.find_element(By.ID, "send").is_enabled()
  assert not browser.find_element(By.ID, "stop").is_enabled()
  browser.save_screenshot(shot.replace(".png", "_stopped.png"))
