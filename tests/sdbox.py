"""A real systemd (PID 1 of private namespaces) for gpud's tests.

`SystemdBox.boot()` starts systemd 252+ as PID 1 of new pid/mount/uts/ipc/cgroup
namespaces (tests/sdbox/sdbox.sh, from shared/SYSTEMD.md) in well under a second,
and `down()` powers it off; use it as a context manager so teardown always runs.
Units go to `box.units` (the nested SYSTEMD_UNIT_PATH); files the service must
see under ProtectSystem=strict/PrivateTmp= go to the namespace's /run through
`box.ns_path("/run/...")`.

Never touches the host: /run, /dev, /var/lib, /var/tmp and the journal are
private tmpfs, and /etc is an overlay (writes land in STATE/etc-upper), so
StateDirectory=, ConfigurationDirectory=, `users` and a test's /etc/gpud/gpud.toml
stay inside.
Needs root and util-linux; `unavailable()` says why not, for pytest.skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent / "sdbox"
SCRIPT = HERE / "sdbox.sh"
SYSTEMD_BIN = Path("/lib/systemd/systemd")


def unavailable() -> str | None:
    """Why a real systemd cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (mount, mknod, cgroup2)"
    if not SYSTEMD_BIN.exists():
        return f"{SYSTEMD_BIN} not installed (apt-get install systemd)"
    for tool in ("unshare", "nsenter", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not Path("/usr/bin/python3").exists():
        return "/usr/bin/python3 not found (console relay)"
    return None


def _free_id(taken: set[int], start: int = 990) -> int:
    candidate = start
    while candidate in taken:
        candidate -= 1
    return candidate


def _write_accounts(state: Path, users: Iterable[str], groups: Mapping[str, Iterable[str]]) -> None:
    """passwd/group copies with system users added, bind-mounted inside only."""
    passwd = Path("/etc/passwd").read_text().splitlines()
    group = Path("/etc/group").read_text().splitlines()
    uids = {int(line.split(":")[2]) for line in passwd if line.count(":") >= 6}
    gids = {int(line.split(":")[2]) for line in group if line.count(":") >= 3}
    names = {line.split(":")[0] for line in passwd}
    gnames = {line.split(":")[0] for line in group}
    for user in users:
        if user in names:
            continue
        uid = _free_id(uids | gids)
        uids.add(uid)
        gids.add(uid)
        passwd.append(f"{user}:x:{uid}:{uid}:{user}:/var/lib/{user}:/usr/sbin/nologin")
        if user not in gnames:
            group.append(f"{user}:x:{uid}:")
            gnames.add(user)
    for gname, members in groups.items():
        if gname not in gnames:
            gid = _free_id(uids | gids)
            gids.add(gid)
            group.append(f"{gname}:x:{gid}:{','.join(members)}")
    (state / "passwd").write_text("\n".join(passwd) + "\n")
    (state / "group").write_text("\n".join(group) + "\n")


class SystemdBox:
    """One running nested systemd; drive it with `ctl`, `run`, `prop`."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.units = state / "units"
        self.pid = int((state / "systemd.pid").read_text())

    @classmethod
    @contextmanager
    def boot(
        cls,
        *,
        users: Iterable[str] = (),
        groups: Mapping[str, Iterable[str]] | None = None,
        devices: Iterable[str] = (),
        keep_state: bool = False,
        root_overlay: bool = False,
    ) -> Iterator[SystemdBox]:
        """Boot, yield the box, always power it off and remove its cgroup.

        `users`: system users to exist inside (e.g. "gpud"); `groups`: extra
        groups if missing; `devices`: host /dev node names to recreate in the
        private /dev (e.g. "nvidiactl", "nvidia0"). `root_overlay`: all of /
        is a private overlay, so `dpkg -i` inside installs a package for real
        and its unit (/lib/systemd/system) is the one the manager runs.
        """
        reason = unavailable()
        if reason:
            raise RuntimeError(f"cannot boot systemd: {reason}")
        # the basename names the cgroup: unique per instance
        state = Path(tempfile.mkdtemp(prefix="gpud-sdbox-"))
        try:
            if users or groups:
                _write_accounts(state, users, groups or {})
            if root_overlay:
                (state / "root-overlay").touch()
            dev_list = [d for d in devices if d]
            if dev_list:
                (state / "devices").write_text("\n".join(dev_list) + "\n")
            up = subprocess.run(
                [str(SCRIPT), "up", str(state)], capture_output=True, text=True, timeout=90
            )
            if up.returncode != 0:
                console = (state / "console.log").read_text(errors="replace")[-4000:]
                raise RuntimeError(
                    f"sdbox up failed (rc {up.returncode}): {up.stdout}{up.stderr}\n{console}"
                )
            yield cls(state)
        finally:
            subprocess.run([str(SCRIPT), "down", str(state)], capture_output=True, timeout=120)
            if not keep_state:
                shutil.rmtree(state, ignore_errors=True)

    # -- talking to it ---------------------------------------------------
    def run(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Any command inside the namespaces (journalctl, systemd-analyze...)."""
        return subprocess.run(
            [str(SCRIPT), "exec", str(self.state), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """systemctl ARGS inside."""
        return subprocess.run(
            [str(SCRIPT), "ctl", str(self.state), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def prop(self, unit: str, name: str) -> str:
        return self.ctl("show", "-P", name, unit).stdout.strip()

    def journal(self, unit: str, *extra: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *extra).stdout

    def ns_path(self, path: str) -> Path:
        """A path in the namespace's mount ns, reachable from the host."""
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def write(self, path: str, text: str, mode: int = 0o644) -> Path:
        """Write a file inside the namespace (its /etc, /run...), parents made."""
        target = self.ns_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target

    def install_unit(self, name: str, text: str, dropins: Mapping[str, str] | None = None) -> Path:
        """Write a unit (and drop-ins NAME.d/*.conf), then daemon-reload."""
        path = self.units / name
        path.write_text(text)
        if dropins:
            ddir = self.units / f"{name}.d"
            ddir.mkdir(exist_ok=True)
            for fname, body in dropins.items():
                (ddir / fname).write_text(body)
        self.ctl("daemon-reload")
        return path

    @staticmethod
    def wait(pred: Callable[[], bool], timeout: float = 15, interval: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(interval)
        return pred()

    def console(self) -> str:
        return (self.state / "console.log").read_text(errors="replace")
