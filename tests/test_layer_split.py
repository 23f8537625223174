"""worker/layer_split.py: one worker's model split by layers over several devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evomerge.config import RunConfig
from evomerge.worker.layer_split import LayerSplit, inputs_to, place, worker_devices


def test_balanced_split_gives_the_first_device_fewer_layers_for_the_embeddings():
    split = LayerSplit.balanced(["cpu", "meta"], [10] * 8, rest_bytes=20)  # 100 bytes: 50 per device
    assert split.starts == (0, 3)  # 20 + 3 x 10 on the first, 5 x 10 on the second
    assert [split.device_of_layer(i).type for i in range(8)] == ["cpu"] * 3 + ["meta"] * 5
    assert split.device_of("model.layers.2.mlp.up_proj.weight").type == "cpu"
    assert split.device_of("model.layers.3.mlp.up_proj.weight").type == "meta"
    assert split.device_of("lm_head.weight").type == "cpu" and split.device_of("model.norm.weight").type == "cpu"
    assert LayerSplit.balanced(["cpu"] * 4, [10] * 8, 0).starts == (0, 2, 4, 6)
    assert LayerSplit.balanced(["cpu"] * 3, [10] * 2, 100).starts == (0, 1)  # a device per layer at most


def test_for_checkpoint_counts_each_layers_tensors():
    sizes = {"model.embed_tokens.weight": 40, **{f"model.layers.{i}.w": 10 for i in range(6)}}
    assert LayerSplit.for_checkpoint(["cpu", "cpu"], sizes, 6).starts == (0, 1)


def test_the_hook_moves_nested_inputs_to_the_modules_device():
    class Add(nn.Module):
        def forward(self, x, pair, *, scale):
            return x + pair[0] * scale["s"]

    m = Add()
    args = (torch.ones(2), (torch.ones(2), 3))
    with pytest.raises(RuntimeError):
        m(*args, scale={"s": torch.ones(2, device="meta")})  # cpu and meta tensors do not mix
    inputs_to(m, torch.device("meta"))
    out = m(*args, scale={"s": torch.ones(2)})
    assert out.device.type == "meta" and out.shape == (2,)


def test_place_keeps_tied_weights_and_the_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.testing.tiny import TinySpec, make_family

    make_family(tmp_path, TinySpec(arch="llama"), n_sources=0, seed=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
        place(model, LayerSplit.balanced(["cpu", "cpu"], [1] * len(model.model.layers), 1))
        after = model(ids).logits
    assert torch.equal(before, after)
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)
    assert len(model.model.norm._forward_pre_hooks) == 1 and len(model.lm_head._forward_pre_hooks) == 1


def test_worker_devices():
    assert worker_devices("cpu", 4) is None
    assert worker_devices("cuda", 1) is None
    if torch.cuda.device_count() < 2:
        with pytest.raises(RuntimeError, match="workers.gpus_per_worker is 2"):
            worker_devices("cuda", 2)


def test_gpus_per_worker_above_one_must_be_whole():
    base = {"name": "t", "sources": {"models": {"a": "a", "b": "b"}}, "search_space": "ps_task_arithmetic",
            "fitness": {"calibration": "c.json", "task_paths": ["t"]}, "objectives": [{"task": "x"}]}
    RunConfig.model_validate({**base, "workers": {"gpus_per_worker": 0.5}})
    RunConfig.model_validate({**base, "workers": {"gpus_per_worker": 2}})
    with pytest.raises(Exception, match="gpus_per_worker"):
        RunConfig.model_validate({**base, "workers": {"gpus_per_worker": 2.5}})
