from __future__ import annotations

import pytest
import yaml

from evomerge.errors import RecipeError
from evomerge.merge.recipe import Recipe, evaluate, layer_position

TIES_YAML = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.2, 0.8, 0.4]
      density:
        - filter: self_attn
          value: 0.3
        - filter: mlp
          value: [0.5, 0.9]
        - value: 0.7
  - model: b
    parameters: {density: 0.6}
  - model: base
parameters:
  weight: 0.1
  normalize: false
  lambda: 1.5
dtype: bfloat16
tokenizer_source: base
"""


def test_gradients_interpolate_over_layers_like_mergekit():
    # mergekit: [0.2, 0.8, 0.4] on 2 layers gives layer 0 -> 0.2, layer 1 -> 0.4, embeddings (t = 0) -> 0.2
    assert layer_position("model.layers.0.mlp.up_proj.weight", 2) == 0.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 2) == 1.0
    assert layer_position("model.embed_tokens.weight", 2) == 0.0
    assert layer_position("transformer.h.3.attn.c_attn.weight", 5) == 0.75
    assert evaluate((0.2, 0.8, 0.4), 0.0) == 0.2
    assert evaluate((0.2, 0.8, 0.4), 1.0) == 0.4
    assert evaluate((0.2, 0.8, 0.4), 0.25) == pytest.approx(0.5)
    assert evaluate((0.0, 1.0), 1 / 3) == pytest.approx(1 / 3)


def test_resolve_applies_filters_first_match_then_fallbacks():
    r = Recipe.from_mergekit(yaml.safe_load(TIES_YAML))
    assert [e.model for e in r.inputs()] == ["a", "b"]  # the base is not a task vector
    kw = r.resolve("model.layers.1.self_attn.q_proj.weight", 0.5)
    assert kw["weight"] == pytest.approx([0.8, 0.1])  # b falls back to the top-level weight
    assert kw["density"] == [0.3, 0.6]
    assert kw["lam"] == 1.5 and kw["normalize"] is False
    kw = r.resolve("model.layers.3.mlp.down_proj.weight", 1.0)
    assert kw["density"] == [0.9, 0.6]
    assert r.resolve("model.norm.weight", 0.0)["density"] == [0.7, 0.6]
    assert r.output_dtype == "bfloat16" and r.tokenizer_model() == "base"


def test_round_trip_through_mergekit_yaml():
    r = Recipe.from_mergekit(yaml.safe_load(TIES_YAML))
    doc = r.to_mergekit()
    assert Recipe.from_mergekit(yaml.safe_load(yaml.safe_dump(doc))) == r
    assert doc["models"][0]["parameters"]["density"][1] == {"filter": "mlp", "value": [0.5, 0.9]}


def test_recipes_built_in_code_equal_parsed_ones():
    built = Recipe.build(
        "ties",
        {"a": {"weight": [0.2, 0.8, 0.4], "density": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.5, 0.9]}, {"value": 0.7}]},
         "b": {"density": 0.6}, "base": {}},
        base_model="base", parameters={"weight": 0.1, "normalize": False, "lambda": 1.5},
        dtype="bfloat16", tokenizer_source="base",
    )
    assert built == Recipe.from_mergekit(yaml.safe_load(TIES_YAML))


def test_linear_counts_the_base_model_as_a_weighted_input():
    r = Recipe.build("linear", {"a": {"weight": 1.0}}, base_model="base", parameters={"weight": 3.0})
    assert [e.model for e in r.inputs()] == ["a", "base"]
    assert r.resolve("x", 0)["weight"] == [1.0, 3.0]


BAD = [
    ({"merge_method": "tie", "base_model": "b", "models": ["a"]}, "did you mean 'ties'"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "paramters": {}}, "unknown key 'paramters'"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "slices": []}, "'slices' is not supported"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "density": 1.5}}]},
     r"models\[0\].parameters.density: 1.5 is outside \[0, 1\]"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "density": [0.5, -0.1]}}]},
     "outside"),
    ({"merge_method": "slerp", "base_model": "b", "models": ["a", "c", "b"], "parameters": {"t": 0.5}},
     "slerp merges exactly 1 model"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"]}, "model a has no 'weight'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "normalize": True}}]},
     "move it to the top-level parameters"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "t": 0.5}}]},
     "ties has no parameter 't'"),
    ({"merge_method": "slerp", "base_model": "b", "models": ["a"]}, "needs parameter 't'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": "high"}}]}, "expected a number"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"weight": 1}, "dtype": "int4"}, "dtype: 'int4'"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a+lora"], "parameters": {"weight": 1}}, "LoRA"),
    ({"merge_method": "model_stock", "base_model": "b", "models": ["a"]}, "at least 2"),
    ({"merge_method": "ties", "base_model": "b", "models": [], "parameters": {"weight": 1}}, "non-empty list"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"weight": 1}, "tokenizer_source": "union"}, "union"),
    ({"merge_method": "dataflow", "models": ["a"]}, "dataflow is not a parameter-space merge"),  # in the catalogue, but no tensor merge
    ({"merge_method": "linear", "models": ["a"], "parameters": {"weight": 1}, "out_path": "x"}, "'out_path' is not supported"),
    ({"merge_method": "linear", "models": ["a"], "parameters": {"weight": 1}, "modules": {}}, "'modules' is not supported"),
]


@pytest.mark.parametrize("doc,message", BAD)
def test_invalid_recipes_name_the_problem(doc, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_mergekit(doc)
