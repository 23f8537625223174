"""mergekit `slices:` recipes, tokenizer settings and chat templates through `evomerge merge`; and the mergekit
passthrough recipe written next to a data-flow export (no mergekit needed: expectations are built by hand)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from evomerge.errors import RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.merge.chat_templates import NAMED
from evomerge.merge.methods import merge_tensors
from evomerge.merge.slices import parse_slices
from evomerge.testing.tiny import TinySpec, make_family
from evomerge.worker.merge_command import merge_from_yaml

EXTRA = ["<|im_start|>", "zzword"]  # tokens source_1's tokenizer adds (ids 300, 301: rows its embeddings have)
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    family = make_family(tmp_path_factory.mktemp("slices"), TinySpec(arch="llama", layers=4), n_sources=2)
    tok = AutoTokenizer.from_pretrained(family.sources[1])
    tok.add_tokens([EXTRA[0]], special_tokens=True)
    tok.add_tokens([EXTRA[1]])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(family.sources[1])
    return family


def _merge(tmp_path, doc, name="out"):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / name
    merge_from_yaml(path, out, force=True)
    return out, load_file(str(out / "model.safetensors"))


def _t(model, name):
    return Checkpoint.open(model).load(name)


LAYER = "model.layers.{}.{}"
HALF = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]


def test_passthrough_slices_stack_the_named_layers_scaled_where_scale_says(fam, tmp_path):
    a, b = map(str, fam.sources)
    doc = {"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                      {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": HALF}}]},
                      {"sources": [{"model": a, "layer_range": [3, 4], "parameters": {"scale": [0.0, 1.0]}}]}],
           "merge_method": "passthrough"}
    out, got = _merge(tmp_path, doc)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 7
    expected = [(a, 0, {}), (a, 1, {}), (a, 2, {}), (b, 1, "half"), (b, 2, "half"), (b, 3, "half"), (a, 3, "one")]
    suffixes = [n.split("layers.0.", 1)[1] for n in Checkpoint.open(a).tensors if n.startswith("model.layers.0.")]
    for k, (model, layer, how) in enumerate(expected):
        for suffix in suffixes:
            want = _t(model, LAYER.format(layer, suffix))
            if how == "half" and ("o_proj" in suffix or "down_proj" in suffix):
                want = want * 0.5
            # a one-layer slice has t = 1: the gradient [0, 1] gives its last value
            assert torch.equal(got[LAYER.format(k, suffix)], want), (k, suffix)
    # mergekit: embeddings from the first slice's model, final norm and LM head from the last slice's, with the
    # last slice's parameters at t = 0: its scale gradient [0, 1] zeroes them
    assert torch.equal(got["model.embed_tokens.weight"], _t(a, "model.embed_tokens.weight"))
    assert torch.equal(got["lm_head.weight"], _t(a, "lm_head.weight") * 0.0)
    assert torch.equal(got["model.norm.weight"], torch.zeros_like(got["model.norm.weight"]))
    assert not any(f"layers.{k}." in n for n in got for k in range(7, 9))


def test_last_slice_from_another_model_gives_its_norm_and_head(fam, tmp_path):
    a, b = map(str, fam.sources)
    doc = {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                      {"sources": [{"model": b, "layer_range": [2, 4]}]}], "merge_method": "passthrough"}
    _, got = _merge(tmp_path, doc)
    assert torch.equal(got["model.norm.weight"], _t(b, "model.norm.weight"))
    assert torch.equal(got["lm_head.weight"], _t(b, "lm_head.weight"))
    assert torch.equal(got["model.embed_tokens.weight"], _t(a, "model.embed_tokens.weight"))


def test_slices_ties_equals_the_merge_done_range_by_range(fam, tmp_path):
    base, a, b = str(fam.base), *map(str, fam.sources)
    p1 = {"weight": 0.7, "density": 0.5}
    p2 = {"weight": 0.3, "density": 0.8}
    doc = {"slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2], "parameters": p1},
                     {"model": b, "layer_range": [0, 2], "parameters": p2}]},
        {"sources": [{"model": base, "layer_range": [2, 4]}, {"model": a, "layer_range": [2, 4]},
                     {"model": b, "layer_range": [2, 4]}],
         "parameters": {"weight": 0.5, "density": 0.3, "lambda": 1.2}}],
        "merge_method": "ties", "base_model": base, "parameters": {"normalize": True}}
    _, got = _merge(tmp_path, doc)

    def ties(name, params):
        tensors = [_t(a, name), _t(b, name)]
        return merge_tensors("ties", tensors, base=_t(base, name), normalize=True, **params)

    first = {"weight": [0.7, 0.3], "density": [0.5, 0.8]}
    second = {"weight": [0.5, 0.5], "density": [0.3, 0.3], "lambda": 1.2}
    for name, want_params in (("model.layers.1.mlp.up_proj.weight", first),
                              ("model.layers.3.self_attn.q_proj.weight", second),
                              ("model.embed_tokens.weight", first),  # pre-weights: the first slice's parameters
                              ("model.norm.weight", second)):  # post-weights: the last slice's
        assert torch.allclose(got[name], ties(name, want_params), atol=1e-7), name
    assert not torch.allclose(got["model.layers.3.self_attn.q_proj.weight"],
                              ties("model.layers.3.self_attn.q_proj.weight", first))


def test_union_tokenizer_adds_tokens_and_fills_their_rows(fam, tmp_path):
    base, b = str(fam.base), str(fam.sources[1])
    doc = {"models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
           "merge_method": "linear", "tokenizer_source": "union"}
    out, got = _merge(tmp_path, doc)
    tok = AutoTokenizer.from_pretrained(out)
    vocab, own = tok.get_vocab(), AutoTokenizer.from_pretrained(b).get_vocab()
    n_base = len(AutoTokenizer.from_pretrained(base).get_vocab())
    assert all(t in vocab for t in EXTRA) and len(vocab) == n_base + 2
    assert AutoConfig.from_pretrained(out).vocab_size == len(vocab) == got["model.embed_tokens.weight"].shape[0]
    emb_b, emb_base = _t(b, "model.embed_tokens.weight"), _t(base, "model.embed_tokens.weight")
    for t in EXTRA:  # only b has them: its row stands in for the base's missing one, so the mean is b's row
        assert torch.allclose(got["model.embed_tokens.weight"][vocab[t]], emb_b[own[t]], atol=1e-7)
    i = 50  # a token both have (same id in both tokenizers): the mean of their rows
    assert own[next(t for t, j in vocab.items() if j == i)] == i
    assert torch.allclose(got["model.embed_tokens.weight"][i], (emb_b[i] + emb_base[i]) / 2, atol=1e-7)


def test_tokenizer_block_forces_rows_and_pads(fam, tmp_path):
    base, b = str(fam.base), str(fam.sources[1])
    doc = {"models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
           "merge_method": "linear",
           "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                         "tokens": {"zzword": {"source": {"kind": "zero"}, "force": True},
                                    "<|new|>": {"source": {"kind": "model_token", "model": base, "token": "<s>"}}}}}
    out, got = _merge(tmp_path, doc)
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] == 320 and AutoConfig.from_pretrained(out).vocab_size == 320  # 304 tokens padded to 64
    assert torch.equal(emb[vocab["zzword"]], torch.zeros(emb.shape[1]))
    bos = _t(base, "model.embed_tokens.weight")[AutoTokenizer.from_pretrained(base).get_vocab()["<s>"]]
    assert torch.allclose(emb[vocab["<|new|>"]], bos, atol=1e-7)  # no model has it: the configured row
    assert torch.allclose(emb[len(vocab):], emb[: len(vocab)].mean(0).expand(320 - len(vocab), -1), atol=1e-6)


def test_tokenizer_source_base_keeps_only_the_base_tokenizers_rows(fam, tmp_path):
    base, b = str(fam.base), str(fam.sources[1])
    doc = {"merge_method": "linear", "tokenizer_source": "base",
           "models": [{"model": base, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    out, got = _merge(tmp_path, doc)
    n = len(AutoTokenizer.from_pretrained(base).get_vocab())
    assert got["model.embed_tokens.weight"].shape[0] == n == AutoConfig.from_pretrained(out).vocab_size
    assert n < 320  # the models have 320 rows: the rows past the tokenizer are dropped, as mergekit does


@pytest.mark.parametrize("template,expected", [("chatml", NAMED["chatml"]), ("auto", TEMPLATE),
                                               ("{{ 'custom template ' + messages[0]['content'] }}", None)])
def test_chat_template_lands_in_the_output_tokenizer(fam, tmp_path, template, expected):
    a, b = map(str, fam.sources)
    doc = {"merge_method": "linear", "chat_template": template,
           "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    out, _ = _merge(tmp_path, doc)
    assert AutoTokenizer.from_pretrained(out).chat_template == (expected or template)


BAD = [
    ({"modules": {"text": {"models": ["a"]}}, "merge_method": "linear"}, "'modules' is not supported"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}],
      "merge_method": "passthrough"}, "'residual_weight' is not supported"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}], "merge_method": "passthrough",
      "parameters": {"t": [{"pattern": "mlp", "value": 1}]}}, "unknown key 'pattern'"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}],
      "merge_method": "passthrough"}, "passthrough merges exactly 1 model"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
      "merge_method": "linear"}, "same number of layers"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}], "merge_method": "passthrough"},
     r"layer_range must be \[START, END\]"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}],
      "merge_method": "slerp", "base_model": "c", "parameters": {"t": 0.5}}, "base_model c is not among"),
    ({"slices": [{"sources": [{"model": "a+lora", "layer_range": [0, 2]}]}], "merge_method": "passthrough"}, "LoRA"),
    ({"slices": [], "merge_method": "passthrough"}, "non-empty list"),
    ({"models": ["a"], "merge_method": "linear", "tokenizer_source": "base", "tokenizer": {"source": "union"}},
     "not both"),
    ({"models": ["a"], "merge_method": "linear", "tokenizer": {"source": "union", "tokens": {"x": {"force": True}}}},
     "source is missing"),
    ({"models": ["a"], "merge_method": "linear", "tokenizer": {"source": "union", "pad_to": 8}}, "unknown key 'pad_to'"),
]


@pytest.mark.parametrize("doc,message", BAD)
def test_unsupported_or_wrong_keys_are_named(doc, message):
    with pytest.raises(RecipeError, match=message):
        parse_slices(doc, "r.yml", lambda m: 4)


def test_cli_refuses_in_one_line_naming_the_key(fam, tmp_path, capsys):
    from evomerge.cli import main

    cases = [({"modules": {}, "merge_method": "linear"}, "'modules'"),
             ({"slices": [{"sources": [{"model": str(fam.sources[0]), "layer_range": [0, 9]}]}],
               "merge_method": "passthrough"}, "layers 0..3"),
             ({"models": [f"{fam.sources[0]}@v1"], "merge_method": "linear", "parameters": {"weight": 1}},
              "local folder, which has no revisions"),
             ({"models": [str(fam.sources[0])], "merge_method": "linear", "parameters": {"weight": 1},
               "chat_template": "nosuchtemplate"}, "chat_template 'nosuchtemplate'")]
    for i, (doc, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yml"
        path.write_text(yaml.safe_dump(doc))
        assert main(["merge", str(path), "--out", str(tmp_path / f"o{i}")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"o{i}").exists()


def test_dataflow_export_writes_mergekit_yaml_that_rebuilds_it(fam, tmp_path):
    a, b = map(str, fam.sources)
    recipe = {"merge_method": "dataflow", "sources": [{"name": "a", "model": a}, {"name": "b", "model": b}],
              "path": [["a", 0], ["a", 1, 1.5], ["b", 1, 0.8], ["b", 2], ["a", 3, 1.25]]}
    out, exported = _merge(tmp_path, recipe, "dfs")
    text = (out / "mergekit.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "passthrough" and len(doc["slices"]) == 4  # b:1 and b:2 share one scale
    _, again = _merge(tmp_path, doc, "again")  # mergekit semantics, run by evomerge
    assert set(again) == set(exported)
    for name, t in exported.items():
        assert torch.allclose(again[name], t, rtol=1e-6, atol=1e-9), name
    # a path that ends outside model A has no mergekit form: nothing is written
    recipe["path"].append(["b", 3])
    out2, _ = _merge(tmp_path, recipe, "dfs2")
    assert not (out2 / "mergekit.yaml").exists()


def test_revision_reference_reads_that_snapshot_of_the_local_cache(fam, tmp_path):
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(fam.sources[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    doc = {"slices": [{"sources": [{"model": "org/tiny@v1", "layer_range": [1, 3]}]}], "merge_method": "passthrough"}
    path = tmp_path / "rev.yml"
    path.write_text(yaml.safe_dump(doc))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(path), "--out", str(tmp_path / "o")],
                       check=False, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], _t(fam.sources[0], "model.layers.1.mlp.up_proj.weight"))
    doc["slices"][0]["sources"][0]["model"] = "org/tiny@v2"  # a revision the cache does not hold
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(path), "--out", str(tmp_path / "o2")],
                       check=False, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "revision 'v2' of org/tiny is not in the local Hugging Face cache" in r.stderr


def test_written_mergekit_config_parses_back_to_the_same_recipe(fam, tmp_path):
    a, b = map(str, fam.sources)
    doc = {"slices": [{"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.8]}},
                                   {"model": b, "layer_range": [1, 3], "parameters": {"weight": 0.5}}],
                       "parameters": {"normalize": False}}],
           "merge_method": "linear", "dtype": "float32", "chat_template": "chatml",
           "tokenizer": {"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}, "force": True}}}}
    recipe = parse_slices(doc, "r", lambda m: 4)
    out, _ = _merge(tmp_path, doc)
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert parse_slices(written, "w", lambda m: 4) == recipe


@pytest.mark.parametrize("method,params", [("dare_ties", {"weight": 0.6, "density": 0.5}),
                                           ("della", {"weight": 0.5, "density": 0.5, "epsilon": 0.1})])
def test_slice_engine_gives_the_whole_model_engines_weights(fam, tmp_path, method, params):
    # a chat template sends a models: recipe through the slice engine; the weights must not change (seeded
    # methods included: both engines seed each tensor by its name)
    base, a, b = str(fam.base), *map(str, fam.sources)
    doc = {"models": [{"model": a, "parameters": params}, {"model": b, "parameters": params}],
           "merge_method": method, "base_model": base}
    _, whole = _merge(tmp_path, doc, "whole")
    _, sliced = _merge(tmp_path, {**doc, "chat_template": "chatml"}, "sliced")
    assert set(whole) == set(sliced)
    for name, t in whole.items():
        assert torch.allclose(sliced[name], t, atol=1e-7), name
