"""The chat page at / in a real browser: headless Chromium (Debian's package, driven by Playwright's Python
package; no browser download) types a message, reads the answer as it streams in and compares it with `torchat
chat`'s greedy answer; a second turn keeps the conversation; the stop button ends an answer.

Skipped, saying why, only where Chromium or Playwright is missing (.ci/run installs both).
"""

import time
from pathlib import Path

import pytest
from test_server import CONTEXT, SYSTEM, Reference, start_server

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_MS = 300_000  # one answer on a busy 2-core machine

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra pins playwright (the Python package "
                                                             "only; the browser is Debian's chromium)")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(request, smollm2_gguf):
    return start_server(request, [str(smollm2_gguf), "--max-seq-length", str(CONTEXT), "--max-batch", "2"])


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from torchat.model_source import ModelSource

    return Reference(ModelSource(checkpoint=smollm2_gguf, max_seq_len=CONTEXT))


@pytest.fixture
def page(server, tmp_path):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)  # the waits for answers say their own
            page.goto(f"{server.url}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('context')")
            page.click("#settings summary")  # the settings: system prompt, max tokens
            yield page
        finally:
            context.close()


def send(page, text: str, max_tokens: int) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.dispatch_event("#max-tokens", "change")
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_answer(page):
    return page.locator(".assistant").last


def test_the_page_streams_the_greedy_answer_and_keeps_the_conversation(page, server, reference):
    page.fill("#system", SYSTEM)
    # every text the newest answer shows, to see that it grows token by token
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('.assistant');
            if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    session = reference.session(32)
    expected = [reference.reply(session, q)[0] for q in ("What is the capital of France?", "And of Germany?")]

    send(page, "What is the capital of France?", 32)
    page.wait_for_selector(".assistant[data-state='done']", timeout=ANSWER_MS)
    assert last_answer(page).text_content() == expected[0]
    shown = [text for text in page.evaluate("window.seen") if text]
    assert len(set(shown)) > 3 and all(expected[0].startswith(text) for text in shown), shown

    send(page, "And of Germany?", 32)
    page.wait_for_function("document.querySelectorAll(\".assistant[data-state='done']\").length === 2",
                           timeout=ANSWER_MS)
    answer = last_answer(page)
    assert answer.text_content() == expected[1]
    assert int(answer.get_attribute("data-reused")) > 20  # the first turn was still in the slot's cache
    assert page.locator(".user").all_text_contents() == ["What is the capital of France?", "And of Germany?"]


def test_the_stop_button_ends_an_answer(page, server):
    send(page, "Tell me a long story about a dragon and a knight.", 400)
    page.wait_for_function("(document.querySelector('.assistant') || {}).textContent?.length > 0",
                           timeout=ANSWER_MS)
    page.click("#stop")
    page.wait_for_selector(".assistant[data-state='done']")
    assert last_answer(page).get_attribute("data-finish") == "stopped"
    assert page.locator(".note").last.text_content() == "[stopped]"
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    deadline = time.monotonic() + 60
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["active"] == 0  # the server dropped the answer the page stopped
