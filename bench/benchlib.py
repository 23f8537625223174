"""Shared helpers of the bench scripts (project venv only): cached tiny families and the mergekit runner."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from evomerge.testing.tiny import Family, TinySpec, make_family

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"  # git-ignored scratch: families, recipes, merge outputs
MERGEKIT_PYTHON = BENCH / ".mergekit-venv" / "bin" / "python"
RUNNER = BENCH / "mergekit_runner.py"


def cached_family(root: Path, spec: TinySpec, n_sources: int, seed: int = 0, task_scale: float = 0.02) -> Family:
    """make_family, reused when root already holds one built with the same arguments.

    The marker is written last, so an interrupted build is rebuilt rather than half-reused."""
    marker = root / "family.json"
    key = {"spec": asdict(spec), "n_sources": n_sources, "seed": seed, "task_scale": task_scale, "dtype": "float32"}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return Family(base=root / "base", sources=[root / f"source_{i}" for i in range(n_sources)])
    marker.unlink(missing_ok=True)
    family = make_family(root, spec, n_sources=n_sources, seed=seed, dtype=torch.float32, task_scale=task_scale)
    marker.write_text(json.dumps(key))
    return family


def checkpoint_params(model_dir: Path) -> int:
    """Number of parameters stored in a safetensors checkpoint (read from the headers only)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118  (safe_open is not iterable)
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def write_yaml(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_mergekit(jobs: list[dict], *, device: str = "cpu", seed: int = 0, repeats: int = 0, warmup: int = 0,
                 clear_loader_cache: bool = False) -> dict:
    """Run bench/mergekit_runner.py in the mergekit venv; returns its RESULT document."""
    if not MERGEKIT_PYTHON.exists():
        sys.exit(f"{MERGEKIT_PYTHON} is missing: run `bash bench/setup_mergekit_env.sh` first")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        jobs_file, result_file = Path(tmp) / "jobs.json", Path(tmp) / "result.json"
        jobs_file.write_text(json.dumps({
            "device": device, "seed": seed, "repeats": repeats, "warmup": warmup,
            "clear_loader_cache": clear_loader_cache, "scratch": tmp, "jobs": jobs,
        }))
        proc = subprocess.run([str(MERGEKIT_PYTHON), str(RUNNER), str(jobs_file), str(result_file)], check=False)
        if proc.returncode != 0 or not result_file.exists():
            sys.exit(f"mergekit runner failed (exit code {proc.returncode})")
        return json.loads(result_file.read_text())


def device_argument(doc: str) -> torch.device:
    """The --device of a check script whose docstring is `doc` (default: cuda where there is one)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(ap.parse_args().device)
