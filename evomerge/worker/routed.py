"""Routed models: a data-flow path run over the source models' own layers, with no weight copies.

A routed model is an ordinary transformers model of model A's class whose layer list holds
references to the source layers named by the path, each wrapped to scale the hidden state before
it enters the layer. Embeddings, rotary tables, the final norm and the LM head are model A's own
modules (as in Akiba et al. 2024). Building one takes milliseconds, so a worker builds a fresh
routed model per candidate over sources it loaded once; lm-eval's HFLM scores it like any model.

The KV cache works: each wrapped layer presents its path position as the attention's layer_idx
while it runs, so a layer used twice in a path keeps two cache entries.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evomerge.errors import IncompatibleModelsError, RecipeError
from evomerge.io.documents import layer_count
from evomerge.merge.layer_path import PathStep

# Config keys that may differ between the sources of one path: the routed model takes them from
# model A (vocabulary, special tokens, tying: A's embeddings and head are used) or per layer.
_MAY_DIFFER = {
    "num_hidden_layers", "n_layer", "layer_types", "max_window_layers", "_name_or_path", "transformers_version",
    "dtype", "torch_dtype", "use_cache", "architectures", "vocab_size", "bos_token_id", "eos_token_id",
    "pad_token_id", "tie_word_embeddings", "output_attentions", "output_hidden_states", "return_dict",
}
# Config lists with one entry per layer: in a routed or exported model they follow the layer.
PER_LAYER_KEYS = ("layer_types",)


def layers_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(state-dict prefix, module list) of a transformers causal LM's decoder layers."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if not isinstance(inner, nn.Module):
        raise IncompatibleModelsError(f"{type(model).__name__}: cannot find its base model (base_model_prefix)")
    n = num_layers(model.config)
    for name, child in inner.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return f"{prefix}.{name}", child
    raise IncompatibleModelsError(f"{type(model).__name__}: no list of {n} decoder layers found in its base model")


def num_layers(config) -> int:
    """The layer count of a transformers config object (the same rule as io.documents for config.json)."""
    return layer_count(config.to_dict(), Path(getattr(config, "_name_or_path", "") or "the model"))


def check_layer_compatible(configs: Mapping[str, Any]) -> None:
    """Layers of these sources can run in one path: same architecture and the same shapes everywhere."""
    names = list(configs)
    dicts = {n: c.to_dict() for n, c in configs.items()}
    a = names[0]
    hidden = lambda d: d.get("hidden_size", d.get("n_embd"))
    for n in names[1:]:
        if dicts[n].get("model_type") != dicts[a].get("model_type"):
            raise IncompatibleModelsError(
                f"source {n!r} is a {dicts[n].get('model_type')} model but {a!r} is {dicts[a].get('model_type')}: "
                "a path can only combine layers of one architecture")
        if hidden(dicts[n]) != hidden(dicts[a]):
            raise IncompatibleModelsError(
                f"source {n!r} has hidden size {hidden(dicts[n])} but {a!r} has {hidden(dicts[a])}: "
                "layers of a path must share the hidden size")
        differ = sorted(k for k in set(dicts[a]) | set(dicts[n])
                        if k not in _MAY_DIFFER and dicts[a].get(k) != dicts[n].get(k))
        if differ:
            k = differ[0]
            raise IncompatibleModelsError(
                f"sources {a!r} and {n!r} differ in config {k} ({dicts[a].get(k)!r} vs {dicts[n].get(k)!r})"
                + (f" and {len(differ) - 1} more key(s)" if len(differ) > 1 else "")
                + ": their layers cannot run in one model")


def path_config(configs: Mapping[str, Any], path: Sequence[PathStep]):
    """Model A's config with num_hidden_layers = path length and per-layer entries following the layers."""
    config = copy.deepcopy(next(iter(configs.values())))
    config.num_hidden_layers = len(path)
    for key in PER_LAYER_KEYS:
        per_layer = [getattr(configs[s.source], key, None) for s in path]
        if all(v is not None for v in per_layer):
            setattr(config, key, [v[s.layer] for v, s in zip(per_layer, path)])
    return config


class RoutedLayer(nn.Module):
    """One path position: scales the incoming hidden state, then runs a source layer (shared, not copied)."""

    def __init__(self, layer: nn.Module, position: int, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = float(scale)
        # modules that index the KV cache by layer; a plain list, so they are not registered twice
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        if hasattr(layer, "attention_type"):  # read by some models to pick the attention mask
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        saved = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            m.layer_idx = self.position
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            for m, idx in zip(self._indexed, saved):
                m.layer_idx = idx

    def extra_repr(self) -> str:
        return f"position={self.position}, scale={self.scale:g}"


def build_routed_model(models: Mapping[str, nn.Module], path: Sequence[PathStep]) -> nn.Module:
    """A causal LM that runs `path` over the layers of `models` (name -> live model; the first is model A)."""
    from evomerge.worker.materializer import skip_weight_init

    if not path:
        raise RecipeError("path is empty: keep at least one layer")
    check_layer_compatible({n: m.config for n, m in models.items()})
    a = next(iter(models.values()))
    source_layers = {n: layers_of(m)[1] for n, m in models.items()}
    for k, step in enumerate(path):
        if step.source not in models:
            raise RecipeError(f"path[{k}]: unknown source {step.source!r}: the sources are {', '.join(models)}")
        if not 0 <= step.layer < len(source_layers[step.source]):
            raise RecipeError(f"path[{k}]: source {step.source!r} has no layer {step.layer}")

    config = path_config({n: m.config for n, m in models.items()}, path)
    with torch.device("meta"), skip_weight_init():  # a shell: every module is replaced below
        routed = type(a)(config)
    inner_a, inner_r = getattr(a, a.base_model_prefix), getattr(routed, routed.base_model_prefix)
    layers_name = layers_of(a)[0].split(".")[-1]
    for name, child in a.named_children():
        if child is not inner_a:
            setattr(routed, name, child)  # the LM head
    for name, child in inner_a.named_children():
        if name != layers_name:
            setattr(inner_r, name, child)  # embeddings, rotary table, final norm
    setattr(inner_r, layers_name, nn.ModuleList(
        RoutedLayer(source_layers[s.source][s.layer], k, s.scale) for k, s in enumerate(path)))
    left = [n for n, t in (*routed.named_parameters(), *routed.named_buffers()) if t.is_meta]
    if left:
        raise IncompatibleModelsError(f"{type(a).__name__}: cannot route {left[0]}: it belongs to no source module")
    routed.generation_config = copy.deepcopy(a.generation_config)
    return routed.eval()


def load_models(
    paths: Mapping[str, Any], *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """Live models of the sources, loaded once (name -> checkpoint directory, in pool order)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per source is noise
    models = {}
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=None)
        models[name] = model.to(device).eval()
    return models


def load_pool(
    sources: Sequence[Any],  # dataflow.PoolSource, in pool order
    paths: Mapping[str, Path],  # every model reference (of checkpoint sources and inside merges) -> directory
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype,
    seed: int = 0,
    allow_pickle: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Live models of a pool: checkpoints loaded once; a merge source materialized into its own live
    model. Returns (name -> model, name -> Materializer of each merge source, to re-materialize in place)."""
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.worker.materializer import Materializer

    models: dict[str, nn.Module] = {}
    materializers: dict[str, Any] = {}
    for s in sources:
        if s.model is not None:
            Checkpoint.open(paths[s.model], allow_pickle=allow_pickle)  # refuses pickled weights unless allowed
            models[s.name] = load_models({s.name: paths[s.model]}, device=device, dtype=dtype)[s.name]
            continue
        recipe = s.merge
        base = recipe.base_model or recipe.models[0].model
        m = Materializer({n: paths[n] for n in recipe.model_names()}, base, device=device, model_dtype=dtype,
                         allow_pickle=allow_pickle)
        models[s.name] = m.materialize(recipe, seed=seed)
        materializers[s.name] = m
    return models, materializers
