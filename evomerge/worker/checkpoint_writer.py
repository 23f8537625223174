"""Write merged models as Hugging Face checkpoints: a parameter-space merge's tensors with its mergekit YAML, or a
data-flow path through live pool models with its scales folded in and its evomerge recipe."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.io.save import save_checkpoint
from evomerge.merge.dataflow_recipe import DataflowRecipe
from evomerge.merge.recipe import Recipe

MERGEKIT_FILE = "mergekit_config.yml"  # a parameter-space recipe, as mergekit reads it
RECIPE_FILE = "evomerge_recipe.yml"  # a data-flow or hybrid recipe (mergekit has no data-flow merges)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return dev


def write_ps_checkpoint(out: Path, tensors, recipe: Recipe, paths: dict[str, Path], *, dtype: torch.dtype,
                        max_shard_bytes: int, force: bool, extra_files: dict[str, str] | None = None) -> Path:
    """Write merged tensors (name, tensor) of a parameter-space recipe as a checkpoint (atomic), with config and
    generation config of the recipe's base (else first) model, its tokenizer, and the recipe as mergekit YAML.
    paths: every model reference of the recipe -> its directory."""
    from transformers import AutoConfig

    base = paths[recipe.base_model or recipe.models[0].model]
    config = AutoConfig.from_pretrained(base)
    config.dtype = dtype
    return save_checkpoint(
        out, tensors, config,
        tokenizer_from=paths[recipe.tokenizer_model()], generation_config_from=base,
        max_shard_bytes=max_shard_bytes, force=force,
        extra_files={MERGEKIT_FILE: yaml.safe_dump(recipe.to_mergekit(), sort_keys=False), **(extra_files or {})},
    )


def write_dataflow_checkpoint(out: Path, models: dict[str, torch.nn.Module], recipe: DataflowRecipe,
                              paths: dict[str, Path], *, dtype: torch.dtype, max_shard_bytes: int, force: bool,
                              extra_files: dict[str, str] | None = None) -> Path:
    """Write a data-flow (or hybrid) recipe's path through live pool models (pool name -> model) as a standard
    checkpoint with its scales folded in (atomic), with model A's tokenizer and generation config, and the
    recipe as evomerge_recipe.yml. paths: every model reference of the recipe -> its directory."""
    from evomerge.worker.folded_export import export_path

    a = recipe.model_a
    home = paths[a.model] if a.model else paths[a.merge.base_model or a.merge.models[0].model]
    tokenizer = paths[a.model] if a.model else paths[a.merge.tokenizer_model()]
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
    return export_path(
        models, recipe.path, out, tokenizer_from=tokenizer, generation_config_from=home, dtype=dtype,
        max_shard_bytes=max_shard_bytes, force=force, extra_files={RECIPE_FILE: text, **(extra_files or {})},
    )
