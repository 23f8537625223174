"""The merge-method catalogue: every `merge_method` a recipe may name, its parameters and their defaults.

Torch-free, so the driver side (recipe validation, search spaces, `evomerge methods`) reads it without
loading torch. Each parameter and its default is stated here and nowhere else: the tensor functions in
evomerge.merge.methods take every parameter as a required keyword, and callers fill the omitted ones
with `MethodSpec.arguments` (or `Recipe.resolve`, which does the same per tensor).

Two kinds of method:
- tensor: a parameter-space merge, one pure tensor function applied to every tensor (methods.py);
- dataflow: the data-flow recipe form (layers of several models run in a path; dataflow_recipe.py),
  which has its own YAML keys instead of `models` and `parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from evomerge.registry import Registry

TENSOR, DATAFLOW = "tensor", "dataflow"
Kind = Literal["tensor", "dataflow"]


@dataclass(frozen=True)
class Param:
    name: str  # as written in mergekit YAML
    default: float | bool | None  # None: required
    per_model: bool
    low: float | None = None  # inclusive bounds, checked when recipes are validated
    high: float | None = None
    is_bool: bool = False

    @property
    def arg(self) -> str:
        """The tensor function's keyword for this parameter (`lambda` is a Python keyword)."""
        return "lam" if self.name == "lambda" else self.name


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: Kind
    description: str  # one line: what `evomerge methods` prints
    params: tuple[Param, ...] = ()
    needs_base: bool = False  # a base model is required (task vectors are taken against it)
    min_models: int = 1  # merged models, base excluded where needs_base
    max_models: int | None = None
    random: bool = False  # the tensor function takes `seed`
    uses_magnitude: bool = False  # takes `magnitudes`: SortedMagnitudes per task vector
    uses_ranks: bool = False  # takes `ranks`: row_ranks() per task vector

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def arguments(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the tensor function: `given` (YAML names; other keywords passed through)
        with every omitted parameter that has a default set to it. Per-model defaults stay scalars,
        which the tensor functions apply to every model."""
        kwargs = {(p.arg if (p := self.param(k)) else k): v for k, v in given.items()}
        for p in self.params:
            if p.default is not None:
                kwargs.setdefault(p.arg, p.default)
        return kwargs


METHODS: Registry[MethodSpec] = Registry("merge method")


def tensor_method_names() -> list[str]:
    """The parameter-space methods (what a search space may list in `ps.methods`), sorted."""
    return [n for n in METHODS.names() if METHODS[n].kind == TENSOR]


def _add(spec: MethodSpec) -> None:
    METHODS.register(spec.name)(spec)


WEIGHT = Param("weight", None, per_model=True)
DENSITY = Param("density", 1.0, per_model=True, low=0.0, high=1.0)
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0)
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0)
LAMBDA = Param("lambda", 1.0, per_model=False)
INT8_MASK = Param("int8_mask", False, per_model=False, is_bool=True)  # for mergekit parity; masks here are float


def _normalize(default: bool) -> Param:
    return Param("normalize", default, per_model=False, is_bool=True)


def _rescale(default: bool) -> Param:
    return Param("rescale", default, per_model=False, is_bool=True)


# Defaults follow mergekit 0.1.5 for the same parameters.
_add(MethodSpec(
    "linear", TENSOR, "Weighted average of the models (weights divided by their sum when normalize).",
    (WEIGHT, _normalize(True))))
_add(MethodSpec(
    "task_arithmetic", TENSOR, "base + lambda * sum_i weight_i * (model_i - base).",
    (WEIGHT, LAMBDA, _normalize(False), INT8_MASK), needs_base=True))
_add(MethodSpec(
    "ties", TENSOR, "TIES: keep each task vector's largest-magnitude entries, elect signs, average the agreeing ones.",
    (WEIGHT, DENSITY, LAMBDA, _normalize(True), _rescale(False), INT8_MASK), needs_base=True, uses_magnitude=True))

_DARE = "DARE: drop task-vector entries at random (keep probability density), rescale to the same L1 norm."
_add(MethodSpec("dare_linear", TENSOR, _DARE, (WEIGHT, DENSITY, LAMBDA, _normalize(False), _rescale(True), INT8_MASK),
                needs_base=True, random=True))
_add(MethodSpec("dare_ties", TENSOR, _DARE, (WEIGHT, DENSITY, LAMBDA, _normalize(False), _rescale(True), INT8_MASK),
                needs_base=True, random=True))

_BREADCRUMBS = "Model Breadcrumbs: drop both the largest (gamma) and the smallest task-vector entries."
_add(MethodSpec("breadcrumbs", TENSOR, _BREADCRUMBS,
                (WEIGHT, DENSITY, GAMMA, LAMBDA, _normalize(False), _rescale(False), INT8_MASK),
                needs_base=True, uses_magnitude=True))
_add(MethodSpec("breadcrumbs_ties", TENSOR, _BREADCRUMBS,
                (WEIGHT, DENSITY, GAMMA, LAMBDA, _normalize(False), _rescale(False), INT8_MASK),
                needs_base=True, uses_magnitude=True))

_DELLA = "DELLA: drop entries at random, larger magnitudes kept more often; rescale to the same L1 norm."
_add(MethodSpec("della", TENSOR, _DELLA,
                (WEIGHT, DENSITY, EPSILON, LAMBDA, _normalize(True), _rescale(True), INT8_MASK),
                needs_base=True, random=True, uses_ranks=True))
_add(MethodSpec("della_linear", TENSOR, _DELLA,
                (WEIGHT, DENSITY, EPSILON, LAMBDA, _normalize(False), _rescale(True), INT8_MASK),
                needs_base=True, random=True, uses_ranks=True))

_add(MethodSpec(
    "slerp", TENSOR, "Spherical interpolation from the base (t = 0) to the other model (t = 1).",
    (Param("t", None, per_model=False),), needs_base=True, min_models=1, max_models=1))
_add(MethodSpec(
    "model_stock", TENSOR,
    "Model Stock: move from the base toward the models' average by t = N cos / (1 + (N - 1) cos), "
    "cos the mean pairwise cosine of their task vectors.",
    (Param("filter_wise", False, per_model=False, is_bool=True),), needs_base=True, min_models=2))

_add(MethodSpec(
    DATAFLOW, DATAFLOW,
    "Data flow: run a path of layers taken from the sources (and parameter-space merges of them), each optionally "
    "scaled; written with sources and path instead of models."))
