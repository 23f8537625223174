#!/usr/bin/env bash
# The GPU checks of issue 12 in one run, for a machine with a GPU (bench/README.md, "GPU check"):
#   1. bench_memory.py on the 1B family (K=2): device and host placement, eager and fused, ms per candidate
#      against the device's copy bound (HBM) and, for host placement, the host-to-device bound (PCIe);
#   2. check_split.py: a worker split by layers across two devices (cuda:0 + cpu on a one-GPU machine)
#      merges bit for bit like one device and gives the same logits;
#   3. check_fused_sums.py: the compiled weighted sum (linear, task arithmetic) writes the eager ops' bits.
# Needs torch with CUDA, transformers, safetensors and pydantic; where they are missing (a bare GPU image),
# `bash bench/gpu_wheels.sh` fetches the wheels into .whl/ first, which this script installs to /tmp/site.
# A tiny search with CUDA workers needs Ray, lm-eval and pymoo as well: run `evomerge search` there by hand.
#     bash bench/gpu_check.sh                      # OUT=dir for the logs, SIZE=100M for a smaller family
#     DEVICE=cpu SPLIT=cpu,cpu SIZE=10M bash bench/gpu_check.sh   # the plumbing, on a machine without a GPU
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
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv | tee "$OUT/gpu.txt"
status=0
"$PY" bench/bench_memory.py --size "$SIZE" --k 2 --repeats 3 --device "$DEVICE" --fused --no-mergekit --no-legacy \
  --methods linear,ties,dare_ties,della 2>&1 | tee "$OUT/bench_memory.txt" || status=1
"$PY" bench/check_split.py --devices "$SPLIT" 2>&1 | tee "$OUT/check_split.txt" || status=1
"$PY" bench/check_fused_sums.py --device "$DEVICE" 2>&1 | tee "$OUT/check_fused_sums.txt" || status=1
exit $status
