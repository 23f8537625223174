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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
    is_int: bool = False  # a whole number (e.g. an iteration count): set, not searched as a range gene

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
    base_optional: bool = False  # mergekit also runs it without a base: the function takes `relative`
    min_models: int = 1  # merged models, base excluded where needs_base
    max_models: int | None = None
    random: bool = False  # the tensor function takes `seed`
    uses_magnitude: bool = False  # takes `magnitudes`: SortedMagnitudes per task vector
    uses_ranks: bool = False  # takes `ranks`: row_ranks() per task vector
    # each output entry depends on the same entry of the inputs only (and per-tensor parameters), so a
    # tensor may be merged block by block with the same bits
    elementwise: bool = False
    # takes `piece` (methods.Piece): whole-tensor selections, then entry by entry, so a tensor may be merged
    # piece by piece (magnitude selections need sorted magnitudes for it; DELLA pieces hold whole rows)
    piecewise: bool = False

    def goes_by_pieces(self, selection_cache: bool) -> bool:
        """Whether host placement merges this method's large tensors piece by piece: entry-wise and piecewise
        methods, magnitude selections only from their caches (an exact selection needs the whole tensor)."""
        return self.elementwise or (self.piecewise and (selection_cache or not self.uses_magnitude))

    def model_count_problem(self, n: int) -> str | None:
        """None when `n` merged models suit the method, else what it needs ("exactly 2", "at least 1", ...)."""
        if self.min_models <= n and (self.max_models is None or n <= self.max_models):
            return None
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        return f"at most {self.max_models}" if self.max_models is not None and n > self.max_models \
            else f"at least {self.min_models}"

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


def _nonnegative(name: str, default: float | None) -> Param:
    """A merge-wide number >= 0 (thresholds, step sizes); the upper bound inf keeps messages and gene ranges
    that print [low, high] well-formed."""
    return Param(name, default, per_model=False, low=0.0, high=math.inf)


# Entries per block where a CPU worker merges an elementwise method block by block: the float32 base, task
# vectors and result of a block (K + 2 buffers of 512 KiB) stay in the cache instead of a round trip through
# memory per source, which made these methods 2-4x slower than float32-resident task vectors.
BLOCK_ENTRIES = 1 << 17

# Entries per piece where sources are held on the host (sources.placement: host): tensors larger than this
# are staged onto the device and merged a piece at a time (entry-wise and piecewise methods), so the device
# holds scratch and staging for a piece, not for the largest tensor. Small on CPU (cache-sized work, like
# BLOCK_ENTRIES); larger on accelerators, where each piece costs kernel launches. Multiples of L1_CHUNK.
PIECE_ENTRIES = {"cpu": 1 << 18}
PIECE_ENTRIES_DEFAULT = 1 << 22


def piece_entries(device_type: str) -> int:
    """Entries per piece on a device of this type ("cpu", "cuda", ...)."""
    return PIECE_ENTRIES.get(device_type, PIECE_ENTRIES_DEFAULT)


# The compiled kernels (merge/fused.py) pay off on accelerators at once; CPU workers compile them from this model
# size: each graph (per K, dtype and method flags) takes 5-20 s once per worker, and per million parameters and
# candidate they save 0.5-0.8 ms (linear, task arithmetic), 3-6 ms (TIES) and 7-12 ms (DARE-TIES) at K = 2-3
# (bench/bench_memory.py --fused, 100M bf16), so from 1B parameters they repay the compiles within a few dozen
# candidates, where a small model's search (the demo's 135M) would spend its first minutes compiling
FUSED_CPU_PARAMS = 10**9


def compiles_kernels(device_type: str, params: int) -> bool:
    """Whether a worker on this kind of device, merging models of `params` parameters, uses the compiled kernels."""
    return device_type != "cpu" or params >= FUSED_CPU_PARAMS

# Defaults follow mergekit 0.1.5 for the same parameters. Descriptions are one complete line each, and
# distinct: `evomerge methods` prints them whole (wrapped, never cut); tests/test_methods_new.py checks.
_add(MethodSpec(
    "linear", TENSOR, "Weighted average of the models' weights (weights divided by their sum when normalize).",
    (WEIGHT, _normalize(True)), elementwise=True))
_add(MethodSpec(
    "task_arithmetic", TENSOR, "Task arithmetic: base + lambda * sum_i weight_i * (model_i - base).",
    (WEIGHT, LAMBDA, _normalize(False), INT8_MASK), needs_base=True, elementwise=True))
_add(MethodSpec(
    "ties", TENSOR, "TIES: keep each task vector's largest-magnitude entries, elect signs, average the agreeing ones.",
    (WEIGHT, DENSITY, LAMBDA, _normalize(True), _rescale(False), INT8_MASK), needs_base=True, uses_magnitude=True, piecewise=True))
_add(MethodSpec(
    "dare_linear", TENSOR,
    "DARE: drop task-vector entries at random (keep probability density), rescale, add them weighted.",
    (WEIGHT, DENSITY, LAMBDA, _normalize(False), _rescale(True), INT8_MASK), needs_base=True, random=True, piecewise=True))
_add(MethodSpec(
    "dare_ties", TENSOR,
    "DARE-TIES: drop task-vector entries at random, rescale, elect signs, combine the agreeing ones.",
    (WEIGHT, DENSITY, LAMBDA, _normalize(False), _rescale(True), INT8_MASK), needs_base=True, random=True, piecewise=True))
_add(MethodSpec(
    "breadcrumbs", TENSOR,
    "Model Breadcrumbs: drop each task vector's largest (gamma) and smallest entries, add the rest weighted.",
    (WEIGHT, DENSITY, GAMMA, LAMBDA, _normalize(False), _rescale(False), INT8_MASK),
    needs_base=True, uses_magnitude=True, piecewise=True))
_add(MethodSpec(
    "breadcrumbs_ties", TENSOR,
    "Breadcrumbs-TIES: drop the largest (gamma) and smallest entries, elect signs, combine the agreeing ones.",
    (WEIGHT, DENSITY, GAMMA, LAMBDA, _normalize(False), _rescale(False), INT8_MASK),
    needs_base=True, uses_magnitude=True, piecewise=True))
_add(MethodSpec(
    "della", TENSOR,
    "DELLA: drop entries at random, large ones kept more often (density +- epsilon), rescale, elect signs.",
    (WEIGHT, DENSITY, EPSILON, LAMBDA, _normalize(True), _rescale(True), INT8_MASK),
    needs_base=True, random=True, uses_ranks=True, piecewise=True))
_add(MethodSpec(
    "della_linear", TENSOR,
    "DELLA-linear: drop entries at random, large ones kept more often, rescale, add them weighted (no signs).",
    (WEIGHT, DENSITY, EPSILON, LAMBDA, _normalize(False), _rescale(True), INT8_MASK),
    needs_base=True, random=True, uses_ranks=True, piecewise=True))

_add(MethodSpec(
    "slerp", TENSOR, "Spherical interpolation from the base (t = 0) to the other model (t = 1).",
    (Param("t", None, per_model=False),), needs_base=True, min_models=1, max_models=1))
_add(MethodSpec(
    "model_stock", TENSOR,
    "Model Stock: move from the base toward the models' average, further the more their task vectors agree.",
    (Param("filter_wise", False, per_model=False, is_bool=True),), needs_base=True, min_models=2))

# -- methods added with mergekit 0.1.5 (tensor functions in methods_geometric.py, methods_masked.py) --
# nuslerp and multislerp take an optional base in mergekit: with one, they interpolate task vectors and add
# the result to it; without, the models' weights. base_optional: a recipe may leave the base out
# (Recipe.baseless), and the tensor function then gets `relative=False` (merge_tensors(base=None) too).
_add(MethodSpec(
    "nuslerp", TENSOR,
    "NuSLERP: spherical interpolation of two models' task vectors at t = weight_2 / (weight_1 + weight_2).",
    (WEIGHT, Param("nuslerp_row_wise", False, per_model=False, is_bool=True),
     Param("nuslerp_flatten", True, per_model=False, is_bool=True)),
    needs_base=True, base_optional=True, min_models=2, max_models=2))
_add(MethodSpec(
    "multislerp", TENSOR,
    "Multi-SLERP: weighted interpolation of any number of task vectors on the hypersphere, at their mean norm.",
    (WEIGHT, Param("normalize_weights", True, per_model=False, is_bool=True),
     _nonnegative("eps", 1e-8)),
    needs_base=True, base_optional=True))
_add(MethodSpec(
    "karcher", TENSOR,
    "Karcher mean: equal-weight Riemannian mean of every input's direction, scaled to their mean norm.",
    (Param("max_iter", 10, per_model=False, low=0, high=math.inf, is_int=True), _nonnegative("tol", 1e-5))))
_add(MethodSpec(
    "sce", TENSOR,
    "SCE: keep the entries where task vectors vary most, weight each by its mean square, elect signs.",
    (Param("select_topk", 1.0, per_model=False, low=0.0, high=1.0), INT8_MASK), needs_base=True))
_add(MethodSpec(
    "nearswap", TENSOR,
    "NearSwap: move each base entry toward the other model by at most t (closer entries are taken whole).",
    (_nonnegative("t", None),), needs_base=True, min_models=1, max_models=1))
_add(MethodSpec(
    "arcee_fusion", TENSOR,
    "Arcee Fusion: take the other model's changes whose KL-weighted size is an outlier (> median + 1.5 IQR).",
    (), needs_base=True, min_models=1, max_models=1, random=True))
_RAM_EPSILON = _nonnegative("epsilon", 1e-5)  # |entry| above it: the model changed it
_add(MethodSpec(
    "ram", TENSOR,
    "RAM: add the task vectors' changed entries; an entry changed by several models gets their mean.",
    (_RAM_EPSILON,), needs_base=True))
_add(MethodSpec(
    "ramplus_tl", TENSOR,
    "RAM+ (tensor-local): RAM with each model's unique entries scaled by 1 + r * min(shared/unique, alpha).",
    (_nonnegative("r", 0.1), _nonnegative("alpha", 0.2), _RAM_EPSILON),
    needs_base=True))

# mergekit's layer copy (frankenmerges, depth up-scaling): a `slices:` recipe, one source per slice (merge/slices.py)
_add(MethodSpec(
    "passthrough", DATAFLOW, "Copy each slice's layer range from its one source, tensors times scale (mergekit slices).",
    (Param("scale", 1.0, per_model=True),), max_models=1))
_add(MethodSpec(
    DATAFLOW, DATAFLOW,
    "Data flow: run a path of layers taken from the sources (and parameter-space merges of them), each optionally "
    "scaled; written with sources and path instead of models."))
