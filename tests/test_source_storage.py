"""Sources held in their storage dtype, on the device or the host, with or without selection caches: the merged
weights are the same bits in every mode, for every parameter-space method, and equal to the reference merge of
the raw tensors (task vectors formed in float32)."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.io.checkpoint import Checkpoint
from evomerge.merge import fused
from evomerge.merge.fused import out_of_memory
from evomerge.merge.methods import merge_tensors
from evomerge.merge.recipe import Recipe, layer_position
from evomerge.merge.specs import METHODS, TENSOR
from evomerge.seeds import derive_seed
from evomerge.worker.materializer import Materializer
from evomerge.worker.source_store import SourceStore
from evomerge.worker.sources import model_around

TENSOR_METHODS = sorted(n for n in METHODS if METHODS[n].kind == TENSOR)
# (storage dtype, placement, selection cache) besides the reference (auto, device, cache on)
MODES = [("float32", "device", True), ("auto", "host", True), ("auto", "device", False), ("float32", "host", False)]


@pytest.fixture(autouse=True)
def _stage_on_cpu(monkeypatch):
    """Host placement on a CPU reads the host tensors in place; here it copies them into staging slots, as on a
    GPU, so the staging code runs (test_host_placement_on_a_cpu_stages_nothing checks the plain CPU path)."""
    monkeypatch.setattr(SourceStore, "STAGE_ON_CPU", True)


def _value(p, i: int):
    """A valid value of parameter p for the i-th model: inside its bounds and away from them."""
    if p.is_bool:
        return bool(p.default)
    if p.name == "weight":
        return (0.6, 0.4)[i]
    if p.name == "density":
        return (0.5, 0.7)[i]
    lo, hi = p.low if p.low is not None else 0.0, p.high if p.high is not None else 1.0
    if p.default is not None and lo < p.default < hi:
        return p.default
    return lo + (hi - lo) * (0.3, 0.4)[i]


def _recipe(method: str) -> Recipe:
    spec = METHODS[method]
    models = ["s0", "s1"][: spec.max_models or 2]
    per_model = {m: {p.name: _value(p, i) for p in spec.params if p.per_model} for i, m in enumerate(models)}
    shared = {p.name: _value(p, 0) for p in spec.params if not p.per_model}
    return Recipe.build(method, per_model, base_model="base" if spec.needs_base else None, parameters=shared)


def _sources(fam):
    return {"base": fam.base, **{f"s{i}": p for i, p in enumerate(fam.sources[:2])}}


@pytest.mark.parametrize("method", TENSOR_METHODS)
def test_every_mode_writes_the_same_bits_for_every_method(qwen2_bf16, method):
    recipe = _recipe(method)
    reference = Materializer(_sources(qwen2_bf16), "base", selection_cache=True).merged_state_dict(recipe, seed=3)
    for dtype, placement, cache in MODES:
        m = Materializer(_sources(qwen2_bf16), "base", storage_dtype=dtype, placement=placement, selection_cache=cache)
        merged = m.merged_state_dict(recipe, seed=3)
        for name, t in reference.items():
            assert torch.equal(merged[name], t), (method, dtype, placement, cache, name)


@pytest.mark.parametrize("method", TENSOR_METHODS)
def test_host_placement_merging_large_tensors_piece_by_piece_writes_the_same_bits(qwen2_bf16, method):
    """Pieces of 4096 entries: the embeddings and head (320 x 32) come in three, the last one short; ties at
    magnitude cuts carry from piece to piece, rescale measures the whole tensor first. Methods that cannot
    go piece by piece merge whole tensors, as before."""
    recipe = _recipe(method)
    reference = Materializer(_sources(qwen2_bf16), "base", selection_cache=True).merged_state_dict(recipe, seed=3)
    m = Materializer(_sources(qwen2_bf16), "base", placement="host")
    m.piece_entries = 4096
    pieces = [i for i in m._items(recipe) if not isinstance(i, str)]
    spec = METHODS[method]
    assert bool(pieces) == (spec.elementwise or spec.piecewise), method
    if spec.piecewise and recipe.resolve(pieces[0].name, 0.0).get("rescale"):
        assert any(p.measure for p in pieces) and not all(p.measure for p in pieces)
    merged = m.merged_state_dict(recipe, seed=3)
    for name, t in reference.items():
        assert torch.equal(merged[name], t), (method, name)
    if pieces:  # the device holds staging and scratch for a piece
        largest_whole = max(math.prod(t.shape) for n, t in m.reference.tensors.items()
                            if n not in {p.name for p in pieces})
        assert m.store.device_bytes() <= 2 * 3 * max(4096, largest_whole) * 2


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_host_placement_on_a_cpu_stages_nothing(qwen2_bf16, monkeypatch, method):
    """The device is the host: nothing is copied, large tensors still go by pieces (scratch of a piece), except
    for methods that rescale, which would pay a measuring pass per tensor for it: they merge whole tensors."""
    monkeypatch.setattr(SourceStore, "STAGE_ON_CPU", False)
    recipe = _recipe(method)
    rescales = bool(recipe.resolve("model.embed_tokens.weight", 0.0).get("rescale"))
    assert rescales == (method == "dare_linear")
    reference = Materializer(_sources(qwen2_bf16), "base").merged_state_dict(recipe, seed=3)
    m = Materializer(_sources(qwen2_bf16), "base", placement="host")
    m.piece_entries = 4096
    pieces = [i for i in m._items(recipe) if not isinstance(i, str)]
    assert not any(p.measure for p in pieces) and bool(pieces) != rescales
    merged = m.merged_state_dict(recipe, seed=3)
    assert all(torch.equal(merged[n], t) for n, t in reference.items())
    assert m.store.device_bytes() == 0
    widest = max(b.numel() for b in m.workspace._bufs.values())
    assert (widest > 4096) == rescales  # scratch of whole tensors only where it rescales, else of a piece


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della"])
def test_pieces_write_the_same_bits_with_the_fused_kernel(qwen2_bf16, method):
    recipe = _recipe(method)
    whole = Materializer(_sources(qwen2_bf16), "base", fused=True, placement="host")
    whole.piece_entries = 1 << 30
    pieces = Materializer(_sources(qwen2_bf16), "base", fused=True, placement="host")
    pieces.piece_entries = 4096
    reference, merged = whole.merged_state_dict(recipe, seed=5), pieces.merged_state_dict(recipe, seed=5)
    for name, t in reference.items():
        assert torch.equal(merged[name], t), (method, name)
    assert "combine" in fused._compiled and not fused._broken
    if method == "della":  # rescaled pieces: their norms come from a measuring pass with the compiled chunk sums
        assert "kept_l1" in fused._compiled


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_the_compiled_weighted_sum_writes_the_eager_bits(qwen2_bf16, method):
    """linear (normalized) and task arithmetic as one compiled pass over the sources as stored: the eager ops'
    bits (their fused multiply-adds: the kernel is compiled with floating-point contraction), for one and two
    fine-tunes, bf16 and float32 sources, whole tensors and pieces (host placement, staged)."""
    two = _recipe(method)
    one = Recipe.build(method, {"s0": {"weight": 0.7}}, base_model=two.base_model)
    for recipe in (one, two):
        reference = Materializer(_sources(qwen2_bf16), "base").merged_state_dict(recipe)
        for dtype, placement in [("auto", "device"), ("float32", "device"), ("auto", "host")]:
            m = Materializer(_sources(qwen2_bf16), "base", fused=True, storage_dtype=dtype, placement=placement)
            m.piece_entries = 4096
            merged = m.merged_state_dict(recipe)
            assert "weighted_sum" in fused._compiled and not fused._broken  # compiled, not the eager fallback
            for name, t in reference.items():
                assert torch.equal(merged[name], t), (method, len(recipe.models), dtype, placement, name)


def test_without_a_compiler_the_weighted_sum_falls_back_to_the_eager_ops(qwen2_bf16, monkeypatch):
    """Where the compiled kernels are unavailable (no C++ compiler, say), a fused materializer merges linear and
    task arithmetic with the eager ops, bit for bit as an eager one does."""
    monkeypatch.setattr(fused, "_broken", True)
    recipe = _recipe("task_arithmetic")
    reference = Materializer(_sources(qwen2_bf16), "base").merged_state_dict(recipe)
    m = Materializer(_sources(qwen2_bf16), "base", fused=True)
    merged = m.merged_state_dict(recipe)
    assert all(torch.equal(merged[n], t) for n, t in reference.items())
    assert m.workspace.nbytes() > 0  # the eager path's scratch: it is what ran


@pytest.mark.parametrize("method", sorted(n for n in TENSOR_METHODS if METHODS[n].elementwise))
def test_elementwise_methods_merged_in_blocks_write_the_same_bits(qwen2_bf16, method):
    """Blocks of 1000 entries (so most tensors span several, and most end in a partial block) against whole
    tensors, for bf16 sources and their float32 copies."""
    assert {"linear", "task_arithmetic"} <= {n for n in TENSOR_METHODS if METHODS[n].elementwise}
    recipe = _recipe(method)
    for dtype in ("auto", "float32"):
        whole = Materializer(_sources(qwen2_bf16), "base", storage_dtype=dtype)
        whole.block_entries = None
        blocks = Materializer(_sources(qwen2_bf16), "base", storage_dtype=dtype)
        blocks.block_entries = 1000
        reference, merged = whole.merged_state_dict(recipe), blocks.merged_state_dict(recipe)
        assert sum(t.numel() > 1000 for t in merged.values()) >= 3  # blocks were used
        assert blocks.workspace.nbytes() < whole.workspace.nbytes()
        for name, t in reference.items():
            assert torch.equal(merged[name], t), (method, dtype, name)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della", "slerp", "linear"])
def test_bf16_sources_merge_to_the_reference_of_the_raw_tensors(qwen2_bf16, method):
    """The bf16 sources are never widened in memory, yet the result is that of float32 task vectors."""
    recipe = _recipe(method)
    m = Materializer(_sources(qwen2_bf16), "base", placement="host", selection_cache=False)
    assert m.store.dtype == torch.bfloat16
    merged = m.merged_state_dict(recipe, seed=3)
    cks = {k: Checkpoint.open(v) for k, v in _sources(qwen2_bf16).items()}
    inputs = [e.model for e in recipe.inputs()]
    for name in cks["base"].tensors:
        if not cks["base"].tensors[name].dtype.is_floating_point:
            continue
        kw = recipe.resolve(name, layer_position(name, cks["base"].num_layers))
        if METHODS[method].random:
            kw["seed"] = derive_seed(3, name)
        fn_args = {k: v for k, v in kw.items()}
        ref = merge_tensors(method, [cks[x].load(name) for x in inputs], base=cks["base"].load(name), **fn_args)
        assert torch.equal(merged[name], ref.to(torch.bfloat16)), name


def test_sources_are_held_in_the_storage_dtype_and_host_placement_keeps_them_off_the_device(qwen2_bf16, llama):
    bf16 = Materializer(_sources(qwen2_bf16), "base")
    bf16.merged_state_dict(_recipe("ties"))
    stored = sum(t.nbytes for p in _sources(qwen2_bf16).values() for t in Checkpoint.open(p).tensors.values())
    assert bf16.store.held_bytes() == stored  # 2 bytes a parameter: no fp32 copies of base or task vectors
    widened = Materializer(_sources(llama), "base", storage_dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in widened.store.tensors("base").values() if t.dtype.is_floating_point)
    host = Materializer(_sources(qwen2_bf16), "base", placement="host")
    host.merged_state_dict(_recipe("ties"))
    largest = max(math.prod(t.shape) for t in Checkpoint.open(qwen2_bf16.base).tensors.values())
    # on the device: two staging slots of the largest tensor per source, not the sources
    assert host.store.device_bytes() == 2 * 3 * largest * 2


def test_caches_are_built_only_where_on(llama):
    on = Materializer(_sources(llama), "base", selection_cache=True)
    off = Materializer(_sources(llama), "base", selection_cache=False)
    for m in (on, off):
        m.merged_state_dict(_recipe("ties"))
    assert on.cache_bytes() > 0 and off.cache_bytes() == 0
    assert Materializer(_sources(llama), "base").selection_cache  # CPU default: on


def test_a_source_model_is_built_around_the_stores_tensors(llama):
    from transformers import AutoModelForCausalLM

    store = SourceStore({"a": Checkpoint.open(llama.sources[0])})
    model = model_around(llama.sources[0], store.tensors("a"), torch.device("cpu"), store.dtype)
    held = {t.data_ptr() for t in store.tensors("a").values()}
    assert all(p.data_ptr() in held for p in model.parameters())  # no second copy of the weights
    ids = torch.tensor([[1, 5, 9, 2]])
    loaded = AutoModelForCausalLM.from_pretrained(llama.sources[0]).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_out_of_memory_is_recognized_however_it_is_wrapped():
    try:
        torch.empty(1 << 50)  # a real allocation failure of the CPU allocator
    except RuntimeError as e:
        failure = e
    assert out_of_memory(failure)
    wrapped = RuntimeError("compiled kernel failed")
    wrapped.__cause__ = failure
    assert out_of_memory(wrapped)
    assert not out_of_memory(RuntimeError("InductorError: C++ compile error"))
