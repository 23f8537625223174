"""A data-flow path as a mergekit `slices:` passthrough recipe, where mergekit can express it (pure).

The folded export (worker/folded_export.py) divides layer k's residual-writing projections by the
path's cumulative scale c_k; mergekit's passthrough `scale` multiplies the tensors its filter matches,
so layer k becomes a slice whose filters on those projections carry 1 / c_k. Consecutive layers of one
source with the same c_k share a slice. mergekit takes the embeddings from the first slice's model and
the final norm and LM head from the last slice's, while the export takes them from model A: a path must
start and end in model A to be expressible. Hybrid paths (a merge in the pool) have no mergekit form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.merge.dataflow_recipe import DataflowRecipe
from evomerge.merge.layer_path import cumulative_scales

MERGEKIT_YAML = "mergekit.yaml"  # written next to a data-flow export when the path is expressible


def to_mergekit_slices(recipe: DataflowRecipe, residual_filters: Sequence[str],
                       dtype: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """(mergekit passthrough document, "") or (None, why it cannot be written)."""
    merged = [s.name for s in recipe.sources if s.model is None]
    if merged:
        return None, f"source {merged[0]!r} is a merge made inside the recipe, which mergekit cannot name"
    a = recipe.model_a.name
    if recipe.path[0].source != a or recipe.path[-1].source != a:
        return None, (f"the path starts or ends outside model A ({a}); mergekit would take the embeddings or the "
                      "final norm and LM head from that model")
    refs = {s.name: s.model for s in recipe.sources}
    groups: list[list] = []  # [source, first layer, last layer, cumulative scale]
    for step, c in zip(recipe.path, cumulative_scales(recipe.path)):
        g = groups[-1] if groups else None
        if g is not None and g[0] == step.source and g[2] + 1 == step.layer and g[3] == c:
            g[2] = step.layer
        else:
            groups.append([step.source, step.layer, step.layer, c])
    slices = []
    for source, first, last, c in groups:
        src: dict[str, Any] = {"model": refs[source], "layer_range": [first, last + 1]}
        if c != 1.0:
            src["parameters"] = {"scale": [{"filter": f, "value": 1.0 / c} for f in residual_filters] + [{"value": 1.0}]}
        slices.append({"sources": [src]})
    doc: dict[str, Any] = {"slices": slices, "merge_method": "passthrough", "base_model": refs[a]}
    if dtype is not None:
        doc["dtype"] = dtype
    return doc, ""
