from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.errors import CheckpointError, IncompatibleModelsError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compat import check_compatible
from evomerge.io.save import save_checkpoint
from evomerge.testing.tiny import TinySpec, make_family


def _hf_state(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.state_dict()


@pytest.mark.parametrize("family", ["llama", "qwen2_bf16", "gpt2_tied"])
def test_reads_every_tensor_as_transformers_does(family, request):
    fam = request.getfixturevalue(family)
    ck = Checkpoint.open(fam.sources[0])
    hf = _hf_state(fam.sources[0])
    tensors = dict(ck.iter_tensors())
    assert tensors.keys() == ck.tensors.keys()
    for name, t in tensors.items():
        assert name in hf, name
        assert t.dtype == hf[name].dtype and torch.equal(t, hf[name]), name


def test_sharded_checkpoint_is_read_through_its_index(llama):
    ck = Checkpoint.open(llama.base)
    assert (llama.base / "model.safetensors.index.json").is_file()
    assert len({m.file for m in ck.tensors.values()}) > 1
    assert ck.dtype == torch.float32


def test_headers_alone_give_the_inventory_of_a_sharded_checkpoint(llama, tmp_path):
    """The torch-free header reader (preflight) agrees with the loader on names and shapes, across shards."""
    from evomerge.io.headers import inventory

    ck = Checkpoint.open(llama.base)
    names = inventory(llama.base)
    assert {n: shape for n, (_, shape) in names.items()} == {n: m.shape for n, m in ck.tensors.items()}
    assert {dtype for dtype, _ in names.values()} == {"F32"}
    assert inventory(tmp_path) is None  # no safetensors: nothing to compare
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        inventory(tmp_path)


def test_dtypes_are_reported(qwen2_bf16, gpt2_tied):
    assert Checkpoint.open(qwen2_bf16.base).dtype == torch.bfloat16
    assert Checkpoint.open(gpt2_tied.base).dtype == torch.float16


def test_missing_shard_and_missing_config_are_named(llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama.base, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Checkpoint.open(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")


def test_pickled_weights_need_opt_in(qwen2_bf16, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(qwen2_bf16.base / "config.json", src)
    state = dict(Checkpoint.open(qwen2_bf16.base).iter_tensors())
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint.open(src)
    ck = Checkpoint.open(src, allow_pickle=True)
    assert ck.pickled
    for name, t in ck.iter_tensors():
        assert torch.equal(t, state[name])


def test_incompatible_sources_list_the_first_mismatches(llama, tmp_path):
    wider = make_family(tmp_path / "wide", TinySpec(arch="llama", hidden=48, heads=4, kv_heads=2), n_sources=0)
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([Checkpoint.open(llama.base), Checkpoint.open(wider.base)])
    msg = str(err.value)
    assert "model.embed_tokens.weight has shape [320, 32]" in msg and "[320, 48]" in msg
    assert str(wider.base) in msg and "more)" in msg
    other_arch = make_family(tmp_path / "gpt2", TinySpec(arch="gpt2"), n_sources=0)
    with pytest.raises(IncompatibleModelsError, match="architecture LlamaForCausalLM .* vs GPT2LMHeadModel"):
        check_compatible([Checkpoint.open(llama.base), Checkpoint.open(other_arch.base)])


@pytest.mark.parametrize("family", ["llama", "gpt2_tied"])
def test_saved_checkpoint_loads_with_plain_transformers(family, request, tmp_path):
    fam = request.getfixturevalue(family)
    ck = Checkpoint.open(fam.sources[1])
    config = AutoConfig.from_pretrained(fam.sources[1])
    out = save_checkpoint(tmp_path / "out", ck.iter_tensors(), config, tokenizer_from=fam.sources[1],
                          generation_config_from=fam.sources[1], max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".out.partial-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # made to be shared: not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}

    ids = torch.tensor([[1, 5, 9, 2]])
    original = AutoModelForCausalLM.from_pretrained(fam.sources[1]).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, reloaded(ids).logits)


def test_save_refuses_a_non_empty_directory_and_keeps_it(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    ck = Checkpoint.open(llama.base)
    with pytest.raises(Exception, match="not empty"):
        save_checkpoint(out, ck.iter_tensors(), AutoConfig.from_pretrained(llama.base))
    assert (out / "keep.txt").read_text() == "finished work"


def test_a_failed_save_leaves_nothing_behind(llama, tmp_path):
    def tensors():
        yield from Checkpoint.open(llama.base).iter_tensors(list(Checkpoint.open(llama.base).tensors)[:3])
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "out", tensors(), AutoConfig.from_pretrained(llama.base), max_shard_bytes=1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2,
                                   torch.float8_e4m3fn])
def test_the_torch_free_scan_counts_nan_and_inf_as_torch_does(dtype, tmp_path):
    """The driver reads a float's bits with numpy (no bf16 dtype there); torch.isfinite is the reference."""
    from safetensors.torch import save_file

    from evomerge.io.finite_scan import nonfinite_tensors

    g = torch.Generator().manual_seed(0)
    poisoned = (torch.randn(300, 70, generator=g) * 1e3).clamp(-400, 400)
    hit = torch.rand(poisoned.shape, generator=g) < 0.01
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
    poisoned[hit] = specials[torch.randint(0, 3, (int(hit.sum()),), generator=g)]
    poisoned = poisoned.to(dtype)
    extreme = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny, 0.0, -0.0],
                           dtype=torch.float64)
    save_file({"poisoned": poisoned, "extreme": extreme.to(dtype), "ints": torch.full((9,), -1, dtype=torch.int16),
               "clean": torch.randn(64, generator=g).to(dtype)}, tmp_path / "model.safetensors")
    expected = int((~torch.isfinite(poisoned.float())).sum())
    assert expected > 50  # (float8_e4m3fn has no inf: it keeps only the NaNs)
    assert nonfinite_tensors(tmp_path) == [(tmp_path / "model.safetensors", "poisoned", expected)]


def test_the_scan_reads_every_shard_of_an_index(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from evomerge.io.finite_scan import nonfinite_tensors

    model = tmp_path / "m"
    shutil.copytree(llama.sources[0], model)
    assert nonfinite_tensors(model) == []
    last = max(model.glob("*.safetensors"))
    tensors = load_file(last)
    name = max(tensors)
    tensors[name].view(-1)[-1] = float("nan")
    save_file(tensors, last, metadata={"format": "pt"})
    assert nonfinite_tensors(model) == [(last, name, 1)]


def test_a_shard_missing_from_its_index_is_named_by_the_loader_and_the_header_readers(llama, tmp_path):
    from evomerge.io.finite_scan import nonfinite_tensors
    from evomerge.io.headers import inventory

    model = tmp_path / "m"
    shutil.copytree(llama.sources[0], model)
    gone = sorted(model.glob("*.safetensors"))[2]
    gone.unlink()
    for read in (Checkpoint.open, inventory, nonfinite_tensors):
        with pytest.raises(CheckpointError, match=f"shard {gone.name} listed in .*index.json is missing from {model}"):
            read(model)
    (model / "model.safetensors.index.json").write_text("[1, 2]")
    for read in (Checkpoint.open, inventory):
        with pytest.raises(CheckpointError, match="is not a valid index: expected a JSON object with 'weight_map'"):
            read(model)
