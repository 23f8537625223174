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
from evomerge.merge.slices import needs_slices
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
    if needs_slices(data):  # slices, passthrough, tokenizer or chat template settings, model@revision
        return _merge_slices(data, recipe_path, out, device=device, shard_size=shard_size, seed=seed,
                             allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, force=force, log=log)
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
    materializer = Materializer(paths, base, device=device, model_dtype=out_dtype, allow_pickle=allow_pickle,
                                precompiled="use")  # a package a search built; never a build for one merge
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
    from evomerge.worker.folded_export import check_foldable, mergekit_files
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
    config = next(iter(models.values())).config
    write_dataflow_checkpoint(out, models, recipe, paths, dtype=dtype, max_shard_bytes=shard_bytes, force=force,
                              extra_files=mergekit_files(recipe, config.model_type, dtype,
                                                         getattr(config, "layer_types", None)))
    log(f"wrote a {len(recipe.path)}-layer path through {len(models)} sources")
    return _result(out)


def resolve_ref(ref: str, search: list[Path], where: str) -> Path:
    """A recipe's model reference -> its folder. `repo@revision` (mergekit's form) is looked up in the local
    Hugging Face cache at that revision (a branch, tag or commit); a local folder has no revisions (mergekit
    would silently read the folder as it is), so `folder@rev` is refused rather than read unversioned."""
    if "@" not in ref:
        return resolve_model(ref, search, where)
    if ref.count("@") > 1:
        raise RecipeError(f"{where}: model {ref!r} has more than one '@': write REPO@REVISION")
    name, rev = ref.split("@")
    if any((d / name).is_dir() for d in search) or Path(name).expanduser().is_dir():
        raise RecipeError(f"{where}: model {ref!r}: {name} is a local folder, which has no revisions: remove "
                          f"'@{rev}' (or check out that revision into the folder)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=rev, local_files_only=True))
    except Exception:  # noqa: BLE001  (not cached at that revision, or not a repo id: say where it looked)
        raise RecipeError(f"{where}: model {ref!r}: revision {rev!r} of {name} is not in the local Hugging Face "
                          f"cache, and evomerge never downloads: fetch it first (hf download {name} --revision "
                          f"{rev})") from None


def _merge_slices(data: dict, recipe_path: Path, out: Path, *, device: str, shard_size: str | int, seed: int,
                  allow_pickle: bool, allow_nonfinite: bool, force: bool,
                  log: Callable[[str], None]) -> MergeResult:
    """A mergekit recipe with slices (or features only the slice engine has): planned tensor by tensor,
    streamed into a checkpoint with the new layer count (and vocabulary, when a tokenizer is set)."""
    import tempfile

    import yaml
    from transformers import AutoConfig

    from evomerge.io.save import save_checkpoint
    from evomerge.merge.slice_merge import run_jobs
    from evomerge.merge.slices import ModelInfo, parse_slices, plan
    from evomerge.worker.checkpoint_writer import MERGEKIT_FILE
    from evomerge.worker.routed import path_config

    where = str(recipe_path)
    shard_bytes = parse_size(shard_size)
    check_device(device)
    search = [Path.cwd(), recipe_path.resolve().parent]
    paths: dict[str, Path] = {}
    checkpoints: dict[str, Checkpoint] = {}

    def checkpoint(ref: str) -> Checkpoint:
        if ref not in checkpoints:
            paths[ref] = resolve_ref(ref, search, f"{where}: model")
            checkpoints[ref] = Checkpoint.open(paths[ref], allow_pickle=allow_pickle)
        return checkpoints[ref]

    recipe = parse_slices(data, where, lambda ref: checkpoint(ref).num_layers)
    for ref in recipe.weight_models():
        checkpoint(ref)
    for ref in recipe.model_names():  # a tokenizer source may be a folder with a tokenizer only
        paths.setdefault(ref, resolve_ref(ref, search, f"{where}: tokenizer"))
    prepare_output_dir(out, force=force)  # fail before any heavy work
    _refuse_overwrite(out, paths)
    infos = {m: ModelInfo(tuple(ck.tensors), ck.num_layers) for m, ck in checkpoints.items()}
    jobs = plan(recipe, infos, where)

    donor = recipe.donor
    configs = {donor: AutoConfig.from_pretrained(paths[donor])}
    configs.update({s.source: AutoConfig.from_pretrained(paths[s.source]) for s in recipe.path() if s.source != donor})
    config = path_config(configs, recipe.path())  # the donor's, with the new layer count; per-layer keys follow
    out_dtype = TORCH_DTYPES[recipe.output_dtype] if recipe.output_dtype else checkpoints[donor].dtype
    config.dtype = out_dtype
    load_dtype = TORCH_DTYPES[recipe.dtype] if recipe.dtype else None

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_from, vocab = _output_tokenizer(recipe, paths, Path(tmp), where)
        if vocab is not None:
            config.vocab_size = vocab.size
        start = time.perf_counter()
        tensors = run_jobs(jobs, checkpoints, recipe.method, out_dtype=out_dtype, load_dtype=load_dtype, vocab=vocab,
                           seed=seed, device=device, allow_nonfinite=allow_nonfinite, where=where)
        save_checkpoint(out, tensors, config, tokenizer_from=tokenizer_from, generation_config_from=paths[donor],
                        max_shard_bytes=shard_bytes, force=force,
                        extra_files={MERGEKIT_FILE: yaml.safe_dump(recipe.to_mergekit(), sort_keys=False)})
    log(f"merged {len(recipe.slices)} slice(s) with {recipe.method} into {recipe.num_layers} layers in "
        f"{time.perf_counter() - start:.2f} s")
    return _result(out)


def _output_tokenizer(recipe, paths: dict[str, Path], tmp: Path, where: str):
    """(folder to copy the output tokenizer from, the output vocabulary or None). A built tokenizer, or the
    donor's with a chat template, is saved into tmp first."""
    from evomerge.merge.chat_templates import resolve_chat_template
    from evomerge.merge.tokenizer_merge import _load, build_vocabulary

    vocab = None
    if recipe.tokenizer is not None:
        vocab = build_vocabulary(recipe.tokenizer, recipe.donor, recipe.model_names(), paths, where)
        tokenizer = vocab.tokenizer
    elif recipe.chat_template is not None:
        tokenizer = _load(paths[recipe.donor], f"{where}: model {recipe.donor}")
    else:
        return paths[recipe.donor], None
    if recipe.chat_template is not None:
        def own(m):
            try:
                template = _load(paths[m], where).chat_template
            except RecipeError:
                return None
            return template.get("default") if isinstance(template, dict) else template

        text = resolve_chat_template(recipe.chat_template, (own(m) for m in recipe.model_names()), f"{where}")
        if text is not None:
            tokenizer.chat_template = text
    tokenizer.save_pretrained(tmp)
    return tmp, vocab


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
