from __future__ import annotations

import pytest
import torch

from evomerge.errors import RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.merge.methods import merge_tensors
from evomerge.merge.recipe import Recipe, layer_position
from evomerge.worker.materializer import Materializer


def _sources(fam):
    return {"base": fam.base, **{f"s{i}": p for i, p in enumerate(fam.sources)}}


RECIPE_A = Recipe.build(
    "ties",
    {"s0": {"weight": [0.2, 1.0], "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]},
     "s1": {"weight": 0.5, "density": 0.6}, "s2": {"weight": 0.3, "density": 0.5}},
    base_model="base",
)
RECIPE_B = Recipe.build("dare_ties", {"s0": {"weight": 0.6}, "s1": {"weight": 0.4}}, base_model="base", parameters={"density": 0.5})


@pytest.fixture(scope="module")
def materializer(llama):
    return Materializer(_sources(llama), "base")


def test_a_then_b_then_a_is_bit_identical_to_a_fresh_materializer(materializer, llama):
    a1 = materializer.merged_state_dict(RECIPE_A)
    b = materializer.merged_state_dict(RECIPE_B, seed=5)
    a2 = materializer.merged_state_dict(RECIPE_A)
    fresh = Materializer(_sources(llama), "base").merged_state_dict(RECIPE_A)
    assert any(not torch.equal(a1[n], b[n]) for n in a1)
    for n in a1:
        assert torch.equal(a1[n], a2[n]) and torch.equal(a1[n], fresh[n]), n


def test_writes_into_the_same_live_model(materializer):
    model = materializer.materialize(RECIPE_A)
    ptr = model.model.layers[0].mlp.up_proj.weight.data_ptr()
    again = materializer.materialize(RECIPE_B, seed=1)
    assert again is model and model.model.layers[0].mlp.up_proj.weight.data_ptr() == ptr
    with torch.no_grad():
        logits = model(torch.tensor([[1, 4, 7]])).logits
    assert torch.isfinite(logits).all()


def test_every_tensor_equals_the_reference_merge_of_the_raw_tensors(materializer, llama):
    merged = materializer.merged_state_dict(RECIPE_A)
    cks = {k: Checkpoint.open(v) for k, v in _sources(llama).items()}
    for name in merged:
        kw = RECIPE_A.resolve(name, layer_position(name, cks["base"].num_layers))
        ref = merge_tensors("ties", [cks[m].load(name) for m in ("s0", "s1", "s2")], base=cks["base"].load(name),
                            weight=kw["weight"], density=kw["density"])
        assert torch.allclose(merged[name], ref, atol=1e-6), name


def test_same_seed_same_weights_and_another_seed_differs(materializer):
    a = materializer.merged_state_dict(RECIPE_B, seed=11)
    b = materializer.merged_state_dict(RECIPE_B, seed=11)
    c = materializer.merged_state_dict(RECIPE_B, seed=12)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_bf16_sources_merge_in_float32_into_a_bf16_model(qwen2_bf16):
    m = Materializer(_sources(qwen2_bf16), "base")
    recipe = Recipe.build("linear", {"s0": {"weight": 1.0}, "s1": {"weight": 1.0}})
    merged = m.merged_state_dict(recipe)
    cks = [Checkpoint.open(p) for p in qwen2_bf16.sources]
    name = "model.layers.0.self_attn.q_proj.bias"
    expect = ((cks[0].load(name).float() + cks[1].load(name).float()) / 2).bfloat16()
    assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], expect)


def test_tied_embeddings_stay_tied(gpt2_tied):
    m = Materializer(_sources(gpt2_tied), "base")
    model = m.materialize(Recipe.build("task_arithmetic", {"s0": {"weight": 0.5}, "s1": {"weight": 0.5}}, base_model="base"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_recipe_must_use_the_loaded_sources(materializer):
    with pytest.raises(RecipeError, match="not one of the loaded sources"):
        materializer.materialize(Recipe.build("linear", {"elsewhere": {"weight": 1.0}}))
    with pytest.raises(RecipeError, match="differs from the materializer's base"):
        materializer.materialize(Recipe.build("ties", {"s0": {"weight": 1.0}}, base_model="s1"))


@pytest.mark.parametrize("family", ["llama", "qwen2_bf16", "gpt2_tied"])
def test_live_model_holding_a_source_computes_what_transformers_loads(family, request):
    """The live model (built without random init, written in place) is a faithful model: with one
    source's weights in it, its logits equal those of the source loaded by transformers."""
    from transformers import AutoModelForCausalLM

    fam = request.getfixturevalue(family)
    m = Materializer(_sources(fam), "base")
    live = m.materialize(Recipe.build("linear", {"s1": {"weight": 1.0}}))
    loaded = AutoModelForCausalLM.from_pretrained(fam.sources[1]).eval()
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        assert torch.equal(live(ids).logits, loaded(ids).logits)


def test_plain_tensors_equal_the_live_model_without_building_it(llama):
    m = Materializer(_sources(llama), "base")
    plain = {n: t.clone() for n, t in m.merged_tensors(RECIPE_B, seed=4).items()}
    assert m._model is None  # a one-shot merge never builds (or imports) a transformers model
    live = m.merged_state_dict(RECIPE_B, seed=4)
    assert plain.keys() == live.keys() and all(torch.equal(plain[n], live[n]) for n in plain)
