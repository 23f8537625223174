#!/usr/bin/env bash
# A tiny evolutionary merge search with one worker on the GPU, in one run (no Ray: the in-process pool):
#   1. bench/tiny_search_setup.py builds the tests' tiny workspace in a fresh /tmp folder (tiny llama family, two
#      tiny lm-eval tasks, a real calibration scored on the CPU, run.yaml: POP candidates x GENERATIONS);
#   2. `evomerge search RUN.yaml --in-process --device $DEVICE` under `timeout`;
#   3. the run's wall time, `evomerge status`, and each candidate's timings as its ledger records them
#      (materialize, check, score, forward, estimate, total, in ms).
# Needs torch, transformers, safetensors and the rest of the GPU image (bench/gpu_wheels.sh lists what it lacks);
# where pydantic, lm-eval, datasets or pymoo is missing, the wheels of `bash bench/gpu_wheels.sh` (in .whl/) are
# installed to $SITE first, as bench/gpu_check.sh does. Logs go to $OUT: tiny_search.log (all of it),
# tiny_search_status.json, tiny_search_timings.tsv.
#     bash bench/gpu_search.sh                          # DEVICE=cuda, OUT=bench/out/gpu
#     DEVICE=cpu PY=python3 bash bench/gpu_search.sh    # the plumbing, on a machine without a GPU
# Knobs: POP (4), GENERATIONS (2), SETUP_LIMIT (120 s), SEARCH_LIMIT (240 s), SITE (/tmp/site), WS (a new
# mktemp folder under /tmp), TRACEBACK_LIMIT (120 s: where candidates failed, the search runs once more to print
# the first failure's traceback, which the ledger keeps as one line). Exit: the search's (124: timed out), else
# 3 where a candidate failed, 4 where DEVICE is cuda and torch sees no GPU, 2 where the wheels are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/out/gpu}
DEVICE=${DEVICE:-cuda}
SITE=${SITE:-/tmp/site}
POP=${POP:-4}
GENERATIONS=${GENERATIONS:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/tiny_search.log"
: > "$LOG"
log() { echo "$*" | tee -a "$LOG"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }  # seconds since $1 (date +%s.%N)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import pydantic, lm_eval, datasets, pymoo" 2> /dev/null; then
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    log "gpu_search: pydantic, lm-eval, datasets or pymoo is missing and .whl/ has no wheels: run bench/gpu_wheels.sh"
    exit 2
  fi
  t0=$(date +%s.%N)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { log "gpu_search: installing .whl/*.whl to $SITE failed"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$SITE"
  log "installed $(ls .whl/*.whl | wc -l) wheels to $SITE in $(since "$t0") s"
fi

log "== environment (device $DEVICE)"
DEVICE="$DEVICE" "$PY" - 2>&1 <<'EOF' | tee -a "$LOG"
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "huggingface-hub", "numpy", "scipy",
             "pandas", "pyarrow", "fsspec", "datasets", "lm-eval", "pymoo", "moocore", "pydantic", "ray"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} absent")
import torch
print("cuda available:", torch.cuda.is_available(),
      *( [torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"]
         if torch.cuda.is_available() else []))
import os
if os.environ["DEVICE"].startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"gpu_search: --device {os.environ['DEVICE']}, but torch sees no GPU")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 4

WS=${WS:-$(mktemp -d /tmp/evomerge_tiny_search.XXXXXX)}
log "== workspace $WS (pop $POP, $GENERATIONS generations)"
t0=$(date +%s.%N)
timeout -k 10 "${SETUP_LIMIT:-120}" "$PY" bench/tiny_search_setup.py "$WS" --pop-size "$POP" \
  --generations "$GENERATIONS" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
CONFIG="$WS/run.yaml"  # what tiny_search_setup.py prints last
log "workspace: exit $rc in $(since "$t0") s, config $CONFIG"
[ "$rc" = 0 ] && [ -f "$CONFIG" ] || { log "gpu_search: building the workspace failed"; exit 1; }

RUN="$WS/runs/tiny"
log "== $PY -m evomerge search $CONFIG --run-dir $RUN --in-process --device $DEVICE --debug" \
  "(limit ${SEARCH_LIMIT:-240}s)"
START=$(date +%s.%N)
timeout -k 10 "${SEARCH_LIMIT:-240}" "$PY" -m evomerge search "$CONFIG" --run-dir "$RUN" --in-process \
  --device "$DEVICE" --debug 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
END=$(date +%s.%N)
log "search: exit $status, wall $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.2f", b - a }') s"
grep -q "fused merge kernels unavailable" "$LOG" \
  && log "gpu_search: NOTE the compiled merge kernels failed and the search used the eager ops (warning above)"

if [ -f "$RUN/ledger.sqlite" ]; then
  "$PY" -m evomerge status "$RUN" --json > "$OUT/tiny_search_status.json" 2>> "$LOG" \
    || { [ "$status" = 0 ] && status=1; }
  "$PY" - "$RUN" "$START" "$END" "$OUT/tiny_search_timings.tsv" 2>&1 <<'EOF' | tee -a "$LOG"
import statistics, sys

from evomerge.search.rundir import RunDir

run, start, end, tsv = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with RunDir.open(run).open_ledger() as ledger:
    rows = sorted(ledger.all(), key=lambda r: (r.finished or 0, r.generation, r.index))
cols = ["materialize", "check", "score", "forward", "estimate", "total"]
lines = ["\t".join(["key", "generation", "idx", "status", "worker", "node", "finished_s", *[f"{c}_ms" for c in cols]])]
print(f"== per-candidate timings (ms; finished_s: seconds after the search command started)")
print(f"{'key':<26} {'st':<6} {'done s':>7} " + " ".join(f"{c:>11}" for c in cols))
per = {c: [] for c in cols}
for r in rows:
    ms = [(r.timings or {}).get(c) for c in cols]
    ms = [v * 1e3 if v is not None else None for v in ms]
    done = (r.finished - start) if r.finished else None
    print(f"{r.key:<26} {r.status:<6} {done if done is not None else float('nan'):>7.2f} "
          + " ".join(f"{v:>11.1f}" if v is not None else f"{'-':>11}" for v in ms) + (f"  {r.error}" if r.error else ""))
    lines.append("\t".join(str(x) for x in [r.key, r.generation, r.index, r.status, r.worker, r.node,
                                             f"{done:.3f}" if done is not None else "",
                                             *[f"{v:.3f}" if v is not None else "" for v in ms]]))
    if r.status == "ok":
        for c, v in zip(cols, ms):
            if v is not None:
                per[c].append(v)
open(tsv, "w").write("\n".join(lines) + "\n")
ok = [r for r in rows if r.status == "ok"]
print(f"{len(rows)} evaluations ({len(ok)} ok) in a search of {end - start:.2f} s wall"
      + (f"; first finished {rows[0].finished - start:.2f} s after the start (imports, sources loaded, first compile)"
         if rows and rows[0].finished else ""))
for c in cols:
    v = per[c]
    if v:
        rest = v[1:] or v
        print(f"  {c:<11} first {v[0]:9.1f} ms   median of the rest {statistics.median(rest):9.1f} ms   "
              f"max {max(v):9.1f} ms   sum {sum(v):9.1f} ms")
errors = sorted({r.error.strip().splitlines()[-1] for r in rows if r.status != "ok" and r.error})
for e in errors:
    print(f"FAILED candidates: {e}")
sys.exit(3 if errors or not ok else 0)  # some failed: `search` exits 1 only when all did
EOF
  rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    [ "$status" = 0 ] && status=$rc
    if [ "$rc" = 3 ]; then  # the ledger keeps one line per error: search again and print the first one's traceback
      log "== the same search again (runs/tiny_traceback), printing the first failed candidate's traceback"
      timeout -k 10 "${TRACEBACK_LIMIT:-120}" "$PY" - search "$CONFIG" --run-dir "$WS/runs/tiny_traceback" \
        --in-process --device "$DEVICE" --debug 2>&1 <<'EOF' | grep -v "^evaluations: " | tee -a "$LOG"
import sys, traceback

import evomerge.worker.evaluator as evaluator
from evomerge.cli import main

one_line, printed = evaluator.one_line, []

def one_line_and_traceback(e):
    if not printed:
        printed.append(e)
        print("== traceback of the first failed candidate:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
    return one_line(e)

evaluator.one_line = one_line_and_traceback
sys.exit(main(sys.argv[1:]))
EOF
    fi
  fi
else
  log "gpu_search: no ledger in $RUN"
  [ "$status" = 0 ] && status=1
fi
log "gpu_search: exit $status (logs in $OUT: tiny_search.log, tiny_search_status.json, tiny_search_timings.tsv)"
exit "$status"
