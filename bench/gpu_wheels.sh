#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs beyond a GPU image that has torch, transformers and safetensors (the device
# machine's does, KINDS.md): pydantic and its parts, for Python 3.12 on x86-64, into .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5  # as constraints.txt and the venv
ls -1 .whl
