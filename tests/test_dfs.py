"""Data-flow merges: routed models over shared layers, and their export as standard checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import IncompatibleModelsError, RecipeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.merge.dataflow_recipe import parse_dataflow
from evomerge.merge.layer_path import LayerPool, LayerRef, PathStep, apply_scales, cumulative_scales, decode_slots
from evomerge.testing.tiny import TinySpec, make_family, save_model
from evomerge.worker.folded_export import export_path
from evomerge.worker.routed import build_routed_model, layers_of, load_models

# Tiny random models have residual streams of size ~0.02, where a norm's eps is not negligible (a stream
# scaled by c sees eps/c^2); real models' streams are O(1). A tiny eps keeps the folding test about the
# folding: DESIGN.md measured 9e-5 with eps=1e-6 on the same kind of model.
EPS = 1e-10


def _models(family, dtype=torch.float32):
    return load_models({"a": family.sources[0], "b": family.sources[1]}, dtype=dtype)


@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory):
    family = make_family(tmp_path_factory.mktemp("dfs_llama"), TinySpec(arch="llama", norm_eps=EPS), n_sources=2)
    return family, _models(family)


@pytest.fixture(scope="module")
def gpt2_pool(tmp_path_factory):
    family = make_family(tmp_path_factory.mktemp("dfs_gpt2"), TinySpec(arch="gpt2", norm_eps=EPS), n_sources=2)
    return family, _models(family)


@pytest.fixture(params=["llama", "gpt2"])
def pool(request, llama_pool, gpt2_pool):
    return {"llama": llama_pool, "gpt2": gpt2_pool}[request.param]


# repeats (b:1 twice), cross-model transitions, non-unit scales including the first layer's
TWISTED = [PathStep("a", 0, 1.3), PathStep("b", 1, 1.5), PathStep("b", 1, 0.8), PathStep("a", 2, 1.9),
           PathStep("b", 3, 0.7), PathStep("a", 3, 1.2)]


def _inputs(seed=0, batch=3, length=12, vocab=300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row: the attention mask must reach every routed layer
    return ids, mask


@torch.no_grad()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def test_export_equals_routed_model(pool, tmp_path):
    family, models = pool
    routed = build_routed_model(models, TWISTED)
    out = export_path(models, TWISTED, tmp_path / "out", tokenizer_from=family.sources[0])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == len(TWISTED)
    ids, mask = _inputs()
    diff = (_logits(routed, ids, mask) - _logits(exported, ids, mask)).abs().max().item()
    assert diff <= 1e-4
    # the scales matter: the same layers unscaled give other logits
    plain = build_routed_model(models, [PathStep(s.source, s.layer) for s in TWISTED])
    assert (_logits(plain, ids, mask) - _logits(exported, ids, mask)).abs().max().item() > 1e-3


def test_identity_path_reproduces_model_a(pool, tmp_path):
    family, models = pool
    n = len(layers_of(models["a"])[1])
    identity = [PathStep("a", i) for i in range(n)]
    ids, mask = _inputs(1)
    assert torch.equal(_logits(build_routed_model(models, identity), ids, mask), _logits(models["a"], ids, mask))
    out = export_path(models, identity, tmp_path / "out", tokenizer_from=family.sources[0])
    original, exported = Checkpoint.open(family.sources[0]), Checkpoint.open(out)
    assert set(exported.tensors) == set(original.tensors)
    assert all(torch.equal(original.load(n), exported.load(n)) for n in original.tensors)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(family.sources[0]).get_vocab()


def test_unit_scales_equal_a_plain_layer_stack(llama_pool):
    """What mergekit's passthrough builds: the layers' tensors copied into a deeper model, nothing else changed."""
    family, models = llama_pool
    path = [PathStep("a", 0), PathStep("b", 2), PathStep("b", 2), PathStep("a", 1), PathStep("b", 3)]
    files = {s: load_file(str(Path(p) / "model.safetensors")) for s, p in zip("ab", family.sources)}
    state = {k: v for k, v in files["a"].items() if ".layers." not in k}
    for k, step in enumerate(path):
        head = f"model.layers.{step.layer}."
        state.update({f"model.layers.{k}." + n[len(head):]: t for n, t in files[step.source].items()
                      if n.startswith(head)})
    config = models["a"].config.__class__.from_pretrained(family.sources[0], num_hidden_layers=len(path))
    stack = AutoModelForCausalLM.from_config(config).eval()
    stack.load_state_dict(state, strict=True)
    ids, mask = _inputs(2)
    assert torch.equal(_logits(build_routed_model(models, path), ids, mask), _logits(stack, ids, mask))


def test_routed_model_shares_the_sources_storage(llama_pool):
    _, models = llama_pool
    routed = build_routed_model(models, TWISTED)
    source_ptrs = {t.data_ptr() for m in models.values() for t in (*m.parameters(), *m.buffers())}
    routed_tensors = [*routed.parameters(), *routed.buffers()]
    assert routed_tensors and all(t.data_ptr() in source_ptrs for t in routed_tensors)
    # the repeated layer is one module, not two copies
    layers = layers_of(routed)[1]
    assert layers[1].layer is layers[2].layer is layers_of(models["b"])[1][1]


def test_generation_with_kv_cache_matches_without(llama_pool):
    _, models = llama_pool
    routed = build_routed_model(models, TWISTED)
    ids = torch.randint(4, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = routed.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = routed.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # the source models' own layer indices are left as they were
    assert [layer.self_attn.layer_idx for layer in layers_of(models["b"])[1]] == [0, 1, 2, 3]


def test_per_layer_config_follows_the_layer(tmp_path):
    """Qwen2 with sliding-window attention on its upper layers: layer types move with the layers."""
    import transformers

    family = make_family(tmp_path / "fam", TinySpec(arch="llama"), n_sources=0)
    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, use_sliding_window=True, sliding_window=3,
        max_window_layers=2, rms_norm_eps=EPS, pad_token_id=3,
    )
    config._attn_implementation = "eager"
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        paths[name] = save_model(model, tmp_path / name, tmp_path / "fam" / "tokenizer")
    models = load_models(paths)
    path = [PathStep("b", 3, 1.4), PathStep("a", 0), PathStep("a", 2, 0.6), PathStep("b", 1)]
    out = export_path(models, path, tmp_path / "out", tokenizer_from=paths["a"])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    ids, mask = _inputs(4, length=10)  # longer than the window, so the window matters
    diff = (_logits(build_routed_model(models, path), ids, mask) - _logits(exported, ids, mask)).abs().max()
    assert diff.item() <= 1e-4
    del family


# -- paths and genomes (pure) ---------------------------------------------------------------------------
POOL = LayerPool({"a": 2, "b": 3})


def test_slots_decode_in_order_with_repeats_and_pins():
    on = [False] * 10
    for t in (1, 2, 6, 9):  # pool = a0 a1 b0 b1 b2, twice
        on[t] = True
    assert decode_slots(POOL, on, repeats=2) == [LayerRef("a", 1), LayerRef("b", 0), LayerRef("a", 1), LayerRef("b", 2)]
    pinned = decode_slots(POOL, on, repeats=2, pin_ends=True)
    assert pinned[0] == LayerRef("a", 0) and pinned[-1] == LayerRef("a", 1) and len(pinned) == 6
    with pytest.raises(RecipeError, match="expected 10 indicators"):
        decode_slots(POOL, on[:-1], repeats=2)


def test_scale_forms_index_the_pool():
    layers = [LayerRef("a", 0), LayerRef("b", 2), LayerRef("a", 1)]
    per_layer = apply_scales(POOL, layers, "per_layer", [1, 2, 3, 4, 5])
    assert [s.scale for s in per_layer] == [1.0, 5.0, 2.0]  # the first layer's input is never scaled
    matrix = [[10 * i + j for j in range(5)] for i in range(5)]
    assert [s.scale for s in apply_scales(POOL, layers, "matrix", matrix)] == [1.0, 4.0, 41.0]
    assert cumulative_scales([PathStep("a", 0, 2.0), PathStep("a", 1, 0.5), PathStep("a", 0, 3.0)]) == [2.0, 1.0, 3.0]


def test_genome_form_parses_to_the_explicit_path():
    doc = {"merge_method": "dataflow", "sources": [{"model": "x/a"}, {"model": "y/b"}],
           "slots": {"repeats": 2, "on": [2, 4, 7]}, "pin_ends": True,
           "scales": {"form": "per_layer", "values": [1.0, 1.1, 1.2, 1.3, 1.4]}}
    recipe = parse_dataflow(doc, "r.yml", lambda s: {"a": 2, "b": 3}[s.name])
    assert [(p.source, p.layer, p.scale) for p in recipe.path] == [
        ("a", 0, 1.0), ("b", 0, 1.2), ("b", 2, 1.4), ("b", 0, 1.2), ("a", 1, 1.1)]
    again = parse_dataflow(recipe.to_dict(), "again", lambda s: {"a": 2, "b": 3}[s.name])
    assert again == recipe


# -- lm-eval scores a routed model in memory ------------------------------------------------------------
TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_scores_a_routed_model_in_memory(llama_pool, tmp_path):
    import json

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    family, models = llama_pool
    rows = [{"question": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}", f" {a + b - 10}"], "answer": 0}
            for a, b in [(12, 34), (20, 7), (31, 15), (9, 40), (22, 22), (17, 25)]]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny.yaml").write_text(TASK_YAML.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tokenizer = AutoTokenizer.from_pretrained(family.sources[0])

    def loglikelihoods(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8)
        out = simple_evaluate(model=lm, tasks=["tiny_choice"], task_manager=tasks, log_samples=True,
                              verbosity="ERROR")
        samples = sorted(out["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
        assert "acc,none" in out["results"]["tiny_choice"] and len(samples) == len(rows)
        return torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples])

    n = len(layers_of(models["a"])[1])
    identity = build_routed_model(models, [PathStep("a", i) for i in range(n)])
    assert torch.allclose(loglikelihoods(identity), loglikelihoods(models["a"]), atol=1e-5)
    assert not torch.allclose(loglikelihoods(build_routed_model(models, TWISTED)), loglikelihoods(models["a"]),
                              atol=1e-3)


# -- recipes through the CLI ----------------------------------------------------------------------------
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _write(tmp_path, doc, name="recipe.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
def test_cli_merges_a_hybrid_recipe(llama_pool, tmp_path):
    """A TIES merge joins the pool; the exported model equals the routed model built in memory."""
    from evomerge.merge.dataflow_recipe import parse_sources
    from evomerge.worker.routed import load_pool

    family, _ = llama_pool
    a, b = map(str, family.sources)
    doc = {"merge_method": "dataflow",
           "sources": [{"model": a, "name": "a"}, {"model": b, "name": "b"},
                       {"name": "mix", "merge": {"merge_method": "ties", "base_model": str(family.base),
                                                 "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                                                            {"model": b, "parameters": {"weight": 0.7, "density": 0.5}}]}}],
           "path": [["a", 0], ["mix", 1, 1.3], ["b", 1, 0.9], ["mix", 2], ["a", 3, 1.1]]}
    result = _cli("merge", _write(tmp_path, doc), "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (tmp_path / "out" / "evomerge_recipe.yml").is_file()

    recipe = parse_dataflow(doc, "doc", lambda s: 4)
    paths = {r: Path(r) for r in (a, b, str(family.base))}
    models, materializers = load_pool(parse_sources(doc, "doc"), paths, dtype=torch.float32)
    assert set(materializers) == {"mix"}
    ids, mask = _inputs(5)
    diff = (_logits(build_routed_model(models, recipe.path), ids, mask) - _logits(exported, ids, mask)).abs().max()
    assert diff.item() <= 1e-4


def test_cli_genome_form_equals_explicit_form(llama_pool, tmp_path):
    from evomerge.cli import main

    family, _ = llama_pool
    sources = [{"model": str(family.sources[0]), "name": "a"}, {"model": str(family.sources[1]), "name": "b"}]
    genome = {"merge_method": "dataflow", "sources": sources, "slots": {"repeats": 1, "on": [1, 5, 6]},
              "pin_ends": True, "scales": {"form": "per_layer", "values": [1, 1.1, 1.2, 1.3, 0.9, 0.8, 0.7, 1.5]}}
    explicit = {"merge_method": "dataflow", "sources": sources,
                "path": [["a", 0], ["a", 1, 1.1], ["b", 1, 0.8], ["b", 2, 0.7], ["a", 3, 1.3]]}
    for name, doc in (("genome", genome), ("explicit", explicit)):
        assert main(["merge", str(_write(tmp_path, doc, f"{name}.yml")), "--out", str(tmp_path / name)]) == 0
    g, e = Checkpoint.open(tmp_path / "genome"), Checkpoint.open(tmp_path / "explicit")
    assert set(g.tensors) == set(e.tensors) and g.config["num_hidden_layers"] == 5
    assert all(torch.equal(g.load(n), e.load(n)) for n in g.tensors)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """A wider Llama (hidden 48) and an OLMo-2 (post-norms: no exact folding rule), beside llama_pool's."""
    import transformers

    root = tmp_path_factory.mktemp("odd")
    family = make_family(root / "wide", TinySpec(arch="llama", hidden=48), n_sources=1)
    config = transformers.Olmo2Config(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, pad_token_id=3)
    torch.manual_seed(0)
    olmo = save_model(AutoModelForCausalLM.from_config(config), root / "olmo", root / "wide" / "tokenizer")
    return {"wide": family.sources[0], "olmo": olmo}


def _bad_cases(llama_pool, odd_models):
    family, _ = llama_pool
    a, b = ({"model": str(p), "name": n} for p, n in zip(family.sources, "ab"))
    base = {"merge_method": "dataflow", "sources": [a, b]}
    return {
        "empty path": ({**base, "path": []}, "path is empty"),
        "path over the limit": ({**base, "path": [["a", 0]] * 5, "max_layers": 4}, "over max_layers 4"),
        "different hidden sizes": ({**base, "sources": [a, {"model": str(odd_models["wide"]), "name": "w"}],
                                    "path": [["a", 0]]}, "hidden size"),
        "architecture that cannot be exported": ({"merge_method": "dataflow", "sources": [str(odd_models["olmo"])],
                                                  "path": [["olmo", 0], ["olmo", 1]]}, "cannot export a olmo2 path"),
        "unknown source": ({**base, "path": [["c", 0]]}, "unknown source 'c'"),
        "layer out of range": ({**base, "path": [["b", 4]]}, "layers 0..3"),
        "zero scale": ({**base, "path": [["a", 0], ["b", 1, 0]]}, "finite non-zero"),
        "both forms": ({**base, "path": [["a", 0]], "slots": {"on": [0]}}, "either 'path' or the genome form"),
        "slot out of range": ({**base, "slots": {"on": [8]}}, "slot indices in 0..7"),
        "duplicate names": ({**base, "sources": [a, a], "path": [["a", 0]]}, "used twice"),
        "typo": ({**base, "path": [["a", 0]], "max_layer": 3}, "unknown key 'max_layer'"),
    }


def test_bad_dataflow_recipes_fail_in_one_line(llama_pool, odd_models, tmp_path, capsys):
    from evomerge.cli import main

    for i, (case, (doc, message)) in enumerate(_bad_cases(llama_pool, odd_models).items()):
        out = tmp_path / f"out{i}"
        assert main(["merge", str(_write(tmp_path, doc, f"bad{i}.yml")), "--out", str(out)]) == 2, case
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evomerge: error:"), (case, lines)
        assert message in lines[0], (case, lines[0])
        assert not out.exists(), case


@pytest.mark.slow
def test_bad_dataflow_recipe_exits_2_from_the_shell(llama_pool, odd_models, tmp_path):
    doc, message = _bad_cases(llama_pool, odd_models)["different hidden sizes"]
    result = _cli("merge", _write(tmp_path, doc), "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_incompatible_sources_are_refused_in_process(llama_pool, odd_models):
    _, models = llama_pool
    wide = load_models({"w": odd_models["wide"]})
    with pytest.raises(IncompatibleModelsError, match="hidden size 48"):
        build_routed_model({"a": models["a"], **wide}, [PathStep("a", 0)])
    olmo = load_models({"o": odd_models["olmo"]})
    routed = build_routed_model(olmo, [PathStep("o", 1), PathStep("o", 0, 1.5)])  # routing works; export does not
    assert routed(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 320)
    with pytest.raises(IncompatibleModelsError, match="olmo2"):
        export_path(olmo, [PathStep("o", 0)], Path("/nonexistent/never-written"), tokenizer_from=None)

