"""The Debian package: `make deb` builds it, lintian has no error, and it installs,
runs `gpud check` and removes cleanly.

The install happens with the real `dpkg -i`, in a copy-on-write root: an
overlay of this machine's / whose writes go to a tmpfs in a private mount
namespace. dpkg, its maintainer scripts (systemd-sysusers, systemd-tmpfiles,
deb-systemd-helper), /opt/gpud and /etc/gpud all act for real, and nothing
reaches the host. Slow (about a minute to build) and needs root: marked systemd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
