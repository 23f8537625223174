"""The house rules: the import contracts in pyproject.toml hold (import-linter), a violation made on purpose is
caught, and the driver side really runs a search's set-up (preflight, decoding, status) without loading torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.testing.workspace import make_search_workspace

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # import-linter reads [tool.importlinter] from ./pyproject.toml and analyzes the evomerge package found from
    # the working directory first
    return subprocess.run([str(LINT)], cwd=cwd, capture_output=True, text=True, check=False)


def test_the_import_contracts_hold():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    assert "BROKEN" not in done.stdout and " 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("search/ledger.py", "import torch", "The driver side imports no torch (transitively) BROKEN"),
    ("io/headers.py", "from evomerge.io import save", "The driver side imports no torch (transitively) BROKEN"),
    ("search/preflight.py", "from evomerge.worker import evaluator",
     "The driver side imports no torch (transitively) BROKEN"),
    ("fitness/estimators.py", "import ray", "Only the Ray pool and the Ray jobs client import Ray BROKEN"),
    ("merge/methods.py", "from evomerge.io import checkpoint",
     "Merge methods are pure tensor maths: no I/O, config, fitness, search or Ray BROKEN"),
    ("worker/evaluator.py", "from evomerge.search import session",
     "The worker side evaluates candidates; it never drives a search BROKEN"),
    ("demo/hand.py", "import rich", "The CLI is the only importer of rich and argparse BROKEN"),
])
def test_a_contract_broken_on_purpose_fails_the_lint(tmp_path, module, line, contract):
    shutil.copytree(REPO / "evomerge", tmp_path / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0  # the copy is clean
    target = tmp_path / "evomerge" / module
    target.write_text(target.read_text() + f"\n{line}  # a violation on purpose\n")
    done = _lint(tmp_path)
    assert done.returncode != 0 and contract in done.stdout, done.stdout[-3000:]


@pytest.mark.slow
def test_the_driver_prepares_decodes_and_reports_without_torch(tmp_path):
    root = make_search_workspace(tmp_path)
    code = """if True:
        import sys
        from pathlib import Path
        from evomerge.search.session import create_run, open_run, status
        from evomerge.search import driver, jobs, ledger, preflight, rundir, shipping  # every driver module
        import evomerge.genome, evomerge.modelcard, evomerge.merge.recipe, evomerge.merge.dataflow_recipe
        root = Path(sys.argv[1])
        run, prepared = create_run(root / "run.yaml", root / "runs" / "no-torch")  # preflight: headers, calibration
        for x in prepared.space.initial(prepared.layer_counts):
            prepared.decode(x)
        run, prepared = open_run(run.path)
        assert status(run, prepared)["generation"] == 0
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env,
                          cwd=REPO, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
