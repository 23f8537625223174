"""A calibration file: per task, the IRT item parameters, the anchors and weights, the estimators' settings and the
abilities of the source models, saved as versioned JSON (fitted by calibration_fit.py, read by the driver's
preflight checks, the workers' estimators and export)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge import __version__
from evomerge.errors import FitnessError
from evomerge.fitness.irt import ItemParams

FORMAT = "evomerge-irt-calibration"
VERSION = 1


@dataclass
class TaskCalibration:
    """Everything the estimators need for one task."""

    name: str
    item_ids: list[str]  # (N,)
    items: ItemParams  # (N, D) a and (N,) b
    anchors: np.ndarray  # (n,) positions in item_ids
    weights: np.ndarray  # (n,) sum to 1
    lambdas: dict[str, float]  # "gpirt", "gmpirt": weight of anchor_mean in the mix
    sources: dict[str, list[float]] = field(default_factory=dict)  # source model -> theta (D,)
    ability_mean: np.ndarray | None = None  # (D,) prior of a new model's ability; None = N(0, I)
    ability_cov: np.ndarray | None = None  # (D, D)
    seed: int = 0
    diagnostics: dict[str, Any] = field(default_factory=dict)  # held-out errors, fit time, ... (not used to estimate)
    scoring: dict[str, Any] = field(default_factory=dict)  # what was scored: metric, filter, generation settings

    def __post_init__(self) -> None:
        self._position = {item: i for i, item in enumerate(self.item_ids)}
        self._anchor_weight = np.full(len(self.item_ids), np.nan)
        self._anchor_weight[self.anchors] = self.weights

    @property
    def anchor_ids(self) -> list[str]:
        return [self.item_ids[i] for i in self.anchors]

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    @property
    def source_theta(self) -> np.ndarray:
        return np.array([self.sources[s] for s in self.sources], dtype=np.float64).reshape(len(self.sources), -1)

    def anchor_weight_of(self, index: np.ndarray) -> np.ndarray:
        return self._anchor_weight[index]

    def positions(self, item_ids: list[str], source: str = "the answers") -> np.ndarray:
        """Positions of item ids in this task; unknown ids are an error that names them."""
        unknown = [i for i in item_ids if i not in self._position]
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise FitnessError(f"{source}: item id(s) {shown} are not items of task {self.name!r} in the calibration: "
                               "score only the calibrated items (see `evomerge irt fit`)")
        return np.array([self._position[i] for i in item_ids], dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return {
            "items": self.item_ids,
            "anchors": self.anchor_ids,
            "anchor_weights": _floats(self.weights),
            "irt": {"dims": self.items.dims, "a": _floats(self.items.a), "b": _floats(self.items.b)},
            "lambdas": {k: _float(v) for k, v in self.lambdas.items()},
            "sources": {k: _floats(v) for k, v in self.sources.items()},
            "ability_prior": None if self.ability_mean is None else {
                "mean": _floats(self.ability_mean), "cov": _floats(self.ability_cov)},
            "seed": self.seed,
            "diagnostics": self.diagnostics,
            "scoring": self.scoring,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> TaskCalibration:
        item_ids = [str(i) for i in d["items"]]
        position = {item: i for i, item in enumerate(item_ids)}
        prior = d.get("ability_prior")
        dims = int(d["irt"]["dims"])
        return cls(
            name=name,
            item_ids=item_ids,
            items=ItemParams(np.array(d["irt"]["a"], dtype=np.float64).reshape(-1, dims),
                             np.array(d["irt"]["b"], dtype=np.float64)),
            anchors=np.array([position[str(i)] for i in d["anchors"]], dtype=np.int64),
            weights=np.array(d["anchor_weights"], dtype=np.float64),
            lambdas={k: float(v) for k, v in d["lambdas"].items()},
            sources={k: [float(x) for x in v] for k, v in d.get("sources", {}).items()},
            ability_mean=None if prior is None else np.array(prior["mean"], dtype=np.float64),
            ability_cov=None if prior is None else np.array(prior["cov"], dtype=np.float64),
            seed=int(d.get("seed", 0)),
            diagnostics=d.get("diagnostics", {}),
            scoring=dict(d.get("scoring") or {}),  # absent in calibrations from imported responses
        )


@dataclass
class Calibration:
    """Calibrations of one or more tasks, with the settings and seed they were made with."""

    tasks: dict[str, TaskCalibration]
    settings: dict[str, Any]
    seed: int
    source: str = "<memory>"

    def task(self, name: str) -> TaskCalibration:
        try:
            return self.tasks[name]
        except KeyError:
            raise FitnessError(f"{self.source}: no task {name!r} in the calibration: its tasks are "
                               f"{', '.join(map(repr, self.tasks))}") from None

    def anchors(self, task: str) -> list[str]:
        """Item ids of the task's anchors, in anchor order."""
        return self.task(task).anchor_ids

    def anchor_weights(self, task: str) -> dict[str, float]:
        cal = self.task(task)
        return dict(zip(cal.anchor_ids, map(float, cal.weights)))

    def scoring_for(self, requested: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
        """Task -> what to score, for a run that asks for `requested` (task -> the settings it states; None:
        every calibrated task, as calibrated). The calibration's anchors and IRT parameters were fitted on what
        it scored, so a setting the run states must be the recorded one."""
        out = {}
        for name, stated in (requested if requested is not None else {t: {} for t in self.tasks}).items():
            recorded = self.task(name).scoring
            for key, value in stated.items():
                if recorded.get(key) != value:
                    raise FitnessError(
                        f"task {name!r}: {key} {value!r} is not what the calibration scored "
                        f"({recorded.get(key, 'the task default')!r}): its anchors and IRT parameters hold for that "
                        "only: drop the setting, or calibrate again with it")
            out[name] = dict(recorded)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "written_by": f"evomerge {__version__}",
            "seed": self.seed,
            "settings": self.settings,
            "tasks": {name: t.to_json() for name, t in self.tasks.items()},
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)  # never leave a half-written calibration behind

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        fix = "make it with `evomerge irt fit --responses R.csv --out CALIBRATION.json`"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FitnessError(f"{path}: no such calibration file: {fix}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FitnessError(f"{path}: not a calibration file (invalid JSON: {e}): {fix}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FitnessError(f"{path}: not an evomerge IRT calibration file (no \"format\": \"{FORMAT}\"): {fix}")
        if d.get("version") != VERSION:
            raise FitnessError(f"{path}: calibration file version {d.get('version')!r}, but this evomerge "
                               f"({__version__}) reads version {VERSION}: refit it with `evomerge irt fit`")
        try:
            tasks = {name: TaskCalibration.from_json(name, t) for name, t in d["tasks"].items()}
            return cls(tasks=tasks, settings=d["settings"], seed=int(d["seed"]), source=str(path))
        except (KeyError, TypeError, ValueError) as e:
            raise FitnessError(f"{path}: damaged calibration file ({type(e).__name__}: {e}): {fix}") from None


def _float(x: float) -> float:
    return float(f"{float(x):.7g}")  # 7 significant digits: float32 precision, a third of the file size


def _floats(x: Any) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    return [_floats(row) for row in arr] if arr.ndim > 1 else [_float(v) for v in arr]
