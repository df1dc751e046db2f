#!/bin/bash
# Build the gpud Debian package: gpud and its Python dependencies in a
# self-contained virtualenv under /opt/gpud, plus /usr/bin/gpud, the systemd
# unit, sysusers/tmpfiles, /etc/gpud/gpud.toml (a conffile) and the example
# policies. `make deb` calls this; the .deb lands in dist/ (or $OUT_DIR).
#
# Build on the release you install on (Debian 12, Ubuntu 24.04): compiled
# wheels match that release's python3.X, which the package then depends on.
# Network (or pip's configured find-links/index) is needed only here, to
# collect the wheels; installing the package needs none.
#
#   packaging/build-deb.sh              build, then lintian (fails on errors)
#   GPUD_DEB_VERSION=0.1.0+1 ...        override the version (default: pyproject)
#   GPUD_DEB_PYTHON=/usr/bin/python3.12 build for another installed python3.X
#   GPUD_DEB_LINTIAN=0 ...              skip lintian
#
# Needs: dpkg-dev, debhelper (>= 13.1), python3-venv, lintian.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT_DIR:-$REPO/dist}
PYTHON=${GPUD_DEB_PYTHON:-/usr/bin/python3}
BUILD=$REPO/build/deb

die() { echo "build-deb: $*" >&2; exit 1; }
for tool in dpkg-buildpackage dh; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev debhelper"
done
[ -x "$PYTHON" ] || die "$PYTHON not found"
# a distribution python, not a pyenv/conda one: the package depends on python3.X
case "$(readlink -f "$PYTHON")" in /usr/bin/python3*) ;; *) die "$PYTHON is not /usr/bin/python3.X" ;; esac

version=${GPUD_DEB_VERSION:-$("$PYTHON" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$REPO/pyproject.toml")}
. /etc/os-release
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
src=$BUILD/gpud-$version

echo "build-deb: gpud $version for $PRETTY_NAME, python$pyver"
rm -rf "$BUILD"
mkdir -p "$src" "$OUT_DIR"

# 1. the source tree, as tracked files would give it (no venvs, caches, builds)
for p in pyproject.toml README.md gpud etc/gpud policies docs/install.md; do
  [ -e "$REPO/$p" ] || continue
  mkdir -p "$src/$(dirname "$p")"
  cp -r "$REPO/$p" "$src/$p"
done
find "$src" -name __pycache__ -prune -exec rm -rf {} +
[ -f "$src/etc/gpud/gpud.toml" ] || die "etc/gpud/gpud.toml missing: it is the shipped config"
mkdir -p "$src/policies" "$src/docs"
[ -f "$src/docs/install.md" ] || die "docs/install.md missing"
cp -r "$REPO/packaging/debian" "$src/debian"
cp "$REPO/systemd/gpud.service" "$src/debian/gpud.service"
cp "$REPO/systemd/gpud.sysusers" "$src/debian/gpud.sysusers"
cp "$REPO/systemd/gpud.tmpfiles" "$src/debian/gpud.tmpfiles"
maint=${GPUD_DEB_MAINTAINER:-$(sed -n 's/^Maintainer: //p' "$src/debian/control")}
cat > "$src/debian/changelog" <<CHANGELOG
gpud ($version) unstable; urgency=medium

  * Build of gpud $version for $PRETTY_NAME.

 -- $maint  $(date -R)
CHANGELOG

# 2. the wheelhouse: gpud and every dependency, built for this python3.X
"$PYTHON" -m venv "$BUILD/tools"
"$BUILD/tools/bin/pip" --disable-pip-version-check wheel --wheel-dir "$src/wheels" "$src" \
  >"$BUILD/pip-wheel.log" 2>&1 || { tail -30 "$BUILD/pip-wheel.log"; die "pip wheel failed"; }
# pin exactly these files, by hash: the offline install cannot pick anything else
"$BUILD/tools/bin/python" - "$src/wheels" <<'PY'
import hashlib, pathlib, sys
from email.parser import Parser
import zipfile
wheels = pathlib.Path(sys.argv[1])
lines = []
for whl in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    lines.append(f"{msg['Name']}=={msg['Version']} --hash=sha256:{digest}")
(wheels / "requirements.txt").write_text("\n".join(lines) + "\n")
print(f"build-deb: {len(lines)} wheels", file=sys.stderr)
PY

# 3. the package (binary only; unsigned)
(cd "$src" && PYTHON="$PYTHON" dpkg-buildpackage -b -us -uc -j"$(nproc)" >"$BUILD/dpkg-buildpackage.log" 2>&1) \
  || { tail -50 "$BUILD/dpkg-buildpackage.log"; die "dpkg-buildpackage failed (log: $BUILD/dpkg-buildpackage.log)"; }
deb=$(ls "$BUILD"/gpud_"$version"_*.deb)
cp "$deb" "$OUT_DIR/"
deb=$OUT_DIR/$(basename "$deb")
echo "build-deb: $deb ($(du -h "$deb" | cut -f1))"

# 4. lintian: errors fail the build, warnings are printed
if [ "${GPUD_DEB_LINTIAN:-1}" = 1 ]; then
  command -v lintian >/dev/null || die "lintian not found: apt-get install lintian"
  lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v 'running with root privileges' | tee "$BUILD/lintian.log" || true
  if grep -q '^E: ' "$BUILD/lintian.log"; then die "lintian reported errors"; fi
  echo "build-deb: lintian: no errors"
fi
