#!/usr/bin/env bash
# The wheels bench/gpu_check.sh and bench/gpu_search.sh need beyond the device machine's GPU image (KINDS.md: it has
# torch, transformers, safetensors, numpy, scipy, pandas, pyarrow, matplotlib, sacrebleu, ..., but no pydantic, Ray,
# lm-eval, pymoo or datasets), for Python 3.12 on x86-64, into .whl/ (git-ignored), at the versions of
# constraints.txt and the venv:
#   1. pydantic and its parts (the config): all gpu_check.sh needs;
#   2. what `evomerge search ... --in-process` really imports beyond that (found by listing sys.modules after a
#      tiny search): lm-eval, datasets and their dill and multiprocess; pymoo, moocore (with cffi, platformdirs) and
#      alive-progress (with about-time and graphemeu, its two small pure dependencies). Not imported on that path,
#      so left out: Ray (too large anyway), evaluate, rouge-score, sqlitedict, word2number, more-itertools,
#      pytablewriter (lm-eval's), autograd, cma, Deprecated (pymoo's), pycparser (cffi's, for building only).
# About 19 MB in all (lm-eval 9 MB, pymoo 5 MB, pydantic-core 2 MB). They install with --no-deps into a folder
# of their own (the scripts: /tmp/site, put on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5  # as constraints.txt and the venv
if [ "${1:-}" != "--pydantic-only" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    pymoo==0.6.2 moocore==0.3.2 cffi==2.1.1 platformdirs==4.14.9 \
    alive-progress==3.3.0 about-time==4.2.1 graphemeu==0.7.2
fi
ls -1s --block-size=K .whl
du -ch .whl/*.whl | tail -1
