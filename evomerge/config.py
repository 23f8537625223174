"""User configs, validated once at the edge (pydantic): errors name the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import EvomergeError
from evomerge.io.documents import read_yaml
from evomerge.registry import Registry, UnknownNameError


class ConfigError(EvomergeError):
    """A config file is missing, not YAML, or fails validation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskScoring(_Strict):
    """What a task's fitness is: `{task: gsm8k, metric: exact_match, filter: flexible-extract, max_gen_toks: 256}`.
    A plain task name means the task's own first metric and first filter, as lm-eval reports them."""

    task: str = Field(min_length=1, description="lm-eval task name")
    metric: str | None = Field(None, description="the per-item metric scored (default: the task's first)")
    filter: str | None = Field(None, description="the filter pipeline whose output is scored (default: the first)")
    max_gen_toks: int | None = Field(None, ge=1, description="generation budget of generate_until tasks")
    generation_kwargs: dict[str, Any] = Field({}, description="more generation settings (until, temperature, ...)")

    @property
    def is_plain(self) -> bool:
        return self.model_fields_set <= {"task"}

    def settings(self) -> dict[str, Any]:
        """The fields set besides the task name (what a calibration records and a run must match)."""
        return self.model_dump(exclude={"task"}, exclude_defaults=True)


BATCH_SIZE_HELP = "lm-eval batch size, or auto (the largest that fits, probed as lm-eval does)"


def _batch_size(v: Any) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError("a batch size is a positive integer or auto")


BatchSize = Annotated[int | str, BeforeValidator(_batch_size)]


def _task_list(tasks: Any) -> Any:
    """Task entries may be names or TaskScoring mappings; names become plain TaskScoring."""
    if isinstance(tasks, list):
        return [{"task": t} if isinstance(t, str) else t for t in tasks]
    return tasks


def _unique_task_names(tasks: list[TaskScoring]) -> list[TaskScoring]:
    names = [t.task for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task {min(n for n in names if names.count(n) > 1)!r} is listed twice: list each task once")
    return tasks


def _dump_tasks(tasks: list[TaskScoring]) -> list:
    return [t.task if t.is_plain else {"task": t.task, **t.settings()} for t in tasks]


# A list of tasks as a config writes it: names, or mappings that say what is scored; dumped the same way
TaskList = Annotated[list[TaskScoring], BeforeValidator(_task_list), AfterValidator(_unique_task_names),
                     PlainSerializer(_dump_tasks)]


class CalibrationConfig(_Strict):
    """`evomerge calibrate CONFIG`: score reference models on the full tasks, fit IRT, pick anchors."""

    models: dict[str, str] = Field(
        description="the source models, name -> checkpoint directory (relative to the config file or the working "
        "directory); their abilities are saved for mp-IRT", min_length=1)
    base_model: str | None = Field(
        None, description="their common base: the reference merges are task-arithmetic merges relative to it")
    tasks: TaskList = Field(
        description="lm-eval task names (fitness/ tasks, task_paths, or lm-eval's own), or {task, metric, filter, "
        "max_gen_toks, generation_kwargs} to choose what is scored", min_length=1)
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
    batch_size: BatchSize = Field(32, description=BATCH_SIZE_HELP)

    @property
    def task_names(self) -> list[str]:
        return [t.task for t in self.tasks]


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
    storage_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the sources are held in (auto: as stored in the checkpoint); task vectors are "
        "formed per tensor in float32 when a candidate is written")
    placement: Literal["device", "host"] = Field(
        "device", description="where the sources live: device (the worker's GPU) or host (pinned CPU memory, "
        "streamed to the device tensor by tensor; for GPUs smaller than the sources)")
    selection_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="keep each task vector's sorted magnitudes for TIES/breadcrumbs/DELLA (4 bytes per "
        "entry, where the sources are; auto: on for CPU workers, where it is faster, and with host placement, where it "
        "lets TIES merge large tensors piece by piece; off for sources on an accelerator, which selects exactly per "
        "candidate)")


class FitnessConfig(_Strict):
    calibration: str = Field(description="calibration file written by `evomerge calibrate` (anchors, IRT)")
    tasks: TaskList | None = Field(
        None, min_length=1, description="tasks to score (default: the calibration's), as names or {task, metric, "
        "filter, max_gen_toks, generation_kwargs}; settings must match the calibration's")
    task_paths: list[str] = Field([], description="more folders of lm-eval task YAMLs")
    estimator: str = Field("gpirt", description="anchor_mean, pirt, gpirt, mpirt or gmpirt")
    batch_size: BatchSize = Field(32, description=BATCH_SIZE_HELP)


    @property
    def task_names(self) -> list[str] | None:
        return None if self.tasks is None else [t.task for t in self.tasks]

    def stated_scoring(self) -> dict[str, dict[str, Any]] | None:
        """Task -> the scoring settings this config states (None: the calibration's tasks, as calibrated);
        `Calibration.scoring_for` checks them against what the calibration scored."""
        return None if self.tasks is None else {t.task: t.settings() for t in self.tasks}

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
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0: CPU workers; below 1: GPUs shared; "
                                   "2 or more: each worker's model split by layers over that many GPUs)")
    max_retries: int = Field(2, ge=0, description="retries of a candidate whose worker died")
    sources: Literal["path", "object_store"] = Field("path", description="how workers get models, calibration "
                                                     "and tasks: path (read where the config says, on every node) or "
                                                     "object_store (the driver ships them; cached per node)")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"{v:g} GPUs cannot be split into: above 1, use a whole number of GPUs per worker")
        return v


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
        if self.fitness.task_names is not None:
            missing = [o.task for o in self.objectives if o.task and o.task not in self.fitness.task_names]
            if missing:
                raise ValueError(f"objectives: task {missing[0]!r} is not among fitness.tasks "
                                 f"({', '.join(self.fitness.task_names)}): add it there or drop the objective")
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
        if isinstance(part, int):  # an item of a list field: its model was found with the field
            continue
        f = owner.model_fields.get(str(part))
        if f is None:
            break
        desc = f.description
        nested = _nested_model(f.annotation)
        if i < len(loc) - 1 and nested is not None:
            owner = nested
    return owner, desc


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config model inside a field's annotation: X, list[X], X | None, list[X] | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None
