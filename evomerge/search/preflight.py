"""Checks of a run config against the files it names, before a run directory exists (no torch).

Every check that can fail later, in a worker, for every candidate, fails here instead, as one line that names
the config field: source folders, the calibration and its tasks (and what it scored), the task folders,
source compatibility (read from config.json and the safetensors headers), sources free of NaN/inf, a
search space that has something to search, and workers with the memory to hold what they must (`check_memory`,
planned from the headers by evomerge.search.memory_plan).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from evomerge.config import ConfigError, RunConfig
from evomerge.errors import CheckpointError, EvomergeError, GenomeError, SearchSpaceError
from evomerge.io.documents import read_model_config
from evomerge.io.finite_scan import nonfinite_tensors
from evomerge.io.headers import inventory

MAX_LISTED = 3


def check_source_dirs(models: Mapping[str, Path], where: str) -> None:
    """`models`: config field -> model directory (`sources_by_field`)."""
    for field, path in models.items():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{where}: {field}: {path} is not a model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt")))
            if pickled:  # a search never unpickles weights (that can run code); `evomerge merge` converts them
                raise ConfigError(
                    f"{where}: {field}: {path} holds only pickled weights ({pickled[0]}), which a search never "
                    "loads: convert them once to safetensors, e.g. `evomerge merge` a linear recipe of this one "
                    "model (weight 1) with --allow-pickle, and use the output")
            raise ConfigError(f"{where}: {field}: {path} holds no weights (no *.safetensors file)")


def check_calibration(config: RunConfig, path: Path, where: str) -> None:
    """The calibration exists, and holds every task the run scores (fitness.tasks and the objectives)."""
    from evomerge.fitness.calibration import Calibration

    if not path.is_file():
        raise ConfigError(f"{where}: fitness.calibration: {config.fitness.calibration} does not exist: "
                          "write it with `evomerge calibrate`")
    try:
        calibration = Calibration.load(path)
    except EvomergeError as e:
        raise ConfigError(f"{where}: fitness.calibration: {e}") from None
    calibrated = set(calibration.tasks)
    for field, tasks in (("fitness.tasks", config.fitness.task_names or []),
                         ("objectives", [o.task for o in config.objectives if o.task])):
        missing = [t for t in tasks if t not in calibrated]
        if missing:
            close = difflib.get_close_matches(missing[0], calibrated, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: {field}: task {missing[0]!r} is not in the calibration "
                              f"{config.fitness.calibration} (its tasks: {', '.join(sorted(calibrated))}): "
                              f"{hint}calibrate it with `evomerge calibrate`, or drop it")
    try:
        calibration.scoring_for(config.fitness.stated_scoring())
    except EvomergeError as e:
        raise ConfigError(f"{where}: fitness.tasks: {e}") from None


def check_task_paths(folders: list[Path], where: str) -> None:
    """Every folder of task YAMLs exists (the workers read them; a missing one would fail every candidate)."""
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            raise ConfigError(f"{where}: fitness.task_paths[{i}]: {folder} is not a folder: give folders of lm-eval "
                              "task YAMLs (relative paths are relative to the config file)")


def check_sources_compatible(models: Mapping[str, Path], tensors_must_match: bool, where: str) -> None:
    """`models`: config field -> model directory (`sources_by_field`). One architecture and hidden size
    everywhere (a data-flow path mixes their layers); for parameter-space merges also the same tensor names
    and shapes (read from the safetensors headers)."""
    configs = {n: read_model_config(p) for n, p in models.items()}
    first = next(iter(configs))
    for name, cfg in configs.items():
        for key, value in _architecture(cfg).items():
            ref = _architecture(configs[first])[key]
            if value != ref:
                raise ConfigError(f"{where}: {name}: {key} {value!r} differs from {ref!r} of "
                                  f"{first}: all sources must share one architecture")
    if not tensors_must_match:
        return
    inventories = {n: inventory(p) for n, p in models.items()}
    ref = inventories[first]
    for name, inv in inventories.items():
        if ref is None or inv is None:  # .bin weights: the materializer checks them when it loads them
            continue
        problems = [f"{t} is missing" for t in ref if t not in inv]
        problems += [f"{t} is not in {first}" for t in inv if t not in ref]
        problems += [f"{t} has shape {list(inv[t][1])}, not {list(ref[t][1])}"
                     for t in ref if t in inv and inv[t][1] != ref[t][1]]
        if problems:
            more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
            raise ConfigError(f"{where}: {name}: tensor {'; '.join(problems[:MAX_LISTED])}{more}: a "
                              f"parameter-space merge needs the same tensors as {first}")


def check_sources_finite(models: Mapping[str, Path], where: str) -> None:
    """Refuse a source that holds NaN or inf: name the file, the tensor and the count (read without torch)."""
    for field, path in models.items():
        try:
            found = nonfinite_tensors(path)
        except CheckpointError as e:
            raise ConfigError(f"{where}: {field}: {e}") from None
        if found:
            file, name, count = found[0]
            more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
            raise ConfigError(f"{where}: {field}: {file}: tensor {name} holds {count} NaN/inf values{more}: "
                              "fix or replace that model, or set sources.allow_nonfinite: true to search anyway")


def _architecture(cfg: dict) -> dict:
    return {"model_type": cfg.get("model_type"), "hidden size": cfg.get("hidden_size", cfg.get("n_embd"))}


def check_space_searchable(space, layer_counts: Mapping[str, int], where: str) -> None:
    """Refuse a space in which every genome decodes to one recipe (no genes, or every range a single value).

    From the first initial genome, each gene in turn is set to 0 and to 1: the first change of the recipe
    (or a genome that no longer decodes, e.g. an empty path) shows there is something to search."""
    n = space.dim(layer_counts)
    if n:
        x0 = np.asarray(space.initial(layer_counts)[0], dtype=float)
        try:  # a space that does not fit the sources says why here (e.g. more layer groups than layers)
            ref = _recipe(space, x0, layer_counts)
        except SearchSpaceError as e:
            raise ConfigError(f"{where}: search_space: {e}") from None
        for i in range(n):
            for v in (0.0, 1.0):
                x = x0.copy()
                x[i] = v
                if _recipe(space, x, layer_counts) != ref:
                    return
    raise ConfigError(f"{where}: search_space: every genome decodes to the same recipe ({n} genes, every range a "
                      "single value?): widen a range or list more methods, or merge that one recipe with "
                      "`evomerge merge`")


def _recipe(space, x: np.ndarray, layer_counts: Mapping[str, int]) -> str | None:
    try:
        return json.dumps(space.decode(x, layer_counts), sort_keys=True)
    except GenomeError:  # this genome decodes to no recipe (an empty path, say): the space itself is fine
        return None


def check_memory(config: RunConfig, config_dir: Path, where: str, workers) -> None:
    """Refuse a search whose workers (`capacity.workers_for`) cannot hold the sources, the live model, the scratch
    and a fitness batch under the configured sources settings: one line naming the setting to change and what
    the change needs. Headers and config.json only; a memory the workers will get that is unknown refuses nothing.
    `search` calls it before `create_run`; a config it cannot read is left to the other checks, in their order."""
    from evomerge.search.memory_plan import plan_search

    try:
        message = plan_search(config, config_dir, where, workers).refusal(where)
    except EvomergeError:  # a config it cannot read: the other checks name the problem, in their order
        return
    if message:
        raise ConfigError(message)


def sources_by_field(paths: Mapping[str, Path], base: Path | None) -> dict[str, Path]:
    """Config field -> model directory, base first (the reference of task vectors)."""
    fields = {"sources.base_model": base} if base is not None else {}
    return fields | {f"sources.models.{name}": path for name, path in paths.items()}


__all__ = ["check_calibration", "check_memory", "check_source_dirs", "check_sources_compatible", "check_sources_finite",
           "check_space_searchable", "check_task_paths", "sources_by_field"]
