#!/usr/bin/env bash
# The GPU checks of issue 12 in one run, for a machine with a GPU (bench/README.md, "GPU check"), each step under
# its own time limit so that a slow one leaves the others their turn:
#   1. check_fused_sums.py: the compiled weighted sum (linear, task arithmetic) writes the eager ops' bits;
#      check_selection.py: the exact TIES cut without caches (topk on CUDA) equals kthvalue's, and their times;
#   2. check_split.py: a worker split by layers across two devices (cuda:0 + cpu on a one-GPU machine)
#      merges bit for bit like one device and gives the same logits;
#   3. gpu_search.sh: a tiny search with a CUDA worker (in-process: Ray's wheel is too large to carry);
#   4. bench_memory.py on the 1B family (K=2): device and host placement with the accelerator's default (no
#      selection caches), eager and fused, ms per candidate against the device's copy bound (HBM) and, for host
#      placement, the host-to-device bound (PCIe), with what is left of TOTAL (560) seconds: an interrupted
#      bench still prints what it measured.
# Its logs in $OUT are 8 files, what the device tool brings back (bench_memory.json stays in bench/out).
# Needs torch with CUDA, transformers and safetensors; where the rest is missing (a bare GPU image),
# `bash bench/gpu_wheels.sh` fetches the wheels into .whl/ first, which this script installs to /tmp/site.
#     bash bench/gpu_check.sh                      # OUT=dir for the logs, SIZE=100M for a smaller family
#     DEVICE=cpu SPLIT=cpu,cpu SIZE=10M bash bench/gpu_check.sh   # the plumbing, on a machine without a GPU
# A later run may take some steps only, and other modes or methods for the bench, e.g. each placement's default:
#     STEPS="search bench" PAIRS=device:off,host:on PROFILE=1 TOTAL=400 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/out/gpu}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1B}
SPLIT=${SPLIT:-cuda:0,cpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 2
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv
status=0
step() {  # step SECONDS LOG COMMAND...: run it under a time limit, its output teed to $OUT/LOG
  local limit=$1 log=$2; shift 2
  echo "== $* (limit ${limit}s)" | tee "$OUT/$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== exit $rc" | tee -a "$OUT/$log"; status=1; }
}
STEPS=${STEPS:-fused selection split search bench}
PAIRS=${PAIRS:-device:off,host:off}  # placement:selection cache; the bench's modes
METHODS=${METHODS:-linear,ties,dare_ties,della}
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
wanted fused && step "${FUSED_LIMIT:-120}" check_fused_sums.txt "$PY" bench/check_fused_sums.py --device "$DEVICE"
wanted selection && step "${SELECT_LIMIT:-90}" check_selection.txt "$PY" bench/check_selection.py --device "$DEVICE"
wanted split && step "${SPLIT_LIMIT:-90}" check_split.txt "$PY" bench/check_split.py --devices "$SPLIT"
wanted search && step "${SEARCH_STEP_LIMIT:-150}" search.txt env SEARCH_LIMIT=120 OUT="$OUT/search" bash bench/gpu_search.sh
# the bench last, with what is left of TOTAL seconds: it saves each mode as it ends, and --report prints them
if wanted bench; then
  step $(( ${TOTAL:-560} - SECONDS > 60 ? ${TOTAL:-560} - SECONDS : 60 )) bench_memory.txt "$PY" bench/bench_memory.py \
    --size "$SIZE" --k 2 --repeats 3 --device "$DEVICE" --fused --no-mergekit --no-legacy --pairs "$PAIRS" \
    --methods "$METHODS" ${PROFILE:+--profile}
  grep -q "^| K | mode" "$OUT/bench_memory.txt" || "$PY" bench/bench_memory.py --report 2>&1 | tee -a "$OUT/bench_memory.txt"
fi
exit $status
