"""A ledgered recipe as what the candidate view draws: per-layer values of a parameter-space recipe, or the layer
path of a data-flow / hybrid one (pure: JSON in, JSON out; no torch, nothing loaded).

Parameter space: every per-model parameter (weight, density, ...) becomes rows of per-layer values, one row per
(source, tensor filter): a scalar holds for every layer, a gradient is evaluated at layer i as the materializer
evaluates it (t = i / (L - 1), evomerge.merge.recipe.evaluate). Tensors outside the layers (embeddings, final norm,
head) take the value at t = 0, layer 0's.
Data flow: the path as steps (source, layer, scale); a hybrid's merged source carries its own parameter-space view.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import RecipeError
from evomerge.merge.recipe import evaluate, to_setting
from evomerge.merge.specs import DATAFLOW

ALL_TENSORS = "all tensors"
OTHER_TENSORS = "other tensors"
MERGE_WIDE = "(merge-wide)"  # the row label of a top-level per-layer parameter


def recipe_view(doc: Any, names: Mapping[str, str], layer_counts: Mapping[str, int]) -> dict[str, Any]:
    """{"kind": "ps" | "dataflow" | "hybrid" | "none" | "unreadable", ...} for a recipe document from the ledger.

    names: model path -> source name (the run config's); layer_counts: source name -> layers."""
    if not isinstance(doc, dict) or not doc:
        return {"kind": "none"}  # e.g. a genome that decoded to no recipe
    try:
        if doc.get("merge_method") == DATAFLOW:
            return _dataflow_view(doc, names, layer_counts)
        return ps_view(doc, names, _ps_layers(doc, names, layer_counts))
    except (RecipeError, KeyError, TypeError, ValueError, IndexError) as e:
        return {"kind": "unreadable", "reason": f"{type(e).__name__}: {e}"}


def ps_view(doc: dict[str, Any], names: Mapping[str, str], n_layers: int | None) -> dict[str, Any]:
    """A mergekit-style document -> {"kind": "ps", "method", "base_model", "layers", "rows", "scalars"}.

    rows: [{"source", "param", "tensors", "values": [one per layer]}]; scalars: merge-wide single values
    (lambda, a fixed density, ...)."""
    rows: list[dict[str, Any]] = []
    for i, entry in enumerate(doc.get("models") or []):
        entry = {"model": entry} if isinstance(entry, str) else entry
        source = _name(entry["model"], names)
        for param, raw in (entry.get("parameters") or {}).items():
            rows += _rows(source, param, raw, n_layers, f"models[{i}].parameters.{param}")
    scalars: dict[str, Any] = {}
    for param, raw in (doc.get("parameters") or {}).items():
        if isinstance(raw, (int, float)):  # bool included (normalize, rescale, ...)
            scalars[param] = raw
        else:
            rows += _rows(MERGE_WIDE, param, raw, n_layers, f"parameters.{param}")
    layers = n_layers or max((len(r["values"]) for r in rows), default=1)
    base = doc.get("base_model")
    return {"kind": "ps", "method": doc.get("merge_method"), "base_model": None if base is None else _name(base, names),
            "layers": layers, "rows": rows, "scalars": scalars}


def _rows(source: str, param: str, raw: Any, n_layers: int | None, where: str) -> list[dict[str, Any]]:
    choices = to_setting(raw, where)
    rows = []
    for choice in choices:
        if choice.filter is not None and choice.filter != "*":
            tensors = choice.filter
        else:
            tensors = OTHER_TENSORS if len(choices) > 1 else ALL_TENSORS
        value = choice.value
        layers = n_layers or (len(value) if isinstance(value, tuple) else 1)
        ts = [i / (layers - 1) if layers > 1 else 1.0 for i in range(layers)]  # as recipe.layer_position
        rows.append({"source": source, "param": param, "tensors": tensors,
                     "values": [float(evaluate(value, t)) for t in ts]})
    return rows


def _dataflow_view(doc: dict[str, Any], names: Mapping[str, str], layer_counts: Mapping[str, int]) -> dict[str, Any]:
    sources = []
    for item in doc.get("sources") or []:
        item = {"model": item} if isinstance(item, str) else item
        if "merge" in item:
            n = next(iter(layer_counts.values()), None)  # a hybrid's merge has its sources' (equal) layer count
            sources.append({"name": item["name"], "model": None, "layers": n,
                            "merge": ps_view(item["merge"], names, n)})
        else:
            name = str(item.get("name") or _name(item["model"], names))
            sources.append({"name": name, "model": item["model"], "layers": layer_counts.get(name), "merge": None})
    if "path" not in doc:
        raise RecipeError("a data-flow recipe without an explicit path (the genome form is not drawn)")
    path = []
    for k, step in enumerate(doc["path"]):
        if isinstance(step, dict):
            step = [step["source"], step["layer"], step.get("scale", 1.0)]
        path.append({"step": k, "source": str(step[0]), "layer": int(step[1]),
                     "scale": float(step[2]) if len(step) > 2 else 1.0})
    kind = "hybrid" if any(s["merge"] is not None for s in sources) else "dataflow"
    return {"kind": kind, "sources": sources, "path": path, "length": len(path), "max_layers": doc.get("max_layers")}


def _ps_layers(doc: dict[str, Any], names: Mapping[str, str], layer_counts: Mapping[str, int]) -> int | None:
    """The layer count of a parameter-space recipe's sources (they share it), when the run knows it."""
    for entry in doc.get("models") or []:
        model = entry if isinstance(entry, str) else entry.get("model")
        n = layer_counts.get(names.get(model, ""))
        if n is not None:
            return n
    return next(iter(layer_counts.values()), None)


def _name(model: str, names: Mapping[str, str]) -> str:
    return names.get(model) or Path(str(model)).name
