"""`evomerge merge`: a recipe file in, a Hugging Face checkpoint out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import EvomergeError, RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.documents import read_yaml
from evomerge.io.paths import resolve_model
from evomerge.io.save import parse_size, prepare_output_dir
from evomerge.merge.dataflow_recipe import is_dataflow
from evomerge.merge.recipe import Recipe
from evomerge.worker.checkpoint_writer import check_device, write_dataflow_checkpoint, write_ps_checkpoint
from evomerge.worker.finite import nonfinite_names
from evomerge.worker.materializer import TORCH_DTYPES, Materializer


@dataclass(frozen=True)
class MergeResult:
    out: Path
    n_tensors: int
    nbytes: int
    n_shards: int


def _refuse_overwrite(out: Path, models: dict[str, Path]) -> None:
    target = out.resolve()
    for name, path in models.items():
        if target == path or target in path.parents:
            raise EvomergeError(f"--out {out} would overwrite model {name} ({path}): choose another output directory")


def merge_from_yaml(
    recipe_path: Path,
    out: Path,
    *,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    seed: int = 0,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> MergeResult:
    data = read_yaml(recipe_path, RecipeError, "recipe file")
    if is_dataflow(data):
        return _merge_dataflow(data, recipe_path, out, device=device, shard_size=shard_size, seed=seed,
                               allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, force=force, log=log)
    recipe = Recipe.from_mergekit(data, where=str(recipe_path))
    shard_bytes = parse_size(shard_size)
    check_device(device)
    prepare_output_dir(out, force=force)  # fail before any heavy work
    search = [Path.cwd(), recipe_path.resolve().parent]
    paths = {name: resolve_model(name, search, f"{recipe_path}: model") for name in recipe.model_names()}
    tokenizer_dir = resolve_model(recipe.tokenizer_model(), search, f"{recipe_path}: tokenizer_source")
    _refuse_overwrite(out, {**paths, "tokenizer_source": tokenizer_dir})
    base = recipe.base_model or recipe.models[0].model

    start = time.perf_counter()
    out_dtype = TORCH_DTYPES[recipe.output_dtype] if recipe.output_dtype else None
    materializer = Materializer(paths, base, device=device, model_dtype=out_dtype, allow_pickle=allow_pickle)
    log(f"loaded {len(paths)} models onto {device} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    try:
        tensors = list(materializer.merged_tensors(recipe, seed=seed).items())
    except RecipeError as e:  # a parameter that fails on one tensor (weights summing to 0, ...): name the file too
        raise RecipeError(f"{recipe_path}: {e}") from None
    log(f"merged with {recipe.method} in {time.perf_counter() - start:.2f} s")
    if not allow_nonfinite:
        _refuse_nonfinite(tensors, paths, str(recipe_path), allow_pickle)

    write_ps_checkpoint(out, tensors, recipe, {**paths, recipe.tokenizer_model(): tokenizer_dir},
                        dtype=materializer.model_dtype, max_shard_bytes=shard_bytes, force=force)
    return _result(out)


def _result(out: Path) -> MergeResult:
    ck = Checkpoint.open(out)
    nbytes = sum(m.nbytes for m in ck.tensors.values())
    return MergeResult(out, len(ck.tensors), nbytes, len(list(out.glob("*.safetensors"))))


def _merge_dataflow(data: dict, recipe_path: Path, out: Path, *, device: str, shard_size: str | int, seed: int,
                    allow_pickle: bool, allow_nonfinite: bool, force: bool,
                    log: Callable[[str], None]) -> MergeResult:
    """A data-flow or hybrid recipe: load the pool, fold the path's scales, write a standard checkpoint."""
    from transformers import AutoConfig

    from evomerge.merge.dataflow_recipe import parse_dataflow, parse_sources
    from evomerge.worker.folded_export import check_foldable
    from evomerge.worker.routed import check_layer_compatible, load_pool, num_layers

    where = str(recipe_path)
    shard_bytes = parse_size(shard_size)
    check_device(device)
    sources = parse_sources(data, where)
    search = [Path.cwd(), recipe_path.resolve().parent]
    refs = [r for s in sources for r in ([s.model] if s.model else [*s.merge.model_names(), s.merge.tokenizer_model()])]
    paths = {r: resolve_model(r, search, f"{where}: model") for r in dict.fromkeys(refs)}
    # a merge source has its base model's architecture and tokenizer
    home = {s.name: paths[s.model] if s.model else paths[s.merge.base_model or s.merge.models[0].model]
            for s in sources}
    configs = {name: AutoConfig.from_pretrained(p) for name, p in home.items()}
    check_layer_compatible(configs)  # before any weights are read
    recipe = parse_dataflow(data, where, lambda s: num_layers(configs[s.name]))
    check_foldable(configs[recipe.model_a.name])
    prepare_output_dir(out, force=force)
    _refuse_overwrite(out, paths)

    a = recipe.model_a
    dtype = TORCH_DTYPES[recipe.dtype] if recipe.dtype else Checkpoint.open(home[a.name]).dtype
    start = time.perf_counter()
    models, _ = load_pool(sources, paths, device=device, dtype=dtype, seed=seed, allow_pickle=allow_pickle)
    log(f"loaded {len(models)} pool sources onto {device} in {time.perf_counter() - start:.1f} s")
    if not allow_nonfinite:
        for name, model in models.items():
            _refuse_nonfinite(list(model.state_dict().items()), paths, where, allow_pickle, made_by=f"pool source {name}")
    write_dataflow_checkpoint(out, models, recipe, paths, dtype=dtype, max_shard_bytes=shard_bytes, force=force)
    log(f"wrote a {len(recipe.path)}-layer path through {len(models)} sources")
    return _result(out)


def _refuse_nonfinite(tensors, paths: dict[str, Path], where: str, allow_pickle: bool,
                      made_by: str = "the merge") -> None:
    """Never write NaN/inf without a word: name the first non-finite tensor and the source tensors it came from
    (model, file, count). A pass over the output; the sources are read again only when something is wrong."""
    tensors = dict(tensors)
    bad = nonfinite_names(tensors.items())
    if not bad:
        return
    name = bad[0]
    count = int((~torch.isfinite(tensors[name])).sum())
    culprits = []
    for model, path in paths.items():
        ck = Checkpoint.open(path, allow_pickle=allow_pickle)
        if name in ck.tensors:
            n = int((~torch.isfinite(ck.load(name))).sum())
            if n:
                culprits.append(f"{model} ({ck.tensors[name].file.name}: {n} non-finite)")
    origin = f"from {', '.join(culprits)}" if culprits else f"made by {made_by}"
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    raise EvomergeError(f"{where}: tensor {name} holds {count} NaN/inf values{more}, {origin}: fix or drop that "
                        "model, or pass --allow-nonfinite to write them anyway")
