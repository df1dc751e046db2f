"""The Debian package: `make deb` builds it, lintian has no error, and it installs,
runs `gpud check` and removes cleanly; under a running systemd, an upgrade keeps
the engines serving and a start that fails is reported.

The install happens with the real `dpkg -i`, in a copy-on-write root: an
overlay of this machine's / whose writes go to a tmpfs in a private mount
namespace. dpkg, its maintainer scripts (systemd-sysusers, systemd-tmpfiles,
deb-systemd-helper), /opt/gpud and /etc/gpud all act for real, and nothing
reaches the host. The upgrade tests boot a real systemd as PID 1 in such a root
(tests/sdbox.py, root_overlay): the package's own unit and maintainer scripts
start, restart and report gpud there. Slow (a few minutes to build) and needs
root: marked systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdbox import SystemdBox, unavailable

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "packaging" / "build-deb.sh"

pytestmark = pytest.mark.systemd


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (dpkg -i in a private mount namespace)"
    for tool in ("dpkg-buildpackage", "dh", "lintian", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install dpkg-dev debhelper lintian)"
    if not Path("/usr/bin/python3").exists():
        return "/usr/bin/python3 not found"
    return None


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    if os.environ.get("GPUD_TEST_DEB"):  # one `make deb` built already, for quicker reruns
        yield Path(os.environ["GPUD_TEST_DEB"])
        return
    with tempfile.TemporaryDirectory(prefix="gpud-deb-") as out:
        r = subprocess.run(
            [str(BUILD)],
            env={**os.environ, "OUT_DIR": out},
            capture_output=True,
            text=True,
            timeout=900,
        )
        print(r.stdout[-3000:], r.stderr[-3000:])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "lintian: no errors" in r.stdout
        (path,) = Path(out).glob("gpud_*.deb")
        yield path


def test_deb_has_what_an_operator_needs(deb: Path) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "./opt/gpud/bin/gpud",
        "./usr/bin/gpud -> /opt/gpud/bin/gpud",
        "/systemd/system/gpud.service",
        "./usr/lib/sysusers.d/gpud.conf",
        "./usr/lib/tmpfiles.d/gpud.conf",
        "./etc/gpud/gpud.toml",
        "./usr/share/gpud/policies/",
        "./usr/share/doc/gpud/install.md",
    ):
        assert path in listing, path
    assert "__pycache__" not in listing
    # the unit's Documentation= names files the package installs, as named (not .gz)
    unit = (REPO / "systemd" / "gpud.service").read_text()
    docs = [ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("Documentation=")]
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for url in " ".join(docs).split():
        assert url.startswith("file://") and url[len("file://"):] in files, (url, sorted(files))
    info = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    assert "python3." in info and "systemd" in info
    ctl = Path(tempfile.mkdtemp())
    try:
        subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
        assert (ctl / "conffiles").read_text().split() == ["/etc/gpud/gpud.toml"]
        postinst = (ctl / "postinst").read_text()
        assert "dh_installsysusers" in postinst and "dh_installsystemd" in postinst
    finally:
        shutil.rmtree(ctl)


COW_INSTALL = r"""
set -eu
T=$1; DEB=$2
mount -t tmpfs -o mode=755 tmpfs "$T"
mkdir "$T/upper" "$T/work" "$T/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"
R=$T/root
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/tmp"
mount -t tmpfs tmpfs "$R/run"
cp "$DEB" "$R/tmp/gpud.deb"
chroot "$R" /bin/sh -eu -c '
  step() { echo "== $*"; }
  step install;      dpkg -i /tmp/gpud.deb
  step user;         getent passwd gpud
  step statedir;     stat -c "%U %a" /var/lib/gpud
  step enabled;      readlink /etc/systemd/system/multi-user.target.wants/gpud.service
  step check;        gpud check /etc/gpud/gpud.toml
  step imports;      /opt/gpud/bin/python -c "import gpud.cli, gpud.systemd, aiohttp, pydantic_core"
  step pycache;      find /opt/gpud -name __pycache__ | wc -l
  step remove;       dpkg -r gpud
  step after-remove; ls -A /opt/gpud 2>/dev/null | wc -l
  test -f /etc/gpud/gpud.toml && echo conffile-kept
  step purge;        dpkg --purge gpud
  step after-purge;  test -e /etc/gpud && echo etc-left || echo etc-gone
  step done
'
"""


def _steps(out: str) -> dict[str, str]:
    steps: dict[str, str] = {}
    name = ""
    for line in out.splitlines():
        if line.startswith("== "):
            name = line[3:].strip()
            steps[name] = ""
        elif name:
            steps[name] += line + "\n"
    return steps


def test_install_check_remove_purge_in_a_cow_root(deb: Path) -> None:
    mnt = Path(tempfile.mkdtemp(prefix="gpud-cow-"))
    try:
        r = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                COW_INSTALL,
                "cow",
                str(mnt),
                str(deb),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        mnt.rmdir()  # the tmpfs lived only in the private namespace: empty here
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    s = _steps(r.stdout)
    assert "done" in s, out
    assert s["user"].startswith("gpud:x:"), out
    assert s["statedir"].strip() == "gpud 750"
    assert s["enabled"].strip().endswith("/gpud.service")
    assert "valid" in s["check"], out
    assert s["pycache"].strip() == "0", "gpud must not leave files dpkg does not own"
    assert s["after-remove"].split() == ["0", "conffile-kept"]
    assert s["after-purge"].strip() == "etc-gone"


# -- under a running systemd: upgrade and a failed start ---------------------------------

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TINY_MODEL_DIR = REPO / ".state" / "models" / "tiny"
MODELS = ("chat", "code")


@pytest.fixture(scope="module")
def newer_deb(deb: Path) -> Iterator[Path]:
    """The same package, one version up: what `apt upgrade` would install next."""
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="gpud-deb-new-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
        control = tree / "DEBIAN" / "control"
        control.write_text(
            control.read_text().replace(f"Version: {version}\n", f"Version: {version}+1\n")
        )
        out = Path(tmp) / f"gpud_{version}+1.deb"
        subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(tree), str(out)], check=True,
                       capture_output=True)
        yield out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _config(port: int, models: tuple[str, ...]) -> str:
    cmd = ", ".join(
        f'"{c}"' for c in (VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model")
    )
    text = f"""# written before the package is installed, as config management would
{"" if models else "models = {}"}
[daemon]
listen = "127.0.0.1:{port}"
tick = "1s"
port_range = "18700-18799"

[engines.vllm]
command = [{cmd}]
sleep_mode = false
startup_timeout = "5m"
stop_timeout = "15s"
env = {{ VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "nobind" }}
"""
    for name in models:
        text += f"""
[models.{name}]
source = "/var/lib/gpud-models/tiny"
state = "awake"
max_model_len = 256
args = ["--enforce-eager"]
"""
    return text


def _dropin() -> str:
    """What this checkout needs beyond the packaged unit: the engines' interpreter lives
    under /root (pyenv), which ProtectHome=yes hides; show only it, read-only."""
    base = Path(sys.base_prefix).resolve()
    venv = VLLM_PYTHON.parent.parent.resolve()
    vbase = Path(os.path.realpath(VLLM_PYTHON)).parent.parent
    binds = " ".join(sorted({str(base), str(venv), str(vbase)}))
    return f"[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths={binds}\n"


class Installed:
    """A systemd box with a root of its own, where the test runs dpkg as an operator."""

    def __init__(self, box: SystemdBox, port: int) -> None:
        self.box, self.port = box, port
        self.url = f"http://127.0.0.1:{port}"

    def dpkg(self, *args: str) -> subprocess.CompletedProcess[str]:
        # the config was written first: keep it, as `apt` with config management would
        return self.box.run("dpkg", "--force-confold", "--force-confdef", *args,
                            check=False, timeout=600)

    def deb(self, path: Path) -> str:
        """The .deb where dpkg inside sees it (the box shares only /tmp)."""
        dest = self.box.state / path.name
        shutil.copy(path, dest)
        return str(dest)

    def prop(self, name: str) -> str:
        return self.box.prop("gpud.service", name)

    def status(self) -> Any | None:
        try:
            return _get(self.url + "/api/v1/status")
        except OSError:
            return None

    def awake(self, models: tuple[str, ...]) -> dict[str, Any] | None:
        st = self.status()
        if st is None:
            return None
        ms = st["models"]
        if all(ms.get(m, {}).get("state") == "awake" for m in models):
            return dict(ms)
        return None


@pytest.fixture()
def installed() -> Iterator[Installed]:
    reason = _missing() or unavailable()
    if reason:
        pytest.skip(reason)
    port = _free_port()
    with SystemdBox.boot(root_overlay=True) as box:
        inst = Installed(box, port)
        try:
            yield inst
        finally:
            box.ctl("stop", "gpud.service", check=False, timeout=120)
            journal = box.journal("gpud.service", "-p", "warning")
            sys.stdout.write(journal[-6000:] + box.journal("gpud.service")[-3000:])


class Poller:
    """Asks each engine (its own port, not gpud's) for /v1/models until stopped."""

    def __init__(self, ports: list[int]) -> None:
        self.ports, self.ok, self.failed = ports, 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for port in self.ports:
                try:
                    _get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
                    self.ok += 1
                except OSError as exc:
                    self.failed.append(f"{port}: {exc}")
            self._stop.wait(0.2)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.engine
def test_upgrade_keeps_two_engines_serving(
    installed: Installed, deb: Path, newer_deb: Path
) -> None:
    if not VLLM_PYTHON.exists():
        pytest.skip(".venv-vllm not installed (make setup)")
    from gpud.engines.models import ensure_tiny_model

    box = installed.box
    model = ensure_tiny_model(TINY_MODEL_DIR, VLLM_PYTHON)
    dest = box.ns_path("/var/lib/gpud-models/tiny")
    shutil.copytree(model, dest)
    for p in [dest.parent, dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # user gpud does not exist yet
    box.write("/etc/gpud/gpud.toml", _config(installed.port, MODELS))
    box.write("/etc/systemd/system/gpud.service.d/50-test-paths.conf", _dropin())

    r = installed.dpkg("-i", installed.deb(deb))
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed.prop("ActiveState") == "active", "postinst starts gpud"
    assert box.wait(lambda: installed.awake(MODELS) is not None, 300, 1), installed.status()
    before = installed.awake(MODELS)
    assert before is not None
    pids = {m: before[m]["pid"] for m in MODELS}
    ports = [before[m]["port"] for m in MODELS]
    gpud_pid = installed.prop("MainPID")

    with Poller(ports) as poll:
        t0 = time.monotonic()
        r = installed.dpkg("-i", installed.deb(newer_deb))
        took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"dpkg -i (upgrade) took {took:.1f}s; engines answered {poll.ok} requests meanwhile")
    assert poll.failed == [], poll.failed[:5]
    assert poll.ok >= 2

    version = box.run("dpkg-query", "-W", "-f=${Version}", "gpud").stdout
    assert version.endswith("+1"), version
    # gpud itself was replaced ...
    assert installed.prop("ActiveState") == "active"
    assert installed.prop("MainPID") != gpud_pid
    # ... and the new one adopted the same engines, awake, without reloading them
    assert box.wait(lambda: installed.awake(MODELS) is not None, 60, 0.5), installed.status()
    after = installed.awake(MODELS)
    assert after is not None
    assert {m: after[m]["pid"] for m in MODELS} == pids
    journal = box.journal("gpud.service")
    assert "stopping for gpud package upgrade" in journal, journal[-3000:]
    assert "adopted 2 running engine(s)" in journal, journal[-3000:]

    import openai

    client = openai.OpenAI(base_url=installed.url + "/v1", api_key="none", max_retries=0)
    for m in MODELS:
        out = client.completions.create(model=m, prompt="hello", max_tokens=2)
        assert out.model == m and out.choices

    # the upgrade's marker held for that one stop: a plain stop stops the engines again
    box.ctl("stop", "gpud.service", timeout=120)
    for pid in pids.values():
        assert box.wait(
            lambda pid=pid: box.run("test", "-d", f"/proc/{pid}", check=False).returncode != 0,
            30,
        ), f"engine {pid} still running after systemctl stop"


def test_a_failed_start_at_install_is_reported(installed: Installed, deb: Path) -> None:
    box = installed.box
    box.write("/etc/gpud/gpud.toml", _config(installed.port, ()))
    with socket.socket() as taken:  # another server (llama-swap, say) has the port
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", installed.port))
        taken.listen()
        r = installed.dpkg("-i", installed.deb(deb))
        assert r.returncode != 0, r.stdout + r.stderr
        assert "gpud: 'systemctl start gpud.service' failed: gpud is not running." in r.stderr
        # the unit's status, with gpud's own reason from the journal
        assert f"cannot listen on 127.0.0.1:{installed.port}" in r.stderr, r.stderr
        assert "dpkg --configure -a" in r.stderr
        st = box.run("dpkg-query", "-W", "-f=${Status}", "gpud").stdout
        assert st == "install ok half-configured", st
    # the port is free again: what the message says to do finishes the install
    box.ctl("reset-failed", "gpud.service", check=False)
    r = installed.dpkg("--configure", "-a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed.prop("ActiveState") == "active"
    assert installed.status() is not None
