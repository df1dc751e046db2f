#!/usr/bin/env bash
# Blue-green move between two real GPUs through gpud (issue 11), from the checkout root, on
# the device tool's `nvidia-h200-x2` kind. Same bring-up as run_gpu_truth.sh (the
# ../shared/gpu recipe carries vLLM 0.26; see bench/gpu/README.md):
#   here, once:   ../shared/gpu/build_bundle.sh        (makes .gpu1/ .gpu2/, if not there)
#                 bash bench/gpu/run_move_two_gpus.sh --check-carry
#   device call 1 (kind nvidia-h200-x2, carry [".gpu1"]):  bash .gpu1/device_prep.sh
#   device call 2, within 30 s of call 1 (carry [".gpu2", ".device-carry/gputruth"]):
#       bash bench/gpu/run_move_two_gpus.sh --bring-up [move_two_gpus.py args]
#   a later call on the same warm machine:  bash bench/gpu/run_move_two_gpus.sh [args]
# Results: $OUT/move_two_gpus.{json,md} (+ gpud.log, engine-*.log); copy them to bench/results/.
set -uo pipefail
# NVLink multicast off (device/KINDS.md): for everything started from here, gpud and engines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
if [ "${1:-}" = "--check-carry" ]; then
  ok=0
  for d in .gpu1/part.0 .gpu1/device_prep.sh .gpu2/part.1; do
    [ -e "$d" ] || { echo "missing $d: run ../shared/gpu/build_bundle.sh"; ok=1; }; done
  n=$(ls .device-carry/gputruth/whl/*.whl 2>/dev/null | wc -l)
  if [ "$n" -lt 4 ]; then
    echo "fetching gpud's missing wheels into .device-carry/gputruth/whl"
    .venv/bin/python -m pip download -q --no-deps -d .device-carry/gputruth/whl \
      tomlkit apscheduler tzlocal sdnotify || ok=1
  fi
  ls .device-carry/gputruth/whl; du -sh .gpu1 .gpu2 .device-carry/gputruth 2>/dev/null
  exit $ok
fi
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
if [ "${1:-}" = "--bring-up" ]; then
  shift
  bash /tmp/vb/device_run.sh > "$OUTD/bringup.log" 2>&1 || { tail -30 "$OUTD/bringup.log"; exit 3; }
  grep -E "^vllm|unpack_s" "$OUTD/bringup.log"
fi
[ -f /tmp/site/.unpacked ] || { echo "vLLM bundle not unpacked (run with --bring-up)"; exit 3; }
[ -f /tmp/models/tiny/config.json ] || { echo "no /tmp/models/tiny (device call 1 not run?)"; exit 3; }
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
source /tmp/vb/vllm_env.sh
# gpud from this checkout, with its few missing deps, into /tmp/gpudsite (as run_gpu_truth.sh)
if [ ! -d /tmp/gpudsite/tomlkit ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpudsite \
    .device-carry/gputruth/whl/*.whl 2>&1 | grep -v WARNING
fi
export PYTHONPATH=$PWD:/tmp/gpudsite:/tmp/site
python3 -c "import gpud; print('gpud', gpud.__version__, gpud.__file__)"
# what is left of the 600 s call, less a margin for the copy of $OUT
LEFT=$(( 560 - ($(date +%s) - T0) ))
python3 bench/gpu/move_two_gpus.py --models /tmp/models --out "$OUTD" --gpud-path "$PWD:/tmp/gpudsite" \
  --python-engine "$(command -v python3)" --python-gpud "$(command -v python3)" \
  --deadline "$LEFT" "$@"
rc=$?
nvidia-smi --query-compute-apps=pid,used_memory,gpu_uuid --format=csv
exit $rc
