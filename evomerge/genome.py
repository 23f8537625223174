"""Search spaces and genomes: a real vector x in [0, 1]^n decodes, purely and deterministically, to a recipe.

Only the driver decodes (pymoo asks for x; workers receive the recipe), so this module imports neither torch
nor ray: a decoded recipe is a plain dict, the YAML document that `Recipe.from_mergekit` (parameter space) or
`parse_dataflow` (data flow, hybrid) reads.

Gene semantics (the whole contract, tested in tests/test_genome.py):
- a range gene maps x -> lo + x * (hi - lo) (weights, densities, merge-wide parameters, DFS scales);
- the method is an argmax over one gene per candidate method (ties go to the first listed);
- a DFS slot is kept when x > 0.5 (the paper's I_t > 0 after mapping [0, 1] onto [-1, 1]).
Which gene sits where (and its name) is declared once, in evomerge.genes; merge methods and their
parameters come from the torch-free catalogue evomerge.merge.specs.

Spaces (`kind`):
- ps: per layer group and module kind (attention / mlp / other, by tensor-name filters) one weight
  and one density per source; the method fixed or a gene; merge-wide parameters as range genes.
- dfs: T = M * repeats slot genes over the layer pool (every source's layers in order), plus scale
  genes (none, per_layer: M, matrix: M * M). Decodes to an explicit `path`.
- hybrid: a ps part whose recipe joins the pool as one more source (`merge_name`), then a dfs part.

Layer groups: `layer_groups: G` splits the L layers into G contiguous groups. With `group_form: step`
(the default) group g's value holds for exactly its layers: the recipe carries a per-layer gradient of
L values (mergekit gradients interpolate linearly between their points, and with one point per layer
every layer lands on its own point). With `group_form: linear` the G values are the gradient's control
points and layers in between are interpolated (no layer count needed). Tensors outside the layers
(embeddings, final norm, LM head) take group 0's value, as mergekit gives them t = 0.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import GenomeError, SearchSpaceError
from evomerge.genes import RANGE_ROLES, DFSShape, Gene, GeneLayout, PSShape, gene_layout
from evomerge.io.documents import read_yaml
from evomerge.merge.layer_path import LayerPool, apply_scales, decode_slots
from evomerge.merge.specs import DATAFLOW, METHODS, TENSOR, tensor_method_names
from evomerge.registry import Registry, UnknownNameError

PRESET_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
SLOT_THRESHOLD = 0.5  # slot kept when x > 0.5, i.e. I_t = 2x - 1 > 0
INITIAL_ON, INITIAL_OFF = 0.75, 0.25  # slot genes of the seeded identity path: clearly on/off, not at the walls

PRESETS: Registry[Path] = Registry("search-space preset")
if PRESET_DIR.is_dir():
    for _p in sorted(PRESET_DIR.glob("*.yaml")):
        PRESETS.register(_p.stem)(_p)


def _reads(method: str, param: str) -> bool:
    return METHODS[method].param(param) is not None


# -- the schema ------------------------------------------------------------------------------------------
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Range = tuple[float, float]


def _check_range(v: Range, low: float | None = None, high: float | None = None) -> Range:
    lo, hi = v
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"expected [low, high] with low <= high, got [{lo}, {hi}]")
    if (low is not None and lo < low) or (high is not None and hi > high):
        raise ValueError(f"[{lo}, {hi}] must lie within [{low}, {high}]")
    return v


class PSGenes(_Frozen):
    """Parameter-space genes."""

    methods: list[str] = Field(["ties"], min_length=1,
                               description="merge methods; one: fixed, several: an argmax gene picks one")
    layer_groups: int = Field(1, ge=1, description="number of contiguous layer groups with their own values")
    group_form: Literal["step", "linear"] = Field(
        "step", description="step: each group's value holds for its layers; linear: values interpolate between groups")
    module_filters: dict[str, str] = Field(
        {"attention": "self_attn", "mlp": "mlp"},
        description="module kind -> tensor-name substring; tensors matching none are 'other'; {}: one value for all")
    weight: Range = Field((0.0, 1.0), description="range of the per-source weight genes")
    density: Range = Field((0.1, 1.0), description="range of the per-source density genes (methods that read density)")
    params: dict[str, Range] = Field({}, description="merge-wide parameters searched as range genes, e.g. lambda: [0.5, 1.5]")
    fixed: dict[str, float | bool] = Field({}, description="parameters set to a fixed value, e.g. normalize: true")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in METHODS:
                close = difflib.get_close_matches(m, tensor_method_names(), n=2)
                hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
                raise ValueError(f"unknown merge method {m!r}: {hint}valid names are {', '.join(tensor_method_names())}")
            if METHODS[m].kind != TENSOR:
                raise ValueError(f"{m!r} is not a parameter-space method: choose data flow with kind: dfs or hybrid")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @field_validator("weight")
    @classmethod
    def _weight_range(cls, v: Range) -> Range:
        return _check_range(v)

    @field_validator("density")
    @classmethod
    def _density_range(cls, v: Range) -> Range:
        return _check_range(v, 0.0, 1.0)

    @field_validator("module_filters")
    @classmethod
    def _filters(cls, v: dict[str, str]) -> dict[str, str]:
        if "other" in v:
            raise ValueError("'other' is the kind of tensors that match no filter: do not give it a filter")
        if any(not f for f in v.values()):
            raise ValueError("a filter must be a non-empty substring of tensor names, e.g. self_attn")
        return v

    @model_validator(mode="after")
    def _params_read_by_a_method(self) -> PSGenes:
        for where, names in (("params", self.params), ("fixed", self.fixed)):
            for name in names:
                readers = [m for m in self.methods if _reads(m, name)]
                if not readers or name in ("weight", "density"):
                    raise ValueError(f"{where}.{name}: no listed method ({', '.join(self.methods)}) takes {name!r} "
                                     "as a merge-wide parameter: remove it")
        for name, rng in self.params.items():
            param = next(METHODS[m].param(name) for m in self.methods if _reads(m, name))
            assert param is not None
            if param.is_bool:
                raise ValueError(f"params.{name}: {name!r} is true/false: set it under 'fixed', not as a range gene")
            if param.is_int:  # a range gene decodes to fractions, which e.g. an iteration count cannot take
                raise ValueError(f"params.{name}: {name!r} is a whole number: set it under 'fixed', not as a range gene")
            try:
                _check_range(rng, param.low, param.high)
            except ValueError as e:
                raise ValueError(f"params.{name}: {e}") from None
        for name in set(self.params) & set(self.fixed):
            raise ValueError(f"{name!r} is both a gene (params) and fixed: keep one")
        return self

    @property
    def kinds(self) -> list[str]:
        return [*self.module_filters, "other"] if self.module_filters else ["all"]

    def uses(self, param: str) -> bool:
        return any(_reads(m, param) for m in self.methods)


class ScaleGenes(_Frozen):
    form: Literal["none", "per_layer", "matrix"] = Field(
        "per_layer", description="none: no scales; per_layer: one per destination pool layer; matrix: one per pair")
    range: Range = Field((0.5, 1.5), description="range of the scale genes (exclude 0)")

    @field_validator("range")
    @classmethod
    def _scale_range(cls, v: Range) -> Range:
        _check_range(v)
        if v[0] <= 0.0:
            raise ValueError(f"scales must be positive: the range [{v[0]}, {v[1]}] must start above 0")
        return v


class DFSGenes(_Frozen):
    """Data-flow genes."""

    repeats: int = Field(2, ge=1, description="r: the pool's M layers are laid out r times (T = M * r slots)")
    pin_ends: bool = Field(True, description="start with model A's first layer and end with its last")
    scales: ScaleGenes = Field(ScaleGenes(), description="scale form and range")
    max_layers: int | None = Field(None, ge=1, description="longest allowed path; longer ones are invalid genomes")


class SearchSpace(_Frozen):
    """What the search varies. `sources` and `base_model` normally come from the run config, the rest from a
    preset (see `load_space`)."""

    kind: Literal["ps", "dfs", "hybrid"] = Field(description="ps, dfs or hybrid")
    description: str = Field("", description="free text shown in logs")
    sources: dict[str, str] = Field(
        description="name -> model path, in order (the first is model A for dfs); a list of paths names them by folder")
    base_model: str | None = Field(None, description="base model of the parameter-space methods that need one")
    ps: PSGenes | None = Field(None, description="parameter-space genes (kind ps and hybrid)")
    dfs: DFSGenes | None = Field(None, description="data-flow genes (kind dfs and hybrid)")
    merge_name: str = Field("ps_merge", description="hybrid: the pool name of the parameter-space merge")
    seeds: tuple[tuple[float, ...], ...] = Field(
        (), description="genomes the initial population starts with, before the space's own seeds; in a hybrid a "
        "parameter-space genome (e.g. a ps run's front member) gets the merge's identity path")

    @field_validator("sources", mode="before")
    @classmethod
    def _sources_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            out: dict[str, Any] = {}
            for s in v:
                if not isinstance(s, str) or not s:
                    raise ValueError(f"expected a model path, got {s!r}")
                name = Path(s).name or s
                if name in out:
                    raise ValueError(f"two sources are named {name!r}: give them names with a mapping {{name: path}}")
                out[name] = s
            return out
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, v: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        for i, x in enumerate(v):
            bad = [j for j, value in enumerate(x) if not 0.0 <= value <= 1.0]  # NaN fails both comparisons
            if bad:
                raise ValueError(f"seeds[{i}]: genome values lie in [0, 1]; gene {bad[0]} is {x[bad[0]]!r}")
        return v

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("list at least one source model")
        return v

    @model_validator(mode="after")
    def _parts_match_kind(self) -> SearchSpace:
        need_ps, need_dfs = self.kind in ("ps", "hybrid"), self.kind in ("dfs", "hybrid")
        if need_ps != (self.ps is not None):
            raise ValueError(f"ps: kind {self.kind} {'needs' if need_ps else 'takes no'} 'ps' section")
        if need_dfs != (self.dfs is not None):
            raise ValueError(f"dfs: kind {self.kind} {'needs' if need_dfs else 'takes no'} 'dfs' section")
        if self.ps is not None:
            n = len(self.sources)
            for m in self.ps.methods:
                spec = METHODS[m]
                needs_base, lo, hi = spec.needs_base, spec.min_models, spec.max_models
                if needs_base and not self.base_model:
                    raise ValueError(f"base_model: method {m} needs a base model: set base_model")
                if n < lo or (hi is not None and n > hi):
                    raise ValueError(f"sources: method {m} merges {lo if hi == lo else f'at least {lo}'} "
                                     f"model(s), got {n}")
        if self.kind == "hybrid" and self.merge_name in self.sources:
            raise ValueError(f"merge_name: {self.merge_name!r} is also a source name: choose another")
        return self

    # -- construction from presets ---------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str | Path | Mapping[str, Any], *, sources: Sequence[str] | Mapping[str, str] | None = None,
             base_model: str | None = None, where: str = "search_space") -> SearchSpace:
        """A space from a preset name, a YAML file, or a mapping (whose `preset:` key names a preset that the
        other keys override, nested mappings merged). `sources` / `base_model` given here take precedence."""
        doc = _resolve_doc(spec, where)
        if sources is not None:
            doc["sources"] = list(sources) if not isinstance(sources, Mapping) else dict(sources)
        if base_model is not None:
            doc["base_model"] = base_model
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            raise SearchSpaceError(_format_validation(e, where)) from None

    # -- the genome ------------------------------------------------------------------------------------
    def layout(self, layer_counts: Mapping[str, int] | None = None) -> GeneLayout:
        """What each gene means, in genome order (evomerge.genes); built once per space and layer counts."""
        ps = dfs = None
        if self.ps is not None:
            p = self.ps
            ps = PSShape(methods=tuple(p.methods), ranges=tuple(r for r in RANGE_ROLES if p.uses(r)),
                         groups=p.layer_groups, kinds=tuple(p.kinds), sources=tuple(self.sources),
                         params=tuple(p.params))
        if self.dfs is not None:
            dfs = DFSShape(pool=tuple(self._pool_counts(layer_counts).items()), repeats=self.dfs.repeats,
                           scales=self.dfs.scales.form)
        return gene_layout(ps, dfs)

    def names(self, layer_counts: Mapping[str, int] | None = None) -> list[str]:
        """One readable name per gene, in genome order (for the ledger and logs)."""
        return self.layout(layer_counts).names()

    def dim(self, layer_counts: Mapping[str, int] | None = None) -> int:
        return len(self.layout(layer_counts))

    def decode(self, x: Sequence[float] | np.ndarray, layer_counts: Mapping[str, int] | None = None) -> dict[str, Any]:
        """The recipe (a YAML-ready dict) of genome x. Raises GenomeError for an invalid genome."""
        layout = self.layout(layer_counts)
        x = _check_genome(x, len(layout))
        ps = self._decode_ps(x, layout, layer_counts) if self.ps is not None else None
        if self.kind == "ps":
            return ps
        return self._decode_dfs(x, layout, layer_counts, ps)

    def initial(self, layer_counts: Mapping[str, int] | None = None) -> np.ndarray:
        """Genomes of uniform recipes for the initial population, shape (k, dim).

        ps: every method with all weights and densities mid-range (and merge-wide genes mid-range, which is
        where the preset ranges are centred), then each source alone (weight at the top, the others at the
        bottom) with the first method that reads weights. dfs: model A's own layers in order with scales 1.
        hybrid: each ps seed with the identity path of model A and with the identity path of the merge.
        The configured `seeds` come first."""
        layout = self.layout(layer_counts)
        seeds = self._ps_seeds(layout) if self.ps is not None else [np.full(len(layout), 0.5)]
        if self.dfs is not None:
            counts = self._pool_counts(layer_counts)
            firsts = [next(iter(self.sources))] + ([self.merge_name] if self.kind == "hybrid" else [])
            seeds = [self._with_identity_path(x, layout, first, counts[first]) for x in seeds for first in firsts]
        given = [self._given_seed(i, layout, layer_counts) for i in range(len(self.seeds))]
        return np.array(given + seeds, dtype=float)

    # -- internals -------------------------------------------------------------------------------------
    def _ps_layers(self, layer_counts: Mapping[str, int] | None) -> int | None:
        """L, the layer count of the ps sources, when step groups need it."""
        ps = self.ps
        assert ps is not None
        if ps.group_form != "step" or ps.layer_groups == 1:
            return None
        if layer_counts is None:
            raise SearchSpaceError(f"layer_groups {ps.layer_groups} with group_form step needs the sources' layer counts")
        counts = {layer_counts.get(s) for s in self.sources}
        if None in counts:
            missing = [s for s in self.sources if s not in layer_counts]
            raise SearchSpaceError(f"layer counts are missing for source(s) {', '.join(missing)}")
        if len(counts) != 1:
            raise SearchSpaceError(f"parameter-space sources must have the same number of layers, got {dict(layer_counts)}")
        n = counts.pop()
        if ps.layer_groups > n:
            raise SearchSpaceError(f"layer_groups {ps.layer_groups} is more than the {n} layers: lower it")
        return n

    def _decode_ps(self, x: np.ndarray, layout: GeneLayout, layer_counts: Mapping[str, int] | None) -> dict[str, Any]:
        ps = self.ps
        assert ps is not None
        n_layers = self._ps_layers(layer_counts)
        votes = layout.positions("method")
        # argmax over the method genes: the first of ties
        method = layout.genes[votes[int(np.argmax(x[votes]))]].method if votes else ps.methods[0]
        assert method is not None
        spec = METHODS[method]
        per_model: dict[str, dict[str, Any]] = {name: {} for name in self.sources}
        for param, (lo, hi) in (("weight", ps.weight), ("density", ps.density)):
            if spec.param(param) is None:
                continue  # genes of a method not chosen this time (if any): present, ignored
            for src in self.sources:
                per_kind = []
                for kind in ps.kinds:
                    genes = [layout.index(Gene(param, source=src, group=g, kind=kind)) for g in range(ps.layer_groups)]
                    per_kind.append(_group_value(lo + x[genes] * (hi - lo), n_layers))
                if all(v == per_kind[0] for v in per_kind):  # one value for every kind: no filters needed
                    per_model[src][param] = per_kind[0]
                else:
                    per_model[src][param] = [{"filter": ps.module_filters[kind], "value": v}
                                             for kind, v in zip(ps.kinds[:-1], per_kind[:-1])] + [{"value": per_kind[-1]}]
        top: dict[str, Any] = {}
        for name, (lo, hi) in ps.params.items():
            if spec.param(name) is not None:
                top[name] = float(lo + x[layout.index(Gene("param", param=name))] * (hi - lo))
        for name, value in ps.fixed.items():
            if spec.param(name) is not None:
                top[name] = value
        doc: dict[str, Any] = {"merge_method": method}
        if spec.needs_base:
            doc["base_model"] = self.base_model
        doc["models"] = [{"model": path, **({"parameters": per_model[name]} if per_model[name] else {})}
                         for name, path in self.sources.items()]
        if top:
            doc["parameters"] = top
        return doc

    def _ps_seeds(self, layout: GeneLayout) -> list[np.ndarray]:
        """Every method with mid-range genes, then each source alone (genes outside the ps block: 0.5)."""
        ps = self.ps
        assert ps is not None
        votes = layout.positions("method")
        seeds = []
        for m in ps.methods if votes else ps.methods[:1]:
            x = np.full(len(layout), 0.5)
            for i in votes:
                x[i] = 1.0 if layout.genes[i].method == m else 0.0
            seeds.append(x)
        weights = layout.positions("weight")
        if weights and len(self.sources) > 1:
            first = next(i for i, m in enumerate(ps.methods) if _reads(m, "weight"))  # a method that reads weights
            for src in self.sources:
                x = seeds[first].copy()
                for i in weights:
                    x[i] = 1.0 if layout.genes[i].source == src else 0.0
                seeds.append(x)
        return seeds

    def _pool_counts(self, layer_counts: Mapping[str, int] | None) -> dict[str, int]:
        """Layer count of every pool source, in pool order (the hybrid merge last, with the sources' count)."""
        if layer_counts is None:
            raise SearchSpaceError("a data-flow space needs the layer count of every source: pass layer_counts")
        missing = [s for s in self.sources if s not in layer_counts]
        if missing:
            raise SearchSpaceError(f"layer counts are missing for source(s) {', '.join(missing)}")
        bad = {s: n for s, n in layer_counts.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
        if bad:
            raise SearchSpaceError(f"layer counts must be positive integers, got {bad}")
        counts = {s: int(layer_counts[s]) for s in self.sources}
        if self.kind == "hybrid":
            if len(set(counts.values())) != 1:
                raise SearchSpaceError(f"hybrid: the merged sources must have the same number of layers, got {counts}")
            counts[self.merge_name] = next(iter(counts.values()))
        return counts

    def _decode_dfs(self, x: np.ndarray, layout: GeneLayout, layer_counts: Mapping[str, int] | None,
                    ps: dict[str, Any] | None) -> dict[str, Any]:
        dfs = self.dfs
        assert dfs is not None
        pool = LayerPool(self._pool_counts(layer_counts))
        slots = layout.positions("slot")
        on = [False] * len(slots)
        for i in slots:
            on[layout.genes[i].slot] = bool(x[i] > SLOT_THRESHOLD)
        layers = decode_slots(pool, on, repeats=dfs.repeats, pin_ends=dfs.pin_ends)
        if not layers:
            raise GenomeError("the genome keeps no layer (every slot is off): the path is empty")
        if dfs.max_layers is not None and len(layers) > dfs.max_layers:
            raise GenomeError(f"the path has {len(layers)} layers, over max_layers {dfs.max_layers}")
        steps = apply_scales(pool, layers, dfs.scales.form, self._scale_values(x, layout, pool))
        sources: list[dict[str, Any]] = [{"name": name, "model": path} for name, path in self.sources.items()]
        if ps is not None:
            sources.append({"name": self.merge_name, "merge": ps})
        doc: dict[str, Any] = {"merge_method": DATAFLOW, "sources": sources,
                               "path": [[s.source, s.layer] + ([s.scale] if s.scale != 1.0 else []) for s in steps]}
        if dfs.max_layers is not None:
            doc["max_layers"] = dfs.max_layers
        return doc

    def _scale_values(self, x: np.ndarray, layout: GeneLayout, pool: LayerPool) -> list:
        """The scale genes mapped onto their range, as apply_scales reads them: per_layer values[to],
        matrix values[from][to] (pool indices); none: []."""
        dfs = self.dfs
        assert dfs is not None
        lo, hi = dfs.scales.range
        at, to, origin = layout.scale_cells()
        m = len(pool)
        if dfs.scales.form == "per_layer":
            values = np.zeros(m)
            values[to] = lo + x[at] * (hi - lo)
        elif dfs.scales.form == "matrix":
            values = np.zeros((m, m))
            values[origin, to] = lo + x[at] * (hi - lo)
        else:
            return []
        return values.tolist()

    def _given_seed(self, i: int, layout: GeneLayout, layer_counts: Mapping[str, int] | None) -> np.ndarray:
        """seeds[i] as a whole genome: as given, or (hybrid) a ps genome completed with the merge's identity path."""
        x = np.asarray(self.seeds[i], dtype=float)
        n_ps = layout.block("ps").stop
        if len(x) == len(layout):
            return x
        if self.kind == "hybrid" and len(x) == n_ps:
            merge_layers = self._pool_counts(layer_counts)[self.merge_name]
            return self._with_identity_path(np.concatenate([x, np.zeros(len(layout) - n_ps)]), layout,
                                            self.merge_name, merge_layers)
        either = f" (or {n_ps}, a parameter-space genome)" if self.kind == "hybrid" else ""
        raise SearchSpaceError(f"search_space.seeds[{i}] has {len(x)} genes, this space has {len(layout)}{either}: "
                               "seed with genomes of this space (a run's ledger holds them)")

    def _with_identity_path(self, x: np.ndarray, layout: GeneLayout, first: str, n_layers: int) -> np.ndarray:
        """x with DFS genes of `first`'s own layers in order (first repeat), every scale 1 (or the nearest in range)."""
        dfs = self.dfs
        assert dfs is not None
        keep = range(1, n_layers - 1) if dfs.pin_ends else range(n_layers)  # pinned: model A's first and last frame it
        x = x.copy()
        for i in layout.positions("slot"):
            gene = layout.genes[i]
            assert gene.layer is not None
            on = gene.repeat == 0 and gene.layer.source == first and gene.layer.layer in keep
            x[i] = INITIAL_ON if on else INITIAL_OFF
        lo, hi = dfs.scales.range
        one = min(max((1.0 - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 0.0
        for i in layout.positions("scale"):
            x[i] = one
        return x


def _group_value(values: np.ndarray, n_layers: int | None) -> float | list[float]:
    """values: (G,) one per layer group -> a recipe value: a scalar (G == 1), a per-layer step gradient of
    n_layers points (group of layer i: i * G // n_layers), or the G values as gradient control points."""
    g = len(values)
    if g == 1 or np.all(values == values[0]):  # a constant gradient is a scalar
        return float(values[0])
    if n_layers is None:
        return [float(v) for v in values]
    return [float(values[i * g // n_layers]) for i in range(n_layers)]


def _check_genome(x: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise GenomeError("the genome must be a vector of numbers") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise GenomeError(f"the genome has shape {arr.shape}, expected ({n},) for this search space")
    if not np.all(np.isfinite(arr)):
        raise GenomeError(f"the genome holds non-finite values at {np.flatnonzero(~np.isfinite(arr)).tolist()}")
    if np.any((arr < 0.0) | (arr > 1.0)):
        raise GenomeError(f"genome values must lie in [0, 1]; out of range at {np.flatnonzero((arr < 0) | (arr > 1)).tolist()}")
    return arr


# -- presets ---------------------------------------------------------------------------------------------
def _resolve_doc(spec: str | Path | Mapping[str, Any], where: str) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        doc = copy.deepcopy(dict(spec))
        preset = doc.pop("preset", None)
        if preset is None:
            return doc
        return _deep_merge(_resolve_doc(preset, f"{where}.preset"), doc)
    text = str(spec)
    if isinstance(spec, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(spec)
        if not path.is_file():
            raise SearchSpaceError(f"{where}: search-space file {path} does not exist")
    else:
        try:
            path = PRESETS[text]
        except UnknownNameError as e:
            raise SearchSpaceError(f"{where}: {e}") from None
    doc = read_yaml(path, SearchSpaceError, "search-space file")
    if not isinstance(doc, dict):
        raise SearchSpaceError(f"{path}: expected a mapping with 'kind' and its sections")
    if "preset" in doc:
        return _resolve_doc(doc, str(path))
    return doc


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _format_validation(e: ValidationError, where: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # cross-field messages start with their field
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(parts)


def load_space(spec: str | Path | Mapping[str, Any], **kw: Any) -> SearchSpace:
    """Shorthand for SearchSpace.load."""
    return SearchSpace.load(spec, **kw)


__all__ = ["PRESETS", "DFSGenes", "GenomeError", "PSGenes", "ScaleGenes", "SearchSpace",
           "SearchSpaceError", "load_space"]
