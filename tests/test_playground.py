"""The chat playground at `/`, driven in headless Chromium (the distribution's package, through
Playwright) against real `llama-jax serve` processes: the real default model for chatting,
stopping and JSON, the demo model with `--api-key` for the 401. Screenshots land in
$LLAMA_JAX_TEST_ARTIFACTS (default `.artifacts/` in the checkout, ignored by git)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from live_server import REPO_ROOT, LiveServer, ServeProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LLAMA_JAX_TEST_ARTIFACTS") or REPO_ROOT / ".artifacts")
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}



@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's), driven by Playwright; skips, saying what is missing, without them."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: run tools/install_browser.sh")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def open_page(browser, url: str, key: str | None = None):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(url + "/")
    if key is not None:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
    return page


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def watch_streamed_text(page) -> None:
    """Count, in `window.streamedRenders`, the DOM changes that put text into a reply still marked as streaming."""
    page.evaluate("""() => {
      window.streamedRenders = 0;
      new MutationObserver(records => {
        for (const r of records) {
          const el = r.target.nodeType === Node.ELEMENT_NODE ? r.target : r.target.parentElement;
          const msg = el && el.closest(".msg.assistant.streaming");
          if (msg && msg.querySelector(".body").textContent) window.streamedRenders++;
        }
      }).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
    }""")


def busy_slots(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^llama_jax_busy_slots(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE))


def test_the_page_is_one_small_cacheable_file_open_without_a_key(strict):
    r = httpx.get(strict.url + "/", timeout=10)  # strict has API keys: the page is open, the API is not
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert len(r.content) < 100_000 and b"http://" not in r.content and b"https://" not in r.content  # no CDN
    again = httpx.get(strict.url + "/", headers={"If-None-Match": r.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and not again.content
    assert httpx.get(strict.url + "/v1/models", timeout=10).status_code == 401


@pytest.mark.slow
def test_a_message_streams_and_finishes_with_stats(browser, quick_start):
    page = open_page(browser, quick_start.url)
    page.wait_for_function("document.getElementById('model').textContent === 'SmolLM2-135M-Instruct'")
    page.fill("#temperature", "0")
    watch_streamed_text(page)
    send(page, "What is the capital of France?")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
    # Text arrived while the reply was still streaming. A short reply can stream and finish between two polls of
    # wait_for_selector, so a MutationObserver counts the renders instead.
    assert page.evaluate("window.streamedRenders") >= 1
    reply = page.inner_text(".msg.assistant .body")
    assert "Paris" in reply
    stats = page.inner_text(".msg.assistant .stats")
    assert re.search(r"\d+ prompt \+ \d+ completion tokens · TTFT [\d.]+ s · [\d.]+ tok/s · stop", stats), stats
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"))
    page.close()


@pytest.mark.slow
def test_model_output_is_rendered_as_text_and_code_blocks_as_code(browser, quick_start):
    page = open_page(browser, quick_start.url)
    page.wait_for_function("document.getElementById('model').textContent !== '…'")
    page.fill("#temperature", "0")
    send(page, "Write a Python function that adds two numbers, in a Markdown code block.")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
    assert page.locator(".msg.assistant pre code").count() >= 1
    # The user's own markup is shown literally, never parsed.
    send(page, "<img src=x onerror=\"document.title='pwned'\"> <b>bold?</b>")
    page.wait_for_selector(".msg.assistant[data-done] >> nth=1", timeout=120_000)
    assert page.locator(".msg img, .msg b").count() == 0 and page.title() != "pwned"
    assert "<b>bold?</b>" in page.inner_text(".msg.user >> nth=1")
    page.close()


@pytest.mark.slow
def test_stop_cancels_the_request_on_the_server(browser, quick_start):
    page = open_page(browser, quick_start.url)
    page.wait_for_function("document.getElementById('model').textContent !== '…'")
    page.fill("#max_tokens", "400")
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    page.wait_for_selector(".msg.assistant.streaming .body:not(:empty)", timeout=60_000)
    assert busy_slots(quick_start.url) >= 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='stopped']", timeout=10_000)
    deadline = time.time() + 10
    while busy_slots(quick_start.url) and time.time() < deadline:
        time.sleep(0.1)
    assert busy_slots(quick_start.url) == 0, "the stopped request still holds a slot"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.close()


@pytest.mark.slow
def test_json_schema_gives_valid_json(browser, quick_start):
    page = open_page(browser, quick_start.url)
    page.wait_for_function("document.getElementById('model').textContent !== '…'")
    page.select_option("#format", "json_schema")
    page.fill("#schema", json.dumps(PERSON))
    send(page, "Invent a person.")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
    jsonschema.validate(json.loads(page.inner_text(".msg.assistant .body")), PERSON)
    page.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    server = ServeProcess(tmp_path_factory.mktemp("keyed"), "--demo", "--api-key", "right-key", "--max-slots", "2",
                          "--max-seq-len", "256", "--max-prefill-tokens", "128")
    yield server
    server.stop()


@pytest.mark.slow
def test_a_wrong_api_key_shows_the_401_message_and_the_right_one_works(browser, keyed):
    page = open_page(browser, keyed.url, key="wrong-key")
    page.wait_for_function("document.getElementById('model').textContent.includes('Incorrect API key')")
    send(page, "Hello!")
    page.wait_for_selector(".msg.error")
    assert "Incorrect API key provided." in page.inner_text(".msg.error")
    page.close()
    page = open_page(browser, keyed.url, key="right-key")
    page.wait_for_function("document.getElementById('model').textContent === 'llama-jax-demo'")
    assert page.evaluate("localStorage.getItem('llama-jax-api-key')") == "right-key"
    page.fill("#max_tokens", "16")
    send(page, "Hello!")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=60_000)
    assert page.locator(".msg.error").count() == 0
    page.close()


def test_no_playground_flag(strict):
    """`--no-playground` (the setting it sets): no page at /, the API unchanged."""
    from api.app import create_app
    from api.cli import build_parser
    from api.settings import ServerSettings

    assert build_parser().parse_args(["serve", "--no-playground"]).playground is False
    server = LiveServer(create_app(strict.engine, ServerSettings(playground=False)), strict.engine)
    try:
        assert httpx.get(server.url + "/", timeout=10).status_code == 404
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200
    finally:
        server.stop()
