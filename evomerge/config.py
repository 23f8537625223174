"""User configs, validated once at the edge (pydantic): errors name the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.io.documents import read_yaml
from evomerge.registry import Registry, UnknownNameError


class ConfigError(EvomergeError):
    """A config file is missing, not YAML, or fails validation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    """`evomerge calibrate CONFIG`: score reference models on the full tasks, fit IRT, pick anchors."""

    models: dict[str, str] = Field(
        description="the source models, name -> checkpoint directory (relative to the config file or the working "
        "directory); their abilities are saved for mp-IRT", min_length=1)
    base_model: str | None = Field(
        None, description="their common base: the reference merges are task-arithmetic merges relative to it")
    tasks: list[str] = Field(description="lm-eval task names (fitness/ tasks, task_paths, or lm-eval's own)",
                             min_length=1)
    task_paths: list[str] = Field([], description="more folders of lm-eval task YAMLs")
    reference_merges: int = Field(16, ge=0, le=10_000,
                                  description="seeded random merges of the sources scored besides the sources and base")
    anchors: int = Field(30, ge=1, description="anchor items per task that each candidate is scored on")
    anchor_method: str = Field("irt", description="random, correctness or irt (k-means on IRT item parameters)")
    seed: int = Field(0, ge=0, description="seed of the reference merges, the IRT held-out split and the anchors")
    responses: dict[str, str] | None = Field(
        None, description="import instead of scoring: task -> responses CSV/Parquet (models x items, 0/1)")
    out: str = Field(description="the calibration file to write (JSON)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    batch_size: int = Field(32, ge=1, description="lm-eval batch size")

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice: list each task once")
        return tasks


# ------------------------------------------------------------------------------------------------- the search

def _registered(registry: Registry, name: str) -> str:
    """`name` when the registry has it; else the registry's one-line error with did-you-mean. (Validators import
    their registry when they run: the estimators' scipy costs 0.7 s, which `evomerge --help` need not pay.)"""
    try:
        registry[name]
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    return name


class SourcesConfig(_Strict):
    models: dict[str, str] = Field(min_length=1, description="the fine-tuned models, name -> checkpoint directory; "
                                   "for data-flow spaces the first is model A")
    base_model: str | None = Field(None, description="their common base (needed by task-vector methods)")
    allow_nonfinite: bool = Field(False, description="search even when a source holds NaN/inf values (refused "
                                  "by default: every candidate that mixes them in would fail)")


class FitnessConfig(_Strict):
    calibration: str = Field(description="calibration file written by `evomerge calibrate` (anchors, IRT)")
    tasks: list[str] | None = Field(None, min_length=1, description="tasks to score (default: the calibration's)")
    task_paths: list[str] = Field([], description="more folders of lm-eval task YAMLs")
    estimator: str = Field("gpirt", description="anchor_mean, pirt, gpirt, mpirt or gmpirt")
    batch_size: int = Field(32, ge=1, description="lm-eval batch size")

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        from evomerge.fitness.estimators import ESTIMATORS

        return _registered(ESTIMATORS, v)


class ObjectiveConfig(_Strict):
    task: str | None = Field(None, description="maximize the estimated accuracy on this task")
    cost: Literal["params", "path_length"] | None = Field(None, description="minimize params or path_length")

    @model_validator(mode="after")
    def _one_kind(self) -> ObjectiveConfig:
        if (self.task is None) == (self.cost is None):
            raise ValueError("an objective is either {task: NAME} or {cost: params|path_length}")
        return self

    @property
    def name(self) -> str:
        return self.task if self.task is not None else f"cost:{self.cost}"


class AlgorithmConfig(_Strict):
    name: str = Field("nsga2", description="pymoo algorithm: nsga2, nsga3, moead or ga")
    pop_size: int = Field(16, ge=2, description="candidates per generation")
    generations: int = Field(10, ge=1, description="generations to run (the budget)")

    @field_validator("name")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        from evomerge.search.algorithms import ALGORITHMS

        return _registered(ALGORITHMS, v)


class WorkersConfig(_Strict):
    count: int | None = Field(None, ge=1, description="Ray workers (default: one per GPU, else 1 per 2 CPUs)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0: CPU workers)")
    max_retries: int = Field(2, ge=0, description="retries of a candidate whose worker died")
    sources: Literal["path", "object_store"] = Field("path", description="how workers get models, calibration "
                                                     "and tasks: path (read where the config says, on every node) or "
                                                     "object_store (the driver ships them; cached per node)")


class RunConfig(_Strict):
    """`evomerge search CONFIG`: everything a search needs; snapshotted into the run directory."""

    name: str = Field(description="run name (the default run directory is runs/<name>)", min_length=1)
    sources: SourcesConfig
    search_space: str | dict[str, Any] = Field(
        description="a preset of search_spaces/ by name, a YAML path, or a mapping ({preset: NAME, ...overrides})")
    fitness: FitnessConfig
    objectives: list[ObjectiveConfig] = Field(min_length=1, description="one per task, plus optional costs")
    max_path_length: int | None = Field(None, ge=1, description="constraint on data-flow path length")
    algorithm: AlgorithmConfig = AlgorithmConfig()
    seed: int = Field(0, ge=0, description="seed of the algorithm, the random merges and every candidate")
    workers: WorkersConfig = WorkersConfig()
    run_dir: str | None = Field(None, description="where the run lives (default: runs/<name>)")

    @model_validator(mode="after")
    def _objectives(self) -> RunConfig:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: {min(n for n in names if names.count(n) > 1)!r} is listed twice")
        if not any(o.task for o in self.objectives):
            raise ValueError("objectives: at least one objective must be a task (costs alone rank nothing useful)")
        if self.fitness.tasks is not None:
            missing = [o.task for o in self.objectives if o.task and o.task not in self.fitness.tasks]
            if missing:
                raise ValueError(f"objectives: task {missing[0]!r} is not among fitness.tasks "
                                 f"({', '.join(self.fitness.tasks)}): add it there or drop the objective")
        if self.algorithm.name == "moead" and self.max_path_length is not None:
            raise ValueError("algorithm.name: moead does not take constraints (max_path_length): use nsga2 or nsga3")
        if self.algorithm.name == "ga" and len(self.objectives) > 1:
            raise ValueError("algorithm.name: ga optimizes one objective; use nsga2 for several")
        return self


def load_config(path: Path, model: type[_Strict]) -> Any:
    """Read a YAML config and validate it; every failure is one ConfigError line naming file and field."""
    data = read_yaml(path, ConfigError, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_first_error(e, model)}") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _first_error(e: ValidationError, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    # pydantic names the member of a union it tried (search_space.str): not a field the user wrote
    loc = [p for p in err["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    field = ".".join(str(p) for p in loc) or "(top level)"
    if not loc and err["type"] == "value_error":  # a cross-field check: its message names the field
        return err["msg"].removeprefix("Value error, ")
    owner, desc = _owner(model, loc)
    if err["type"] == "extra_forbidden":
        return f"unknown field {field!r} (valid fields: {', '.join(owner.model_fields)})"
    if err["type"] == "missing":
        return f"field {field!r} is missing" + (f": add it ({desc})" if desc else "")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    more = f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
    return f"field {field!r}: {err['msg'].removeprefix('Value error, ')}{got}{more}"


def _owner(model: type[BaseModel], loc: list) -> tuple[type[BaseModel], str | None]:
    """The model that holds the field at loc (nested configs), and that field's description."""
    owner, desc = model, None
    for i, part in enumerate(loc):
        f = owner.model_fields.get(str(part))
        if f is None:
            break
        desc = f.description
        ann = f.annotation
        if i < len(loc) - 1 and isinstance(ann, type) and issubclass(ann, BaseModel):
            owner = ann
    return owner, desc
