"""Data-flow-space paths: which source layers run, in what order, with what scale (pure, no torch).

The layer pool lists every layer of every source in order (M layers). A genome's indicator has
T = M * repeats slots; slot t stands for pool layer t mod M and is on when its value is > 0.
The path is the on-slots in order. Between consecutive path layers the hidden state is multiplied
by a scale before it enters the next layer (Akiba et al. 2024): the paper's matrix form is one
scalar per (from pool layer, to pool layer) pair; the compact `per_layer` form is one scalar per
destination pool layer, so its size grows with M, not M^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.errors import RecipeError

SCALE_FORMS = ("none", "per_layer", "matrix")


@dataclass(frozen=True)
class LayerRef:
    source: str  # pool source name
    layer: int  # layer index inside that source


@dataclass(frozen=True)
class PathStep:
    source: str
    layer: int
    scale: float = 1.0  # multiplies the hidden state before it enters this layer


class LayerPool:
    """The layer inventory: sources in order (the first is model A), each with its layer count."""

    def __init__(self, layer_counts: dict[str, int]) -> None:
        if not layer_counts:
            raise RecipeError("the layer pool is empty: list at least one source")
        self.layer_counts = dict(layer_counts)
        self.refs = [LayerRef(s, i) for s, n in self.layer_counts.items() for i in range(n)]
        self.index = {ref: i for i, ref in enumerate(self.refs)}

    @property
    def model_a(self) -> str:
        return next(iter(self.layer_counts))

    def __len__(self) -> int:
        return len(self.refs)

    def check(self, step: LayerRef | PathStep, at: str) -> None:
        if step.source not in self.layer_counts:
            raise RecipeError(f"{at}: unknown source {step.source!r}: the sources are {', '.join(self.layer_counts)}")
        n = self.layer_counts[step.source]
        if not 0 <= step.layer < n:
            raise RecipeError(f"{at}: layer {step.layer} is out of range: source {step.source!r} has layers 0..{n - 1}")


def decode_slots(
    pool: LayerPool,
    on: Sequence[bool],
    *,
    repeats: int,
    pin_ends: bool = False,
) -> list[LayerRef]:
    """Layers of the path selected by slot indicators (len(on) == len(pool) * repeats).

    pin_ends: the path starts with model A's first layer and ends with its last layer; the slots
    choose what runs between them."""
    if len(on) != len(pool) * repeats:
        raise RecipeError(f"slots: expected {len(pool) * repeats} indicators ({len(pool)} layers x {repeats} repeats), "
                          f"got {len(on)}")
    path = [pool.refs[t % len(pool)] for t, keep in enumerate(on) if keep]
    if pin_ends:
        a = pool.model_a
        path = [LayerRef(a, 0), *path, LayerRef(a, pool.layer_counts[a] - 1)]
    return path


def apply_scales(pool: LayerPool, layers: Sequence[LayerRef], form: str, values: Sequence) -> list[PathStep]:
    """Scale of each transition: none (all 1), per_layer (values[to]) or matrix (values[from][to]),
    indices into the pool. The first layer's input is the embedding, left unscaled."""
    if form not in SCALE_FORMS:
        raise RecipeError(f"scales.form {form!r} is unknown: use one of {', '.join(SCALE_FORMS)}")
    m = len(pool)
    if form == "per_layer" and len(values) != m:
        raise RecipeError(f"scales.values: per_layer needs {m} values (one per pool layer), got {len(values)}")
    if form == "matrix" and (len(values) != m or any(len(row) != m for row in values)):
        raise RecipeError(f"scales.values: matrix needs {m} rows of {m} values (from layer x to layer)")
    steps = []
    for k, ref in enumerate(layers):
        scale = 1.0
        if k > 0 and form == "per_layer":
            scale = float(values[pool.index[ref]])
        elif k > 0 and form == "matrix":
            scale = float(values[pool.index[layers[k - 1]]][pool.index[ref]])
        steps.append(PathStep(ref.source, ref.layer, scale))
    return steps


def check_path(pool: LayerPool, path: Sequence[PathStep], max_layers: int | None, where: str = "path") -> None:
    if not path:
        raise RecipeError(f"{where} is empty: keep at least one layer")
    if max_layers is not None and len(path) > max_layers:
        raise RecipeError(f"{where} has {len(path)} layers, over max_layers {max_layers}: drop layers or raise the limit")
    for k, step in enumerate(path):
        pool.check(step, f"{where}[{k}]")
        if not (step.scale == step.scale and abs(step.scale) != float("inf")) or step.scale == 0:
            raise RecipeError(f"{where}[{k}].scale {step.scale} must be a finite non-zero number")


def cumulative_scales(path: Sequence[PathStep]) -> list[float]:
    """c_k = s_0 * ... * s_k: how much larger the routed residual stream is than the exported one."""
    out, c = [], 1.0
    for step in path:
        c *= step.scale
        out.append(c)
    return out
