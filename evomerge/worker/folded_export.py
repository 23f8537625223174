"""Export a routed path as a standard checkpoint, folding the scales into the weights.

In a pre-norm transformer whose norms are scale invariant (RMSNorm, LayerNorm; up to eps), a
residual stream larger by c_k = s_0 * ... * s_k at layer k gives the same normalized inputs to
every sub-block, and the sub-blocks' outputs are added to it unscaled. So the routed model equals
a plain stack of the path's layers in which layer k's residual-writing projections (attention
output, MLP output, and their biases) are divided by c_k: its stream is the routed one / c_k,
and the final norm removes the last factor. The result has num_hidden_layers = path length and
loads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from evomerge.errors import IncompatibleModelsError
from evomerge.merge.layer_path import PathStep, cumulative_scales
from evomerge.worker.routed import check_layer_compatible, layers_of, path_config

# model_type -> the modules inside a decoder layer whose outputs are added to the residual stream.
# Listed only where every norm is a scale-invariant pre-norm, so the folding is exact up to eps.
FOLD_RULES: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}
# config settings under which a layer's behaviour depends on its index, so renumbering changes it
_INDEX_DEPENDENT = {"gpt2": ("scale_attn_by_inverse_layer_idx", "add_cross_attention")}


def check_foldable(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in FOLD_RULES:
        raise IncompatibleModelsError(
            f"cannot export a {model_type} path as a standard checkpoint: the scale folding is only known to be exact "
            f"for {', '.join(sorted(FOLD_RULES))}; score it as a routed model instead")
    for key in _INDEX_DEPENDENT.get(model_type, ()):
        if getattr(config, key, False):
            raise IncompatibleModelsError(
                f"cannot export this {model_type} path: with {key}=true a layer's behaviour depends on its index")


def folded_tensors(models: Mapping[str, nn.Module], path: Sequence[PathStep]) -> Iterator[tuple[str, torch.Tensor]]:
    """The exported checkpoint's tensors: model A's non-layer tensors, then the path's layers renumbered,
    with each layer's residual-writing projections divided by its cumulative scale."""
    a = next(iter(models.values()))
    check_foldable(a.config)
    outputs = FOLD_RULES[a.config.model_type]
    prefix = layers_of(a)[0] + "."
    tied = _tied_names(a)
    for name, t in a.state_dict().items():
        if not name.startswith(prefix) and name not in tied:
            yield name, t
    layer_lists = {n: layers_of(m)[1] for n, m in models.items()}
    written: set[tuple[str, int]] = set()  # a layer used twice is written twice: safetensors refuses shared storage
    for k, (step, c) in enumerate(zip(path, cumulative_scales(path))):
        for name, t in layer_lists[step.source][step.layer].state_dict().items():
            if c != 1.0 and name.rsplit(".", 1)[0] in outputs:
                t = (t.double() / c).to(t.dtype)
            elif (step.source, step.layer) in written:
                t = t.clone()
            yield f"{prefix}{k}.{name}", t
        written.add((step.source, step.layer))


def mergekit_files(recipe, model_type: str, dtype: torch.dtype | None, layer_types: Sequence | None = None,
                   ) -> dict[str, str]:
    """{mergekit.yaml: text}: the path as a mergekit passthrough recipe whose scale filters on the residual-writing
    projections reproduce the folded weights; {} where mergekit cannot express the path (merge/mergekit_export.py).
    layer_types: model A's config's per-layer list, if it has one."""
    import yaml

    from evomerge.merge.mergekit_export import MERGEKIT_YAML, to_mergekit_slices

    if model_type not in FOLD_RULES:
        return {}
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    doc, _why = to_mergekit_slices(recipe, FOLD_RULES[model_type], name)
    if doc is None:
        return {}
    head = "# this data-flow path as a mergekit 0.1.5 passthrough recipe (mergekit-yaml mergekit.yaml OUT)\n"
    # measured: mergekit keeps the donor's layer_types list, which transformers 5 refuses at another layer count
    if layer_types and len(layer_types) != len(recipe.path):
        head += ("# note: mergekit 0.1.5 copies the config's per-layer layer_types unchanged, so with transformers 5 "
                 "it fails on a new layer count; evomerge merge runs this file\n")
    return {MERGEKIT_YAML: head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)}


def _tied_names(model: nn.Module) -> set[str]:
    """Names that save_pretrained leaves out because they share storage with another (the tied LM head)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, (dict, list, tuple, set)) else set()


def export_path(
    models: Mapping[str, nn.Module],
    path: Sequence[PathStep],
    out: Path,
    *,
    tokenizer_from: str | Path | None,
    generation_config_from: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the path as a Hugging Face checkpoint directory (atomic; see io.save_checkpoint)."""
    from evomerge.io.save import save_checkpoint

    check_layer_compatible({n: m.config for n, m in models.items()})
    a = next(iter(models.values()))
    check_foldable(a.config)
    config = path_config({n: m.config for n, m in models.items()}, path)
    tensors = folded_tensors(models, path)
    if dtype is not None:
        config.dtype = dtype
        tensors = ((n, t.to(dtype) if t.is_floating_point() else t) for n, t in tensors)
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    return save_checkpoint(
        out, tensors, config, tokenizer_from=tokenizer_from, generation_config_from=generation_config_from,
        force=force, extra_files=extra_files, **kwargs)
