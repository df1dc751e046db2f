#!/usr/bin/env bash
# Issue 22's anchor on the GPU machine (after the vLLM bring-up; source vllm_env.sh first):
# build kvcached 0.1.6 from its PyPI sdist (PyPI has no wheel) against the image's torch and
# nvcc into /tmp/kvcsite, make its autopatch .pth run for engines started with that folder
# first on PYTHONPATH (a sitecustomize.py there), and check that it imports. Without --build,
# also start one vLLM 0.26.0 engine with it (its README's way: ENABLE_KVCACHED=true,
# KVCACHED_AUTOPATCH=1, the V1 runner, since kvcached 0.1.6 refuses 0.26's default V2 runner)
# and send one completion. Nothing of kvcached's is patched. Writes $OUT/kvcached-probe.log.
# The contention run with it is bench/gpu/kvplugin.py --phases kvcached.
# usage: bash bench/gpu/kvcached_probe.sh [--build] DIR
#        (DIR: kvcached-0.1.6.tar.gz and the posix_ipc wheel)
set -uo pipefail
BUILD_ONLY=0
[ "${1:-}" = "--build" ] && { BUILD_ONLY=1; shift; }
SRC=${1:?directory with kvcached-0.1.6.tar.gz and the posix_ipc wheel}
LOG=${OUT:-/tmp}/kvcached-probe.log
SITE=/tmp/kvcsite
{
  echo "== build $(date -u +%T)"; t0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$SRC"/posix_ipc-*.whl || exit 2
  MAX_JOBS=16 python3 -m pip install --no-index --no-deps --no-build-isolation --target "$SITE" \
    "$SRC"/kvcached-0.1.6.tar.gz 2>&1 | tail -15
  echo "build_s=$(( $(date +%s) - t0 ))"; ls "$SITE" | head -20
  ls "$SITE"/*.pth
  # .pth files run only in site directories: make this one, then run any sitecustomize this
  # one shadows (the image's own).
  cat > "$SITE/sitecustomize.py" <<'PY'
import os, site, sys
_here = os.path.dirname(os.path.abspath(__file__))
site.addsitedir(_here)
for _d in list(sys.path):
    _f = os.path.join(_d, "sitecustomize.py")
    if _d and os.path.abspath(_d) != _here and os.path.isfile(_f):
        exec(compile(open(_f).read(), _f, "exec"))
        break
PY
  export PYTHONPATH=$SITE:${PYTHONPATH:-} ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1 \
    VLLM_USE_V2_MODEL_RUNNER=0 KVCACHED_IPC_NAME=gpud_probe
  python3 -c "import kvcached, kvcached._C, posix_ipc; print('kvcached import ok', kvcached.__file__)" 2>&1 | tail -3
  python3 -c "import wrapt.importer as w; print('autopatch hook armed for vllm:', 'vllm' in getattr(w, '_post_import_hooks', {}))" 2>&1 | tail -2
  if [ "$BUILD_ONLY" = 0 ]; then
  echo "== serve $(date -u +%T)"
  python3 -m vllm.entrypoints.openai.api_server --model /tmp/models/large --port 8199 \
    --max-model-len 2048 --enforce-eager --attention-backend FLASH_ATTN \
    > /tmp/kvcached-engine.log 2>&1 &
  pid=$!
  for i in $(seq 1 180); do
    curl -sf localhost:8199/health >/dev/null && { echo "healthy after ${i}s"; break; }
    kill -0 $pid 2>/dev/null || { echo "engine exited"; break; }
    sleep 1
  done
  curl -s localhost:8199/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "/tmp/models/large", "prompt": "hello world", "max_tokens": 16}' | head -c 600
  echo; echo "== engine log (kvcached lines, errors, tail)"
  grep -iE "kvcached|error|Traceback" /tmp/kvcached-engine.log | head -60
  tail -40 /tmp/kvcached-engine.log
  kill $pid 2>/dev/null; sleep 3; kill -9 $pid 2>/dev/null
  fi
} > "$LOG" 2>&1
tail -30 "$LOG"
