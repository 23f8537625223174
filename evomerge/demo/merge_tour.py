"""`evomerge demo`: build a tiny model family (cached), merge it with every method, print a table."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from evomerge.io import save_checkpoint
from evomerge.merge.methods import METHODS
from evomerge.merge.ps import Materializer
from evomerge.merge.recipe import Recipe
from evomerge.testing.tiny import TinySpec, make_family

SPEC = TinySpec(arch="llama", hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=512)
SOURCES = ("s0", "s1", "s2")


def demo_recipes() -> dict[str, Recipe]:
    """One recipe per method, with per-model, per-layer and per-module parameters."""
    weights = {"s0": 0.5, "s1": 0.3, "s2": 0.2}
    recipes = {}
    for name in METHODS.names():
        spec = METHODS[name]
        if name == "slerp":
            recipes[name] = Recipe.build(name, ["s0"], base_model="base", parameters={"t": [0.2, 0.8]})
            continue
        models = {m: {"weight": w} for m, w in weights.items()} if spec.param("weight") else list(SOURCES)
        params: dict = {}
        if spec.param("density"):
            params["density"] = [{"filter": "self_attn", "value": 0.5}, {"value": [0.4, 0.7]}]
        recipes[name] = Recipe.build(name, models, base_model="base" if spec.needs_base else None, parameters=params)
    return recipes


def run_demo(cache: Path, out: Path, log=print) -> list[dict]:
    cache.mkdir(parents=True, exist_ok=True)
    fam_dir = cache / "family"
    if not (fam_dir / "source_2" / "config.json").is_file():
        log(f"building a tiny Llama family (base + 3 fine-tune-like sources) in {fam_dir}")
        make_family(fam_dir, SPEC, n_sources=3, seed=0)
    sources = {"base": fam_dir / "base", **{m: fam_dir / f"source_{i}" for i, m in enumerate(SOURCES)}}
    materializer = Materializer(sources, "base")
    base = materializer.base
    task_norm = sum(float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas.values()])))
                    for deltas in materializer.deltas.values()) / len(SOURCES)
    rows = []
    for name, recipe in demo_recipes().items():
        materializer.materialize(recipe, seed=0)  # warm-up: builds magnitude indexes on first use
        start = time.perf_counter()
        materializer.materialize(recipe, seed=0)
        ms = (time.perf_counter() - start) * 1e3
        moved = torch.cat([(t.float() - base[n]).flatten() for n, t in materializer.named_tensors()])
        rows.append({
            "method": name,
            "ms": ms,
            "moved": float(torch.linalg.vector_norm(moved)) / task_norm,
            "changed": float((moved != 0).float().mean()),
        })
    from transformers import AutoConfig

    materializer.materialize(demo_recipes()["ties"])
    save_checkpoint(out, materializer.named_tensors(), AutoConfig.from_pretrained(sources["base"]),
                    tokenizer_from=sources["base"], generation_config_from=sources["base"], force=True)
    return rows
