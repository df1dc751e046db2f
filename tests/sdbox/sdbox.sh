#!/bin/bash
# Run a real systemd as PID 1 of fresh pid/mount/uts/ipc/cgroup namespaces on
# a host whose PID 1 is NOT systemd, and talk to it with systemctl via nsenter.
# gpud's copy of shared/systemd/sd-e2e.sh (tests/sdbox.py drives it).
#
#   sdbox.sh up   [STATE_DIR]          boot, wait for is-system-running
#   sdbox.sh ctl  STATE_DIR ARGS...    systemctl ARGS inside the instance
#   sdbox.sh exec STATE_DIR CMD...     any command inside (journalctl, systemd-analyze ...)
#   sdbox.sh down STATE_DIR            poweroff; SIGKILL fallback; remove cgroup
#
# Optional inputs in STATE_DIR, read by `up`:
#   passwd, group   become /etc/passwd and /etc/group inside (system users for
#                   units); /etc is an overlay whose writes land in STATE/etc-upper
#   devices         lines "NAME" of host /dev nodes (e.g. nvidia0, nvidiactl)
#                   recreated in the namespace's private /dev with the same
#                   major:minor, owner and mode
#   root-overlay    (present) the whole / is an overlay whose writes go to a
#                   tmpfs: `dpkg -i` inside installs for real (/opt, /usr,
#                   /var/lib/dpkg) and the manager also loads units from
#                   /etc/systemd/system (emptied) and /lib/systemd/system (its
#                   .wants/.requires removed, so none of the host's units start)
#
# /var/lib is a private tmpfs and /etc an overlay inside (or the whole / with
# root-overlay), so StateDirectory=, ConfigurationDirectory= and files a test
# puts in /etc never reach the host.
#
# Needs root, util-linux (unshare, nsenter), the systemd package (installed,
# not running), /usr/bin/python3 (console pty relay). Writes only STATE_DIR and
# one cgroup dir <host cgroup2 mount>/sdbox-<basename STATE_DIR>; everything
# mounted lives in a private mount namespace and vanishes with it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SYSTEMD_BIN=${SYSTEMD_BIN:-/lib/systemd/systemd}
PYTHON=${SD_E2E_PYTHON:-/usr/bin/python3}     # NOT a pyenv shim: see README
BOOT_TIMEOUT=${SD_E2E_BOOT_TIMEOUT:-30}
STOP_TIMEOUT=${SD_E2E_STOP_TIMEOUT:-15}

die() { echo "sdbox: $*" >&2; exit 1; }

cgroup2_root() {
  # pure unified host: /sys/fs/cgroup; hybrid host (this VM): /sys/fs/cgroup/unified
  local m
  for m in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    [ "$(stat -fc %T "$m" 2>/dev/null)" = cgroup2fs ] && { echo "$m"; return; }
  done
  die "no cgroup2 mount on host"
}

# ---------------------------------------------------------------- inner ----
# Stage 1: PID 1 of the new pid ns, in the new (private) mount ns, still in
# the host cgroup namespace.
inner() {
  local state=$1 cg=$2
  local console; console=$(tty)   # host devpts slave handed over by console_relay.py
  # host device nodes asked for (read before /dev is replaced below)
  local devspecs="" d
  if [ -s "$state/devices" ]; then
    while read -r d; do
      [ -n "$d" ] && [ -c "/dev/$d" ] || continue
      devspecs+="$d $(stat -c '%t %T %a %u %g' "/dev/$d")"$'\n'
    done < "$state/devices"
  fi
  mount --make-rprivate /
  [ -e "$state/root-overlay" ] && enter_root_overlay "$state"
  # private /run FIRST: util-linux mount(8) itself writes /run/mount/utab, and
  # the host's /run is not a separate mount here
  mount -n -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
  mount -t proc -o nosuid,nodev,noexec proc /proc
  # global (non-namespaced) sysctls: the nested PID 1 must not change them
  mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys
  if [ -e /proc/sysrq-trigger ]; then
    mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -o remount,bind,ro /proc/sysrq-trigger
  fi

  # move ourselves into the delegated cgroup *before* unsharing the cgroup
  # ns, so that cgroup becomes the namespace root ("0" = the writing process)
  echo 0 > "$cg/cgroup.procs"

  # private /dev (host devtmpfs is one shared instance: e.g. journald's
  # dev-log socket would otherwise create /dev/log on the host)
  : > /run/.console; mount --bind "$console" /run/.console
  mount -t tmpfs -o mode=755,nosuid,size=4m tmpfs /dev
  mknod -m 666 /dev/null    c 1 3
  mknod -m 666 /dev/zero    c 1 5
  mknod -m 666 /dev/full    c 1 7
  mknod -m 666 /dev/random  c 1 8
  mknod -m 666 /dev/urandom c 1 9
  mknod -m 666 /dev/tty     c 5 0
  mkdir -m 755 /dev/pts /dev/shm /dev/mqueue
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts /dev/pts
  ln -s pts/ptmx /dev/ptmx
  mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
  ln -s /proc/self/fd /dev/fd
  ln -s /proc/self/fd/0 /dev/stdin
  ln -s /proc/self/fd/1 /dev/stdout
  ln -s /proc/self/fd/2 /dev/stderr
  local name maj min mode uid gid
  while read -r name maj min mode uid gid; do
    [ -n "$name" ] || continue
    mkdir -p "/dev/$(dirname "$name")"
    mknod -m "$mode" "/dev/$name" c "$((16#$maj))" "$((16#$min))"
    chown "$uid:$gid" "/dev/$name"
  done <<< "$devspecs"
  : > /dev/console
  mount --move /run/.console /dev/console   # must be a tty: PID 1 checks isatty()
  rm -f /run/.console
  # belt and braces: never let the nested journald touch the host's journal
  [ -d /var/log/journal ] && mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /var/log/journal
  # PrivateTmp= creates systemd-private-* dirs in /tmp and /var/tmp; keep the
  # /var/tmp ones in the namespace (/tmp stays shared so STATE_DIR is visible)
  mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /var/tmp
  if [ ! -e "$state/root-overlay" ]; then
    # StateDirectory= and systemd's own /var/lib/systemd stay in the namespace
    mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /var/lib
    # /etc is an overlay: what units and tests write there (ConfigurationDirectory=,
    # users, /etc/gpud/gpud.toml) lands in STATE/etc-upper, never on the host
    mkdir -p "$state/etc-upper" "$state/etc-work"
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$state/etc-upper,workdir=$state/etc-work" /etc
  fi
  [ -s "$state/passwd" ] && cat "$state/passwd" > /etc/passwd
  [ -s "$state/group" ] && cat "$state/group" > /etc/group

  # manager + journald config, visible only inside this mount ns
  mount --bind "$state/system.conf"   /etc/systemd/system.conf
  mount --bind "$state/journald.conf" /etc/systemd/journald.conf

  exec unshare --cgroup -- "$HERE/sdbox.sh" __inner2 "$state"
}

# root-overlay: pivot into an overlay of / whose upper layer is a tmpfs of this
# mount ns. /dev, /sys and /tmp (STATE_DIR) stay the host's (below they are
# replaced or made read-only as without root-overlay); /proc is this pid ns's.
enter_root_overlay() {
  local state=$1 rw=$1/rootfs
  mkdir -p "$rw"
  mount -t tmpfs -o mode=755 tmpfs "$rw"
  mkdir "$rw/upper" "$rw/work" "$rw/root"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$rw/upper,workdir=$rw/work" "$rw/root"
  local r=$rw/root
  mount --rbind /dev "$r/dev"
  mount --rbind /sys "$r/sys"
  mount --bind /tmp "$r/tmp"     # not --rbind: leaves out $rw itself
  mount -t proc -o nosuid,nodev,noexec proc "$r/proc"   # umount(8) reads mountinfo
  mkdir -p "$r/.sdbox-host"
  cd "$r"
  pivot_root . .sdbox-host
  cd /
  umount -l /.sdbox-host
  rmdir /.sdbox-host
  # the host's enabled units never start here; what dpkg enables lands here
  mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system
  rm -rf /lib/systemd/system/*.wants /lib/systemd/system/*.requires
  # the host may forbid service starts (a container's policy-rc.d exit 101)
  rm -f /usr/sbin/policy-rc.d
}

# Stage 2: now inside the cgroup namespace rooted at $cg.
inner2() {
  local state=$1
  umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup || true
  mount -o remount,bind,ro /sys
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup   # rw, shows ns root
  cd /
  local units=$state/units
  [ -e "$state/root-overlay" ] && units=$units:/etc/systemd/system:/lib/systemd/system
  exec env -i \
    container=sdbox \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SYSTEMD_UNIT_PATH="$units" \
    SYSTEMD_GENERATOR_PATH="$state/empty" \
    SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$state/empty" \
    "$SYSTEMD_BIN" --system --unit=e2e.target \
      --log-target=journal-or-kmsg --log-color=no --show-status=no
}

# ----------------------------------------------------------------- up -----
prepare_state() {
  local state=$1
  rm -rf "$state/units"
  mkdir -p "$state/units" "$state/empty"
  : > "$state/console.log"
  cp "$HERE/conf/system.conf" "$HERE/conf/journald.conf" "$state/"
  cp "$HERE"/manager-units/* "$state/units/"
  ln -sf e2e.target "$state/units/default.target"
  local u
  for u in shutdown.target umount.target final.target \
           poweroff.target systemd-poweroff.service \
           halt.target systemd-halt.service \
           exit.target systemd-exit.service \
           systemd-journald.service systemd-journald.socket \
           systemd-journald-dev-log.socket systemd-journald-audit.socket \
           dbus.socket dbus.service; do
    ln -sf "/lib/systemd/system/$u" "$state/units/$u"
  done
}

wait_pid_file() {  # FILE PID_THAT_MUST_STAY_ALIVE
  local i
  for i in $(seq 1 200); do
    [ -s "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.02
  done
  return 1
}

up() {
  local state=${1:-/tmp/sdbox}
  [ "$(id -u)" = 0 ] || die "must be root"
  state=$(mkdir -p "$state" && cd "$state" && pwd)
  if [ -s "$state/systemd.pid" ] && kill -0 "$(cat "$state/systemd.pid")" 2>/dev/null; then
    die "instance already running in $state"
  fi
  prepare_state "$state"
  rm -f "$state/unshare.pid" "$state/systemd.pid" "$state/relay.pid"
  local cg; cg="$(cgroup2_root)/sdbox-$(basename "$state")"
  mkdir -p "$cg"
  echo "$cg" > "$state/cgroup.path"
  local t0; t0=$(date +%s%N)

  # console_relay (pty) -> unshare --fork -> [ns PID 1] inner -> unshare
  # --cgroup -> inner2 -> exec systemd.  --kill-child: if unshare dies, so
  # does the namespace's PID 1 and with it every process in the namespace.
  setsid "$PYTHON" "$HERE/console_relay.py" "$state/console.log" "$state/unshare.pid" \
      unshare --pid --mount --uts --ipc --fork --kill-child --propagation private \
      -- "$HERE/sdbox.sh" __inner "$state" "$cg" \
      </dev/null >"$state/relay.log" 2>&1 &
  local rpid=$!
  echo "$rpid" > "$state/relay.pid"
  wait_pid_file "$state/unshare.pid" "$rpid" || die "relay failed: $(cat "$state/relay.log")"
  local upid spid="" i
  upid=$(cat "$state/unshare.pid")
  for i in $(seq 1 200); do     # unshare forks exactly one child: the ns PID 1
    spid=$(awk '{print $1}' "/proc/$upid/task/$upid/children" 2>/dev/null) || true
    [ -n "$spid" ] && break
    kill -0 "$upid" 2>/dev/null || break
    sleep 0.02
  done
  [ -n "$spid" ] || die "unshare did not fork: $(cat "$state/console.log")"
  echo "$spid" > "$state/systemd.pid"

  local deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
  until [ -S "/proc/$spid/root/run/systemd/private" ]; do
    kill -0 "$spid" 2>/dev/null || die "systemd died during boot; console:
$(cat "$state/console.log")"
    [ "$(date +%s)" -lt "$deadline" ] || die "timeout waiting for /run/systemd/private"
    sleep 0.02
  done
  local st
  st=$(timeout "$BOOT_TIMEOUT" "$HERE/sdbox.sh" ctl "$state" is-system-running --wait 2>/dev/null) || true
  local t1; t1=$(date +%s%N)
  echo "sdbox: up: state=$state host_pid=$spid cgroup=$cg system=$st boot_ms=$(( (t1 - t0) / 1000000 ))"
  case "$st" in running|degraded) return 0;; *) return 1;; esac
}

# ----------------------------------------------------------- ctl / exec ---
in_ns() {
  local state=$1; shift
  local spid; spid=$(cat "$state/systemd.pid")
  # mount ns (/run/systemd/private, /proc), pid ns (PIDs match what systemd
  # reports), cgroup/uts/ipc.  The network namespace is shared with the host.
  exec nsenter --target "$spid" --mount --pid --cgroup --uts --ipc -- "$@"
}
ctl() { local state=$1; shift; in_ns "$state" systemctl --no-pager "$@"; }

# ---------------------------------------------------------------- down -----
alive() {  # a zombie counts as gone: orphans are reaped by the host's PID 1, lazily
  local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
wait_gone() { local i; for i in $(seq 1 $(( $2 * 50 ))); do alive "$1" || return 0; sleep 0.02; done; return 1; }

down() {
  local state=${1:-/tmp/sdbox}
  local spid upid rpid cg
  spid=$(cat "$state/systemd.pid" 2>/dev/null || true)
  upid=$(cat "$state/unshare.pid" 2>/dev/null || true)
  rpid=$(cat "$state/relay.pid" 2>/dev/null || true)
  cg=$(cat "$state/cgroup.path" 2>/dev/null || true)
  if [ -n "$spid" ] && alive "$spid"; then
    # SIGRTMIN+4 = start poweroff.target: units are stopped in order
    # (ExecStop=, SIGTERM, TimeoutStopSec=), then systemd-shutdown exits.
    kill -s RTMIN+4 "$spid" 2>/dev/null || true
    if ! wait_gone "$spid" "$STOP_TIMEOUT"; then
      echo "sdbox: poweroff took > ${STOP_TIMEOUT}s, SIGKILL to namespace init" >&2
      kill -KILL "$spid" 2>/dev/null || true   # kills the whole pid namespace
      wait_gone "$spid" 5 || true
    fi
  fi
  local p
  for p in $upid $rpid; do
    wait_gone "$p" 5 || kill -KILL "$p" 2>/dev/null || true
  done
  if [ -n "$cg" ] && [ -d "$cg" ]; then
    local i   # leaf-first rmdir; retry while the kernel finishes reaping
    for i in $(seq 1 50); do
      find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$cg" ] || break
      sleep 0.1
    done
    [ -d "$cg" ] && echo "sdbox: warning: could not remove $cg" >&2
  fi
  rm -f "$state/systemd.pid" "$state/unshare.pid" "$state/relay.pid"
  echo "sdbox: down: $state"
}

cmd=${1:-}; shift || true
case "$cmd" in
  __inner)  inner "$@" ;;
  __inner2) inner2 "$@" ;;
  up)   up "$@" ;;
  ctl)  ctl "$@" ;;
  exec) in_ns "$@" ;;
  down) down "$@" ;;
  *) sed -n '2,25p' "$0"; exit 2 ;;
esac
