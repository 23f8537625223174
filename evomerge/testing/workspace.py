"""A complete tiny search workspace on disk: models, tasks, a calibration and a run config (tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.testing.tasks import write_choice_tasks
from evomerge.testing.tiny import TinySpec, make_family

MODELS = {"a": "models/source_0", "b": "models/source_1"}
TASKS = ("t_add", "t_more")


def make_search_workspace(root: Path, *, spec: TinySpec = TinySpec(arch="llama"), items: int = 30, anchors: int = 6,
                          **run_overrides) -> Path:
    """root/models (base + 2 sources of `spec`), root/tasks (2 tasks of `items` items), root/calibration.json
    (written by `evomerge calibrate`, `anchors` per task), root/run.yaml (a 3-generation PS search of 4
    candidates, changed by `run_overrides`); returns root."""
    from evomerge.cli import main

    make_family(root / "models", spec, n_sources=2, seed=3, task_scale=0.05)
    write_choice_tasks(root / "tasks", {t: items for t in TASKS})
    calib = {"models": MODELS, "base_model": "models/base", "tasks": list(TASKS), "task_paths": ["tasks"],
             "reference_merges": 4, "anchors": anchors, "seed": 1, "out": "calibration.json"}
    (root / "calibrate.yaml").write_text(yaml.safe_dump(calib))
    if main(["calibrate", str(root / "calibrate.yaml")]) != 0:
        raise RuntimeError(f"calibration of the tiny workspace in {root} failed")
    config = {"name": "tiny", "sources": {"models": MODELS, "base_model": "models/base"},
              "search_space": {"preset": "ps_task_arithmetic", "ps": {"layer_groups": 2}},
              "fitness": {"calibration": "calibration.json", "task_paths": ["tasks"], "estimator": "pirt"},
              "objectives": [{"task": t} for t in TASKS],
              "algorithm": {"pop_size": 4, "generations": 3}, "seed": 7, **run_overrides}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root
