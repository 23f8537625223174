"""Data-flow (DFS) and hybrid PS+DFS recipes: the layer pool's sources, and the path run through it.

YAML (`merge_method: dataflow`):

    sources:                  # the layer pool, in order; the first is model A, whose embeddings,
      - model: ./models/math  # final norm, LM head and tokenizer the merged model uses
        name: math            # optional; default: the folder name
      - model: ./models/words
      - name: mix             # hybrid: a parameter-space merge (any mergekit-style recipe) joins the pool
        merge: {merge_method: ties, base_model: ./models/base, models: [...], parameters: {...}}
    path:                     # the layers that run, in order: [source, layer] or [source, layer, scale]
      - [math, 0]
      - [words, 1, 1.2]       # the hidden state is multiplied by 1.2 before it enters words' layer 1
    max_layers: 12            # optional limit on the path length
    dtype: float32            # optional: load, run and write in this dtype (default: model A's)

Instead of `path`, the genome form that the search writes (Akiba et al. 2024):

    slots: {repeats: 2, on: [0, 1, 5, 9]}   # kept slots; slot t runs pool layer t mod M (M = all layers)
    pin_ends: true                          # start with model A's first layer and end with its last
    scales: {form: per_layer, values: [...]} # or form: matrix (M x M, from layer x to layer), or none
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import RecipeError
from evomerge.merge.layer_path import LayerPool, PathStep, apply_scales, check_path, decode_slots
from evomerge.merge.recipe import DTYPES, Recipe, _check_keys
from evomerge.merge.specs import DATAFLOW

METHOD = DATAFLOW  # the merge_method of these documents, named in the method catalogue
TOP_KEYS = ("merge_method", "sources", "path", "slots", "pin_ends", "scales", "max_layers", "dtype")
SOURCE_KEYS = ("name", "model", "merge")


@dataclass(frozen=True)
class PoolSource:
    name: str
    model: str | None = None  # a checkpoint (path or local-cache name) ...
    merge: Recipe | None = None  # ... or a parameter-space merge (hybrid)


@dataclass(frozen=True)
class DataflowRecipe:
    sources: tuple[PoolSource, ...]
    path: tuple[PathStep, ...]
    max_layers: int | None = None
    dtype: str | None = None

    @property
    def model_a(self) -> PoolSource:
        return self.sources[0]

    def to_dict(self) -> dict[str, Any]:
        """The explicit form (YAML-ready): what `evomerge merge` reads back to the same model."""
        sources = []
        for s in self.sources:
            item: dict[str, Any] = {"name": s.name}
            if s.model is not None:
                item["model"] = s.model
            else:
                assert s.merge is not None
                item["merge"] = s.merge.to_mergekit()
            sources.append(item)
        doc: dict[str, Any] = {"merge_method": METHOD, "sources": sources,
                               "path": [[p.source, p.layer] + ([p.scale] if p.scale != 1.0 else []) for p in self.path]}
        if self.max_layers is not None:
            doc["max_layers"] = self.max_layers
        if self.dtype is not None:
            doc["dtype"] = self.dtype
        return doc


def is_dataflow(data: Any) -> bool:
    return isinstance(data, dict) and data.get("merge_method") == METHOD


def parse_sources(data: dict, where: str) -> tuple[PoolSource, ...]:
    raw = data.get("sources")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{where}: sources must be a non-empty list of {{model: PATH}} or {{name: N, merge: RECIPE}}")
    sources, seen = [], set()
    for i, item in enumerate(raw):
        at = f"{where}: sources[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict):
            raise RecipeError(f"{at} must be a mapping with 'model' or 'merge'")
        _check_keys(item, SOURCE_KEYS, at)
        if ("model" in item) == ("merge" in item):
            raise RecipeError(f"{at} needs exactly one of 'model' (a checkpoint) or 'merge' (a merge recipe)")
        if "model" in item:
            if not isinstance(item["model"], str) or not item["model"]:
                raise RecipeError(f"{at}.model: expected a model path")
            source = PoolSource(str(item.get("name") or Path(item["model"]).name), model=item["model"])
        else:
            if not item.get("name"):
                raise RecipeError(f"{at}: a merge source needs a 'name' for the path to refer to")
            source = PoolSource(str(item["name"]), merge=Recipe.from_mergekit(item["merge"], f"{at}.merge"))
        if source.name in seen:
            raise RecipeError(f"{at}: source name {source.name!r} is used twice: give one of them another 'name'")
        seen.add(source.name)
        sources.append(source)
    return tuple(sources)


def parse_dataflow(data: Any, where: str, layer_count: Callable[[PoolSource], int]) -> DataflowRecipe:
    """Parse a dataflow recipe; layer_count(source) gives each source's number of layers
    (read from its config: the genome form decodes against the whole pool)."""
    if not is_dataflow(data):
        raise RecipeError(f"{where}: expected 'merge_method: {METHOD}'")
    _check_keys(data, TOP_KEYS, where)
    sources = parse_sources(data, where)
    pool = LayerPool({s.name: layer_count(s) for s in sources})
    max_layers = data.get("max_layers")
    if max_layers is not None and (isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1):
        raise RecipeError(f"{where}: max_layers must be a positive integer, got {max_layers!r}")
    dtype = data.get("dtype")
    if dtype is not None and str(dtype) not in DTYPES:
        raise RecipeError(f"{where}: dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")

    genome_keys = [k for k in ("slots", "pin_ends", "scales") if k in data]
    if "path" in data and genome_keys:
        raise RecipeError(f"{where}: give either 'path' or the genome form ('slots' with 'scales', 'pin_ends'), "
                          f"not both ({genome_keys[0]} is set)")
    if "path" in data:
        path = _explicit_path(data["path"], f"{where}: path")
    elif "slots" in data:
        path = _genome_path(data, pool, where)
    else:
        raise RecipeError(f"{where}: the path is missing: add 'path: [[SOURCE, LAYER], ...]' or 'slots: {{on: [...]}}'")
    check_path(pool, path, max_layers, f"{where}: path")
    return DataflowRecipe(sources, tuple(path), max_layers, None if dtype is None else str(dtype))


def _explicit_path(raw: Any, at: str) -> list[PathStep]:
    if not isinstance(raw, list):
        raise RecipeError(f"{at} must be a list of [source, layer] or [source, layer, scale]")
    steps = []
    for k, item in enumerate(raw):
        if isinstance(item, dict):
            _check_keys(item, ("source", "layer", "scale"), f"{at}[{k}]")
            item = [item.get("source"), item.get("layer"), item.get("scale", 1.0)]
        if (not isinstance(item, list) or len(item) not in (2, 3) or not isinstance(item[0], str)
                or not _is_int(item[1]) or (len(item) == 3 and not _is_number(item[2]))):
            raise RecipeError(f"{at}[{k}]: expected [source, layer] or [source, layer, scale], got {item!r}")
        steps.append(PathStep(item[0], int(item[1]), float(item[2]) if len(item) == 3 else 1.0))
    return steps


def _genome_path(data: dict, pool: LayerPool, where: str) -> list[PathStep]:
    slots = data["slots"]
    if not isinstance(slots, dict):
        raise RecipeError(f"{where}: slots must be a mapping {{repeats: R, on: [slot indices]}}")
    _check_keys(slots, ("repeats", "on"), f"{where}: slots")
    repeats = slots.get("repeats", 1)
    if not _is_int(repeats) or repeats < 1:
        raise RecipeError(f"{where}: slots.repeats must be a positive integer, got {repeats!r}")
    n_slots = len(pool) * repeats
    on = slots.get("on")
    if not isinstance(on, list) or not all(_is_int(t) and 0 <= t < n_slots for t in on):
        raise RecipeError(f"{where}: slots.on must be a list of slot indices in 0..{n_slots - 1} "
                          f"({len(pool)} pool layers x {repeats} repeats)")
    indicator = [False] * n_slots
    for t in on:
        indicator[t] = True
    pin_ends = data.get("pin_ends", False)
    if not isinstance(pin_ends, bool):
        raise RecipeError(f"{where}: pin_ends must be true or false")
    layers = decode_slots(pool, indicator, repeats=repeats, pin_ends=pin_ends)
    scales = data.get("scales") or {"form": "none"}
    if not isinstance(scales, dict):
        raise RecipeError(f"{where}: scales must be a mapping {{form: none|per_layer|matrix, values: ...}}")
    _check_keys(scales, ("form", "values"), f"{where}: scales")
    try:
        return apply_scales(pool, layers, str(scales.get("form", "none")), scales.get("values") or [])
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: scales.values must hold numbers") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
