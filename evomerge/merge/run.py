"""`evomerge merge`: a recipe file in, a Hugging Face checkpoint out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from evomerge.errors import EvomergeError, RecipeError
from evomerge.io import parse_size, prepare_output_dir, save_checkpoint
from evomerge.io.paths import resolve_model
from evomerge.merge.ps import TORCH_DTYPES, Materializer
from evomerge.merge.recipe import Recipe


@dataclass(frozen=True)
class MergeResult:
    out: Path
    n_tensors: int
    nbytes: int
    n_shards: int


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return dev


def load_recipe(path: Path) -> Recipe:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return Recipe.from_mergekit(data, where=str(path))


def merge_from_yaml(
    recipe_path: Path,
    out: Path,
    *,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    seed: int = 0,
    allow_pickle: bool = False,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> MergeResult:
    recipe = load_recipe(recipe_path)
    shard_bytes = parse_size(shard_size)
    check_device(device)
    prepare_output_dir(out, force=force)  # fail before any heavy work
    search = [Path.cwd(), recipe_path.resolve().parent]
    paths = {name: resolve_model(name, search, f"{recipe_path}: model") for name in recipe.model_names()}
    tokenizer_dir = resolve_model(recipe.tokenizer_model(), search, f"{recipe_path}: tokenizer_source")
    target = out.resolve()
    for name, path in {**paths, "tokenizer_source": tokenizer_dir}.items():
        if target == path or target in path.parents:
            raise EvomergeError(f"--out {out} would overwrite model {name} ({path}): choose another output directory")
    base = recipe.base_model or recipe.models[0].model

    start = time.perf_counter()
    out_dtype = TORCH_DTYPES[recipe.output_dtype] if recipe.output_dtype else None
    materializer = Materializer(paths, base, device=device, model_dtype=out_dtype, allow_pickle=allow_pickle)
    log(f"loaded {len(paths)} models onto {device} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    tensors = list(materializer.merged_tensors(recipe, seed=seed).items())
    log(f"merged with {recipe.method} in {time.perf_counter() - start:.2f} s")

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(paths[base])
    config.dtype = materializer.model_dtype
    save_checkpoint(
        out, tensors, config,
        tokenizer_from=tokenizer_dir, generation_config_from=paths[base],
        max_shard_bytes=shard_bytes, force=force,
        extra_files={"mergekit_config.yml": yaml.safe_dump(recipe.to_mergekit(), sort_keys=False)},
    )
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    n_shards = len(list(out.glob("*.safetensors")))
    return MergeResult(out, len(tensors), nbytes, n_shards)
