#!/usr/bin/env bash
# Create a separate virtual environment holding mergekit, used only as a
# reference implementation for benchmarks/cross-checks. It is kept apart from
# the project's own venv so mergekit's large dependency tree (accelerate, peft,
# datasets, ...) never leaks into evomerge's runtime or test environment.
#
# Usage:  bash bench/setup_mergekit_env.sh
#         MERGEKIT_VENV=/some/path bash bench/setup_mergekit_env.sh
set -euo pipefail

# Resolve paths relative to the repository, not the caller's working directory.
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

MERGEKIT_VERSION="0.1.5"
VENV="${MERGEKIT_VENV:-${REPO_ROOT}/bench/.mergekit-venv}"
PYTHON="${PYTHON:-python3}"

# The repo-wide constraints pin torch to the locally served CPU wheel (any
# newer torch drags in GBs of CUDA packages) plus transformers/tokenizers/
# safetensors versions that mergekit 0.1.5 accepts (transformers>=5,<6), so
# the same file is used here to keep both environments on identical versions.
CONSTRAINTS="${REPO_ROOT}/constraints.txt"

# Idempotence: if the venv already imports the expected mergekit version,
# there is nothing to do.
if [ -x "${VENV}/bin/python" ] && "${VENV}/bin/python" - "${MERGEKIT_VERSION}" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import mergekit  # noqa: F401
from mergekit.merge import run_merge  # noqa: F401
sys.exit(0 if version("mergekit") == sys.argv[1] else 1)
PY
then
    echo "mergekit ${MERGEKIT_VERSION} already installed in ${VENV}"
    exit 0
fi

# Create the venv only if missing; reusing a half-built one is fine since pip
# install below is itself idempotent.
if [ ! -x "${VENV}/bin/python" ]; then
    "${PYTHON}" -m venv "${VENV}"
fi

# pip is configured globally (index and find-links for the local torch
# wheel); no index or host is named here so that configuration is used as is.
"${VENV}/bin/python" -m pip install \
    --constraint "${CONSTRAINTS}" \
    "mergekit==${MERGEKIT_VERSION}"

# Fail loudly if the environment is not usable, and make sure torch was not
# silently swapped for another build.
"${VENV}/bin/python" - <<'PY'
import torch, mergekit  # noqa: F401
from mergekit.merge import run_merge  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("mergekit ready; torch", torch.__version__)
PY
