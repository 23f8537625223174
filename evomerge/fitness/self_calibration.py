"""Self-calibration: score reference models on the full tasks, then fit IRT and choose anchors.

The reference models are the sources, their base, and seeded random task-arithmetic merges of the
sources (per-layer weight gradients drawn uniformly in [0, 1]): the kind of model a search visits, so
the IRT model learns how items behave across merges, with no external leaderboard. Every reference
model is written in place into one live model by the Materializer and scored by one Scorer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.config import CalibrationConfig, ConfigError
from evomerge.fitness.calibration import Calibration
from evomerge.fitness.calibration_fit import fit_calibration
from evomerge.fitness.responses import Responses, read_responses
from evomerge.io.paths import check_writable
from evomerge.merge.recipe import Recipe
from evomerge.seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    recipe: Recipe


def reference_models(sources: list[str], base: str, n_merges: int, seed: int) -> list[ReferenceModel]:
    """Sources (weight 1 on one source), the base (all weights 0), then n seeded random merges."""
    def recipe(weights: dict[str, float | list[float]]) -> Recipe:
        return Recipe.build("task_arithmetic", {s: {"weight": w} for s, w in weights.items()}, base_model=base)

    refs = [ReferenceModel(s, recipe({t: float(t == s) for t in sources})) for s in sources]
    refs.append(ReferenceModel("base" if "base" not in sources else "base_model", recipe({t: 0.0 for t in sources})))
    for i in range(n_merges):
        rng = np.random.default_rng(derive_seed(seed, "calibration-merge", i))
        refs.append(ReferenceModel(f"merge_{i}", recipe({s: rng.uniform(0, 1, 2).round(4).tolist() for s in sources})))
    return refs


def score_references(
    refs: list[ReferenceModel],
    paths: dict[str, Path],
    base: str,
    scorer,  # evomerge.fitness.lmeval.Scorer
    *,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] = lambda done, total, name: None,
) -> dict[str, Responses]:
    """Full-task responses of each reference model: task -> Responses (rows = refs, columns = doc ids)."""
    from evomerge.worker.materializer import Materializer

    materializer = Materializer(paths, base, device=device)
    rows: dict[str, list[np.ndarray]] = {t: [] for t in scorer.tasks}
    items: dict[str, list[str]] = {}
    for k, ref in enumerate(refs):
        progress(k, len(refs), ref.name)
        model = materializer.materialize(ref.recipe)
        for task, scores in scorer.score(model).items():
            rows[task].append(scores.correct)
            items[task] = [str(i) for i in scores.item_ids]
    progress(len(refs), len(refs), "")
    names = [r.name for r in refs]
    return {t: Responses(names, items[t], np.vstack(rows[t]), source=f"scores of task {t}") for t in rows}


def calibrate(config: CalibrationConfig, config_path: Path, *, progress=lambda done, total, name: None,
              ) -> tuple[Calibration, dict[str, Responses]]:
    """Run a calibration config: import or score responses, fit, and return (calibration, responses)."""
    from evomerge.io.paths import find_path, resolve_model

    here = config_path.resolve().parent
    search = [here, Path.cwd()]
    if config.responses is not None:
        missing = [t for t in config.task_names if t not in config.responses]
        if missing:
            raise ConfigError(f"{config_path}: responses has no file for task {missing[0]!r}: add {missing[0]}: PATH")
        responses = {t: read_responses(find_path(config.responses[t], search)) for t in config.task_names}
        scoring = {t.task: t.settings() for t in config.tasks}  # as stated: nothing here resolves defaults
    else:
        if config.base_model is None:
            raise ConfigError(f"{config_path}: field 'base_model' is missing: the reference merges are task "
                              "vectors relative to it (or give 'responses' to import a matrix instead)")
        from transformers import AutoTokenizer

        from evomerge.fitness.lmeval import Scorer

        paths = {n: resolve_model(p, search, f"{config_path}: models.{n}") for n, p in config.models.items()}
        paths[config.base_model] = resolve_model(config.base_model, search, f"{config_path}: base_model")
        scorer = Scorer(tasks=config.task_names, include_paths=[find_path(p, search) for p in config.task_paths],
                        tokenizer=AutoTokenizer.from_pretrained(paths[config.base_model]),
                        batch_size=config.batch_size, device=config.device,
                        scoring={t.task: t.settings() for t in config.tasks})
        scoring = {t: scorer.settings(t) for t in config.task_names}  # resolved: the task defaults by name
        for task in config.task_names:
            if config.anchors > scorer.num_items(task):
                raise ConfigError(f"{config_path}: field 'anchors': {config.anchors} anchors but task {task!r} has "
                                  f"only {scorer.num_items(task)} items: lower anchors")
        refs = reference_models(list(config.models), config.base_model, config.reference_merges, config.seed)
        start = time.perf_counter()
        responses = score_references(refs, paths, config.base_model, scorer, device=config.device, progress=progress)
        log.info("scored %d reference models in %.1f s", len(refs), time.perf_counter() - start)
    calibration = fit_calibration(responses, n_anchors=config.anchors, seed=config.seed,
                                  anchor_method=config.anchor_method, sources=list(config.models))
    for task, settings in scoring.items():  # the search and export --verify score exactly this
        calibration.tasks[task].scoring = settings
    return calibration, responses


def calibration_outputs(config: CalibrationConfig, config_path: Path, *, force: bool) -> tuple[Path, Path]:
    """Where the calibration file and its responses go (out is relative to the config file); refuses to
    replace an existing calibration unless forced, before any work is done."""
    out = Path(config.out).expanduser()
    out = out if out.is_absolute() else config_path.resolve().parent / out
    if out.exists() and not force:
        raise ConfigError(f"{config_path}: out {out} exists: choose another out or pass --force to replace it")
    if out.suffix != ".json":
        raise ConfigError(f"{config_path}: field 'out' {config.out!r} must name a .json file")
    check_writable(out, f"{config_path}: out")
    return out, out.with_suffix(".responses")


def write_outputs(calibration: Calibration, responses: dict[str, Responses], out: Path, responses_dir: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_responses(responses, responses_dir)
    calibration.save(out)


def write_responses(responses: dict[str, Responses], folder: Path) -> list[Path]:
    """One CSV per task in the `irt fit` format (header model,<item ids>; 0/1), for re-fitting and benchmarks."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task, r in responses.items():
        path = folder / f"{task}.csv"
        lines = [",".join(["model", *r.items])]
        lines += [",".join([m, *("" if np.isnan(v) else str(int(v)) for v in row)]) for m, row in zip(r.models, r.values)]
        tmp = path.with_suffix(".csv.partial")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
        written.append(path)
    return written


