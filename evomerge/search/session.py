"""Start, resume and inspect searches: config -> run directory -> generations (driver.py) -> status.

The pool that evaluates candidates is passed in (`pool.evaluate(candidates) -> Iterable[EvalResult]`): the
worker side's `LocalPool` (one in-process Evaluator) or `search.pool.RayPool` (Ray actors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge.config import RunConfig, load_config
from evomerge.io.documents import layer_count, read_model_config
from evomerge.search.driver import generations, new_algorithm, objectives_of, run_generation
from evomerge.search.ledger import Record, collapse_ties, pareto_front
from evomerge.search.rundir import RunDir

GENERATIONS_DONE = "generations_done"  # ledger meta: generations told to the algorithm, for status


@dataclass
class Prepared:
    config: RunConfig
    config_dir: Path  # relative paths in the config are relative to this
    space: object  # evomerge.genome.SearchSpace
    layer_counts: dict[str, int]

    def decode(self, x) -> dict:
        return self.space.decode(x, self.layer_counts)


def prepare(config: RunConfig, config_dir: Path, where: str, *, scan_weights: bool = False) -> Prepared:
    """Everything the driver needs, checked before a run directory exists (no torch: configs read as JSON).
    scan_weights: also read every source tensor for NaN/inf (a new run; reopening one for status, export or a
    dashboard must stay cheap, and a resumed run's workers still refuse non-finite merges)."""
    from evomerge.genome import SearchSpace
    from evomerge.search import preflight

    paths = {n: _near(p, config_dir) for n, p in config.sources.models.items()}
    base = _near(config.sources.base_model, config_dir) if config.sources.base_model is not None else None
    models = preflight.sources_by_field(paths, base)
    preflight.check_source_dirs(models, where)
    preflight.check_calibration(config, _near(config.fitness.calibration, config_dir), where)
    preflight.check_task_paths([_near(p, config_dir) for p in config.fitness.task_paths], where)
    counts = {n: _layer_count(p) for n, p in paths.items()}
    space = SearchSpace.load(config.search_space, sources=dict(config.sources.models),
                             base_model=config.sources.base_model, where=f"{where}: search_space")
    space.dim(counts)  # fails here, not in generation 0, when the space does not fit the sources
    preflight.check_sources_compatible(models, tensors_must_match=space.kind != "dfs", where=where)
    if scan_weights and not config.sources.allow_nonfinite:
        preflight.check_sources_finite(models, where)
    preflight.check_space_searchable(space, counts, where)
    return Prepared(config, config_dir, space, counts)


def _layer_count(path: Path) -> int:
    return layer_count(read_model_config(path), path)


def _near(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def create_run(config_path: Path, run_dir: Path | None) -> tuple[RunDir, Prepared]:
    """Validate everything, then create the run directory atomically (nothing is left behind on error)."""
    here = config_path.resolve().parent
    config = _absolute(load_config(config_path, RunConfig), here)
    prepared = prepare(config, here, str(config_path), scan_weights=True)
    target = run_dir or _near(config.run_dir or f"runs/{config.name}", Path.cwd())
    snapshot = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return RunDir.create(target, snapshot, config.fitness.calibration), prepared


def _absolute(config: RunConfig, here: Path) -> RunConfig:
    """The config with every path absolute, so the snapshot in the run directory works from anywhere."""
    doc = config.model_dump(mode="json")
    doc["sources"]["models"] = {n: str(_near(p, here).resolve()) for n, p in doc["sources"]["models"].items()}
    if doc["sources"]["base_model"]:
        doc["sources"]["base_model"] = str(_near(doc["sources"]["base_model"], here).resolve())
    doc["fitness"]["calibration"] = str(_near(doc["fitness"]["calibration"], here).resolve())
    doc["fitness"]["task_paths"] = [str(_near(p, here).resolve()) for p in doc["fitness"]["task_paths"]]
    return RunConfig.model_validate(doc)


def open_run(run_dir: Path) -> tuple[RunDir, Prepared]:
    run = RunDir.open(run_dir)
    run.config_text()  # refuses a snapshot edited since the run was created
    config = load_config(run.config_path, RunConfig)  # errors name the run's config.yaml
    if run.calibration_path is not None:  # the run's own copy: the user's file may have changed since
        doc = config.model_dump(mode="json")
        doc["fitness"]["calibration"] = str(run.calibration_path.resolve())
        config = RunConfig.model_validate(doc)
    return run, prepare(config, run.path.resolve(), str(run.config_path))


def drive(run: RunDir, prepared: Prepared, pool, *, on_generation: Callable = lambda report: None,
          on_result: Callable[[Record], None] = lambda rec: None) -> None:
    """Run (or continue) the search to its budget.

    The algorithm is always built afresh and replayed: pymoo is seeded, candidate keys hold the exact genome, so
    a generation whose candidates the ledger has finished is told their ledgered results again without any
    evaluation, and the run continues where it stopped with the state an uninterrupted run would have. No
    optimizer state is stored, so none is ever unpickled from a run directory."""
    with run.locked(), run.open_ledger() as ledger:
        done = int(ledger.get_meta(GENERATIONS_DONE, 0))
        seeds = prepared.space.initial(prepared.layer_counts)
        algorithm = new_algorithm(prepared.config, prepared.space.dim(prepared.layer_counts), seeds)
        for g in generations(algorithm, 0):
            report = run_generation(algorithm, g, ledger, pool, prepared.config, prepared.decode, on_result)
            if g + 1 > done:
                done = g + 1
                ledger.set_meta(GENERATIONS_DONE, done)
            on_generation(report)


def status(run: RunDir, prepared: Prepared) -> dict:
    """Generation, evaluations done and failed, and the current front (the JSON of `evomerge status`)."""
    objectives = objectives_of(prepared.config)
    feasible = feasibility(prepared.config)
    with run.open_ledger() as ledger:
        counts = ledger.counts()
        front = pareto_front([r for r in ledger.all("ok") if feasible(r)], {o.name: "min" for o in objectives})
        done = int(ledger.get_meta(GENERATIONS_DONE, 0))
    return {
        "generation": done,
        "generations": prepared.config.algorithm.generations,
        "evaluations": {"done": counts.get("ok", 0) + counts.get("failed", 0), "failed": counts.get("failed", 0)},
        "front": front_entries(front, objectives),
    }


def feasibility(config: RunConfig) -> Callable[[Record], bool]:
    """Whether an evaluation may be on a front: a data-flow path longer than max_path_length may not."""
    limit = config.max_path_length
    return lambda r: limit is None or (r.extra or {}).get("path_length", 0) <= limit


def front_entries(front: list[Record], objectives: list) -> list[dict]:
    """A front as `status` shows it: each distinct objective vector once, its earliest candidate standing for the
    clones that tie with it ("ties": how many share it, "tied_ids": the others); objectives as users read them."""
    return [{"id": rep.key, "generation": rep.generation,
             "objectives": {o.name: o.shown(rep.objectives[o.name]) for o in objectives},
             "ties": 1 + len(others), "tied_ids": [r.key for r in others]}
            for rep, others in collapse_ties(front, [o.name for o in objectives])]
