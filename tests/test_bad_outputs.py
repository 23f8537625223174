"""Outputs that cannot be written are refused before any work, in one line, exit 2, and nothing is created:
`merge --out`, `search --run-dir`, `irt fit --out` and `calibrate`'s out under a regular file (once a traceback,
and for merge only after loading and merging)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.testing.workspace import make_search_workspace

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _evomerge(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300, check=False)


def _refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    """A regular file where a folder would have to be."""
    path = tmp_path_factory.mktemp("outputs") / "a-file"
    path.write_text("not a folder")
    return path


def test_merge_into_a_path_under_a_file_is_refused_before_loading(llama, blocker, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(llama.sources[0]), "parameters": {"weight": 0.5}},
        {"model": str(llama.sources[1]), "parameters": {"weight": 0.5}}]}))
    done = _evomerge("merge", recipe, "--out", blocker / "merged")
    _refused(done, "output", str(blocker), "is a file, not a folder")
    assert "loaded" not in done.stderr  # refused before the models were read
    assert blocker.read_text() == "not a folder"


def test_irt_fit_out_under_a_file_is_refused_before_fitting(blocker, tmp_path):
    rng = np.random.default_rng(0)
    rows = ["model," + ",".join(f"q{i}" for i in range(30))]
    rows += [f"m{j}," + ",".join(str(int(v)) for v in rng.random(30) < 0.5) for j in range(8)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    _refused(_evomerge("irt", "fit", "--responses", tmp_path / "r.csv", "--out", blocker / "c.json",
                       "--anchors", 5), "--out", "is a file, not a folder")


@pytest.mark.slow
def test_search_and_calibrate_outputs_under_a_file_are_refused(blocker, tmp_path):
    root = make_search_workspace(tmp_path)
    _refused(_evomerge("search", root / "run.yaml", "--run-dir", blocker / "runs" / "x", "--in-process"),
             "run directory", "is a file, not a folder")
    calib = yaml.safe_load((root / "calibrate.yaml").read_text())
    (root / "calibrate2.yaml").write_text(yaml.safe_dump({**calib, "out": str(blocker / "c.json")}))
    _refused(_evomerge("calibrate", root / "calibrate2.yaml"), "out", "is a file, not a folder")
    assert blocker.read_text() == "not a folder"
    assert not list(blocker.parent.glob(".*"))  # no temporary run directory left beside it
