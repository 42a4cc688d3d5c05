"""The web chat page in a real headless browser (Debian's chromium + chromedriver, driven by
selenium; nothing downloaded): upload a DICOM, see its rendered preview, ask, get the streamed
answer the Generator gives, ask again with the conversation kept, stop a long answer. A screenshot
of the page lands in $SERVE_SCREENSHOT (default: the test's tmp dir), one of the stopped answer
beside it. The page at desktop width and as a 390 px phone: a failed upload, a long word, an error
bubble, the API-key header (screenshots *_desktop.png, *_phone.png, *_key_*.png beside it)."""
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


# --- the page at desktop and phone width ----------------------------------------------------------

PHONE = dict(width=390, height=844, deviceScaleFactor=2, mobile=True)   # an iPhone 12-14 screen
LAYOUT = """
  // What breaks the layout: sideways scrolling, an element outside the viewport, a word cut in
  // two although it fits a line.
  const W = innerWidth, bad = [];
  if (document.scrollingElement.scrollWidth > W)
    bad.push("page scrolls sideways: " + document.scrollingElement.scrollWidth + " > " + W);
  const name = (el) => el.id || el.className || el.tagName;
  for (const el of document.querySelectorAll(
      "header, #model, main > section, #file, #preview, .note, #question, #send, #stop, #reset, "
      + ".msg, .msg .text, .msg .status")) {
    const r = el.getBoundingClientRect();
    if (r.width && (r.left < -0.5 || r.right > W + 0.5))
      bad.push(name(el) + " spans " + Math.round(r.left) + ".." + Math.round(r.right) + " of " + W);
  }
  for (const el of document.querySelectorAll(".note, #model, .msg .text, .msg .status")) {
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode());) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        if (m[0].length > 25) continue;   // a word longer than a line must break
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].filter((q) => q.width)
                             .map((q) => Math.round(q.top)));
        if (tops.size > 1) bad.push(name(el) + ": '" + m[0] + "' broken across lines");
      }
    }
  }
  return bad;"""


@pytest.fixture(params=["desktop", "phone"])
def screen(request, browser):
  """The browser at 1280 px wide, or emulating a 390 px phone."""
  if request.param == "phone":
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
  yield request.param
  browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def open_page(browser, url):
  from selenium.webdriver.common.by import By
  browser.get(url + "/")
  wait(browser, lambda d: d.find_element(By.ID, "model").text != "connecting...")
  return browser.find_element(By.ID, "model")


def rgb(css: str) -> tuple:
  return tuple(int(float(v)) for v in css[css.index("(") + 1:css.index(")")].split(",")[:3])


def test_page_failed_upload_long_words_and_errors(browser, screen, tmp_path):
  """A failed upload clears the image that was pending (neither the next question nor New chat
  takes the previous one) and says so; a 300-letter word wraps; the refused question's bubble is
  red, not grey; nothing leaves the viewport, the page never scrolls sideways and no note breaks
  inside a word."""
  from selenium.webdriver.common.by import By
  srv = shared_server()
  assert open_page(browser, srv.url).text == MODEL
  assert browser.execute_script("return innerWidth") == (390 if screen == "phone" else 1280)
  browser.find_element(By.ID, "file").send_keys(DICOM)
  wait(browser, lambda d: d.execute_script("return chat.pending !== null"))
  answer = ask(browser, "What is shown?", 2)
  wait(browser, lambda d: answer.get_attribute("data-state") == "done")
  note = browser.find_element(By.ID, "image-note")
  assert note.text == "The image is in the conversation (New chat starts over with it)."
  assert browser.execute_script(LAYOUT) == []

  browser.find_element(By.ID, "file").send_keys(os.path.join(srv.image_root, "slide.png"))
  wait(browser, lambda d: "goes with your next question" in note.text)
  bad = tmp_path / "scan.png"
  bad.write_bytes(b"these are not the pixels of a scan\n" * 20)
  browser.find_element(By.ID, "file").send_keys(str(bad))
  wait(browser, lambda d: "error" in note.get_attribute("class"))
  assert note.text.startswith("scan.png: ") and note.text.endswith(
      "No image goes with your next question; choose another file.")
  state = browser.execute_script("""return [chat.pending, chat.image, $('file').value,
                                            $('preview').hasAttribute('src')]""")
  assert state == [None, None, "", False]
  browser.find_element(By.ID, "reset").click()   # New chat: no image either

  browser.execute_script("""window.sent = []; const plain = window.fetch;
    window.fetch = (url, init) => { if (url === '/v1/chat/completions') sent.push(init.body);
                                    return plain(url, init); };""")
  word = "pneumonoultramicroscopicsilicovolcanoconiosis" * 7
  answer = ask(browser, f"Is {word} visible? New chat starts over.", 1000)   # over LIMITS
  wait(browser, lambda d: answer.get_attribute("data-state") == "error")
  import json
  body = json.loads(browser.execute_script("return sent[0]"))
  assert [[c["type"] for c in m["content"]] for m in body["messages"]] == [["text"]]
  assert not browser.find_elements(By.CSS_SELECTOR, ".msg.user img")
  assert "max_tokens 1000 is more than this server allows" in answer.text

  style = browser.execute_script("""const s = getComputedStyle(arguments[0]);
    return [s.backgroundColor, s.color, s.borderTopColor];""", answer)
  (br, bg, bb), (r, g, b), (lr, lg, lb) = (rgb(c) for c in style)
  assert br > bg and br > bb, style        # a red tint, not the grey of an answer
  assert r > 120 and r > 2 * g and r > 2 * b, style
  assert lr > lg and lr > lb, style
  assert browser.execute_script(LAYOUT) == []
  shot = os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "chat_page.png"))
  browser.save_screenshot(shot.replace(".png", f"_{screen}.png"))


def test_page_header_follows_the_api_key(browser, screen, tmp_path):
  """With a server that wants a key, the header says the key is missing (in red) and opens the
  key field; typing the key shows the model; a wrong key says so again."""
  from selenium.webdriver.common.by import By
  from serve import api
  from serve.server import create_app
  from tests.serve_fixture import Running
  srv = shared_server()
  # An engine of its own (engines are kept per layout, and an app closes its engine's loop),
  # never warmed: no request runs on it.
  engine = srv.gen.engine(srv.gen.context_layout(1), max_queue=16)
  keyed = Running(create_app(engine, model_name=MODEL, api_key="s3cret",
                             limits=api.Limits(**LIMITS)))
  try:
    header = open_page(browser, keyed.url)
    assert "missing or wrong API key" in header.text and "error" in header.get_attribute("class")
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()
    key.send_keys("s3cret")
    wait(browser, lambda d: header.text == MODEL, timeout=10)
    assert "error" not in header.get_attribute("class")
    assert browser.execute_script(LAYOUT) == []
    key.send_keys("x")
    wait(browser, lambda d: "missing or wrong API key" in header.text, timeout=10)
    assert browser.execute_script(LAYOUT) == []
    shot = os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "chat_page.png"))
    browser.save_screenshot(shot.replace(".png", f"_key_{screen}.png"))
  finally:
    keyed.close()
