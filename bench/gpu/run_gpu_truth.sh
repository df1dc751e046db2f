#!/usr/bin/env bash
# GPU truth (issue 9) on the lent H100, from the checkout root.
#   device call 1 (carry .gpu1):  bash .gpu1/device_prep.sh          (../shared/gpu recipe)
#   device call 2 (carry .gpu2 .device-carry/gputruth), within 30 s of call 1:
#       bash bench/gpu/run_gpu_truth.sh --bring-up [gpu_truth.py args]
#   later calls on the same warm machine: bash bench/gpu/run_gpu_truth.sh [args]
# Carried: .device-carry/gputruth/whl/ = the wheels gpud needs that the machine and the
# vLLM bundle lack (tomlkit, apscheduler, tzlocal, sdnotify); see make_carry.sh.
set -uo pipefail
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--bring-up" ]; then
  shift
  bash /tmp/vb/device_run.sh > "$OUTD/bringup.log" 2>&1 || { tail -30 "$OUTD/bringup.log"; exit 3; }
  grep -E "^vllm|unpack_s" "$OUTD/bringup.log"
fi
[ -f /tmp/site/.unpacked ] || { echo "vLLM bundle not unpacked (run with --bring-up)"; exit 3; }
# The 8B-shaped model for the first-sleep item, made in the background (bf16 init: 14.5 GB).
if [ ! -f /tmp/models/m8b/config.json ] && [ -z "${NO_8B:-}" ]; then
  (PYTHONPATH=/tmp/vb python3 bench/gpu/make8b.py /tmp/models/m8b > "$OUTD/make8b.log" 2>&1 &)
fi
source /tmp/vb/vllm_env.sh
# gpud from this checkout, with its few missing deps, into /tmp/gpudsite
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpudsite \
  .device-carry/gputruth/whl/*.whl 2>&1 | grep -v WARNING
if python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
     --target /tmp/gpudsite . > "$OUTD/pip-gpud.log" 2>&1; then GP=/tmp/gpudsite
else echo "pip install of the checkout failed (see pip-gpud.log): running gpud from the checkout"; GP=$PWD:/tmp/gpudsite; fi
export PYTHONPATH=$GP:/tmp/site
python3 -c "import gpud, sys; print('gpud', gpud.__version__, gpud.__file__)"
python3 bench/gpu/gpu_truth.py --models /tmp/models --out "$OUTD" --gpud-path "$GP" \
  --python-engine "$(command -v python3)" --python-gpud "$(command -v python3)" "$@"
