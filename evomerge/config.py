"""User configs, validated once at the edge (pydantic): errors name the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import EvomergeError


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


def load_config(path: Path, model: type[_Strict]) -> Any:
    """Read a YAML config and validate it; every failure is one ConfigError line naming file and field."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path} is not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_first_error(e, model)}") from None


def _first_error(e: ValidationError, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(model.model_fields)
        return f"unknown field {field!r} (valid fields: {valid})"
    if err["type"] == "missing":
        desc = model.model_fields[str(err["loc"][0])].description if err["loc"][0] in model.model_fields else None
        return f"field {field!r} is missing" + (f": add {field}: ({desc})" if desc else "")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    more = f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
    return f"field {field!r}: {err['msg'].removeprefix('Value error, ')}{got}{more}"
