"""Hand-made merge recipes: the grid a practitioner would try before searching (the demo's baseline).

Task arithmetic over a grid of weights per source, and TIES over a grid of weights and densities. Each is a
mergekit-style document, scored like a search candidate (anchors + IRT estimate on the search split), so the
best of them is chosen exactly as the search chooses its models.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

TA_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
TIES_WEIGHTS = (0.5, 1.0)
TIES_DENSITIES = (0.3, 0.6, 0.9)


def hand_recipes(sources: Mapping[str, str], base_model: str) -> dict[str, dict]:
    """name -> recipe: 16 task-arithmetic and 12 TIES recipes for two sources (more sources, more points)."""
    names = list(sources)
    recipes: dict[str, dict] = {}

    def doc(method: str, weights: tuple[float, ...], **params: float) -> dict:
        return {"merge_method": method, "base_model": base_model,
                "models": [{"model": sources[n], "parameters": {"weight": w, **params}} for n, w in zip(names, weights)]}

    for weights in itertools.product(TA_WEIGHTS, repeat=len(names)):
        recipes["task_arithmetic " + _label(names, weights)] = doc("task_arithmetic", weights)
    for weights in itertools.product(TIES_WEIGHTS, repeat=len(names)):
        for density in TIES_DENSITIES:
            recipes[f"ties {_label(names, weights)} density {density:g}"] = doc("ties", weights, density=density)
    return recipes


def _label(names: list[str], weights: tuple[float, ...]) -> str:
    return " ".join(f"{n}={w:g}" for n, w in zip(names, weights))
