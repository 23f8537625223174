"""worker/evaluator.py: one worker's Evaluator on real tiny models, real lm-eval tasks and a real calibration."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.genome import SearchSpace
from evomerge.search.candidates import Candidate, EvalResult
from evomerge.testing.tasks import write_choice_tasks
from evomerge.testing.tiny import TinySpec, make_family
from evomerge.worker.evaluator import Evaluator
from evomerge.worker.finite import all_finite

TASKS = {"e_add": 30, "e_pairs": 24}
N_ANCHORS = 6
SOURCES = {"a": "models/source_0", "b": "models/source_1"}
BASE = "models/base"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_family(root / "models", TinySpec(arch="llama"), n_sources=2, seed=3, task_scale=0.05)
    write_choice_tasks(root / "tasks", TASKS)
    calib = {"models": SOURCES, "base_model": BASE, "tasks": list(TASKS), "task_paths": ["tasks"],
             "reference_merges": 3, "anchors": N_ANCHORS, "seed": 1, "out": "calibration.json"}
    (root / "calibrate.yaml").write_text(yaml.safe_dump(calib))
    assert main(["calibrate", str(root / "calibrate.yaml")]) == 0
    config = RunConfig.model_validate({
        "name": "t", "sources": {"models": SOURCES, "base_model": BASE}, "search_space": "ps_task_arithmetic",
        "fitness": {"calibration": "calibration.json", "task_paths": ["tasks"], "batch_size": 8},
        "objectives": [{"task": "e_add"}, {"task": "e_pairs"}, {"cost": "params"}], "seed": 0})
    return root, config


@pytest.fixture(scope="module")
def evaluator(setup):
    root, config = setup
    counts = {"materializer": 0, "load_models": 0}
    from evomerge.worker import materializer as ps
    from evomerge.worker import routed as dfs

    real_mat, real_load = ps.Materializer, dfs.load_models

    class Counting(real_mat):
        def __init__(self, *a, **kw):
            counts["materializer"] += 1
            super().__init__(*a, **kw)

    def load_models(*a, **kw):
        counts["load_models"] += 1
        return real_load(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ps, "Materializer", Counting)
        mp.setattr("evomerge.worker.routed.load_models", load_models)
        ev = Evaluator(config, root, worker="w0", node="n0")
        ev.counts = counts
        yield ev


def _space(preset: str, ev: Evaluator) -> SearchSpace:
    return SearchSpace.load(preset, sources=SOURCES, base_model=BASE)


def _candidate(preset: str, ev: Evaluator, key: str, *, seed: int = 7, pick: int = 0, x=None) -> Candidate:
    space = _space(preset, ev)
    counts = ev.layer_counts()
    if x is None:
        x = space.initial(counts)[pick]
    return Candidate(key, 0, 0, [float(v) for v in x], space.decode(x, counts), seed)


def _same(r1: EvalResult, r2: EvalResult) -> bool:
    return dataclasses.replace(r1, timings={}) == dataclasses.replace(r2, timings={})


def _check_ok(r: EvalResult, ev: Evaluator) -> None:
    assert r.status == "ok", r.error
    assert r.error is None and r.worker == "w0" and r.node == "n0"
    assert set(r.responses) == set(TASKS) == set(r.estimates)
    for task in TASKS:
        assert list(r.responses[task]) == ev.calibration.anchors(task)  # the anchors only, in anchor order
        assert set(r.responses[task].values()) <= {0, 1}
        assert {"anchor_mean", "pirt", "gpirt", "mpirt", "gmpirt"} <= set(r.estimates[task])
        assert all(0.0 <= v <= 1.0 for v in r.estimates[task].values())
    assert {"materialize", "check", "score", "forward", "estimate", "total"} <= set(r.timings)
    assert 0 < r.timings["forward"] < r.timings["score"] < r.timings["total"]  # forward calls happen inside scoring
    pickle.loads(pickle.dumps(r))  # plain data


def test_all_finite():
    assert all_finite([torch.ones(3), torch.zeros(2, 2), torch.arange(3)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])
    assert not all_finite([torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)])
    assert all_finite([torch.full((100_000,), 60_000.0, dtype=torch.float16)])  # no fp16 overflow in the sum
    assert all_finite([torch.full((1000,), 1e37)])  # the sum overflows, the entries are finite


@pytest.mark.slow
def test_ps_candidate_is_scored_on_the_anchors_and_reproducible(evaluator):
    ev = evaluator
    assert ev.layer_counts() == {"a": 4, "b": 4}
    cand = _candidate("ps_task_arithmetic", ev, "ps0")
    pickle.loads(pickle.dumps(cand))
    r = ev.evaluate(cand)
    _check_ok(r, ev)
    assert r.costs["path_length"] == 0
    assert r.costs["params"] == sum(p.numel() for p in ev.materializer.model.parameters())
    again = ev.evaluate(cand)
    assert _same(r, again)
    other = ev.evaluate(_candidate("ps_task_arithmetic", ev, "ps1", pick=1))  # source a alone: other weights
    assert other.status == "ok"


@pytest.mark.slow
def test_dfs_and_hybrid_candidates(evaluator):
    ev = evaluator
    space = _space("dfs_paths", ev)
    counts = ev.layer_counts()
    x = space.initial(counts)[0].copy()  # model a's own 4 layers in order; then add b's layer 1 (slot 5)
    x[5] = 0.9
    cand = Candidate("dfs0", 1, 0, x.tolist(), space.decode(x, counts), 3)
    path = cand.recipe["path"]
    assert len(path) == 5 and ["b", 1] in [p[:2] for p in path]
    r = ev.evaluate(cand)
    _check_ok(r, ev)
    assert r.costs["path_length"] == 5
    a = ev._source_model(SOURCES["a"])
    per_layer = sum(p.numel() for p in a.model.layers[0].parameters())
    assert r.costs["params"] == sum(p.numel() for p in a.parameters()) + per_layer  # one layer more than a
    assert _same(r, ev.evaluate(cand))

    hyb = _candidate("hybrid", ev, "hyb0", pick=1)  # the ties merge's own path
    assert any(s.get("name") == "ps_merge" for s in hyb.recipe["sources"])
    assert "ps_merge" in {p[0] for p in hyb.recipe["path"]}  # pinned ends: a's first and last layers frame it
    r = ev.evaluate(hyb)
    _check_ok(r, ev)
    assert r.costs["path_length"] == 4
    assert _same(r, ev.evaluate(hyb))


@pytest.mark.slow
def test_failures_are_results_and_the_next_candidate_is_fine(evaluator):
    ev = evaluator
    good = _candidate("ps_task_arithmetic", ev, "good")
    ok = ev.evaluate(good)
    assert ok.status == "ok"
    # weights summing to 0 with normalize: refused by the method (a failure, with its message)
    zero = Candidate("zero", 0, 1, [], {"merge_method": "linear", "models": [
        {"model": SOURCES["a"], "parameters": {"weight": 1.0}},
        {"model": SOURCES["b"], "parameters": {"weight": -1.0}}], "parameters": {"normalize": True}}, 0)
    r = ev.evaluate(zero)
    assert r.status == "failed" and r.error.startswith("RecipeError: ") and "sum to 0" in r.error
    # huge weights overflow float32 (norm weights near 1: 3e38 + 3e38 = inf), in many tensors
    nan = Candidate("nan", 0, 2, [], {"merge_method": "linear", "models": [
        {"model": SOURCES["a"], "parameters": {"weight": 3e38}},
        {"model": SOURCES["b"], "parameters": {"weight": 3e38}}], "parameters": {"normalize": False}}, 0)
    r = ev.evaluate(nan)
    assert r.status == "failed" and "NaN or inf" in r.error and "\n" not in r.error, r
    assert r.responses == {} and r.estimates == {} and {"materialize", "check", "total"} <= set(r.timings)
    # overflow in one tensor only
    one = [{"filter": "layers.2.post_attention_layernorm", "value": 3e38}, {"value": 0.5}]  # others: 0.5 + 0.5
    inf = Candidate("inf", 0, 3, [], {"merge_method": "linear", "models": [
        {"model": SOURCES["a"], "parameters": {"weight": one}}, {"model": SOURCES["b"], "parameters": {"weight": one}}],
        "parameters": {"normalize": False}}, 0)
    r = ev.evaluate(inf)
    assert r.status == "failed" and r.error.startswith("NonFiniteError: "), r
    assert _same(ev.evaluate(good), ok)  # the live model is fully rewritten: no trace of the failures

    unknown = Candidate("unk", 0, 3, [], {"merge_method": "linear", "models": [{"model": "models/nope"}]}, 0)
    r = ev.evaluate(unknown)
    assert r.status == "failed" and r.error.startswith("RecipeError: ") and "models/nope" in r.error
    broken = [Candidate("b1", 0, 4, [], {"merge_method": "no_such_method", "models": []}, 0),
              Candidate("b2", 0, 5, [], {"merge_method": "dataflow", "sources": [{"model": SOURCES["a"], "name": "a"}],
                                         "path": [["a", 9]]}, 0),
              Candidate("b3", 0, 6, [], {"merge_method": "dataflow", "sources": [{"model": "models/nope"}],
                                         "path": [["nope", 0]]}, 0)]
    for cand in broken:
        r = ev.evaluate(cand)
        assert r.status == "failed" and r.error and "\n" not in r.error, r
    dfs_nan = Candidate("dfs_nan", 0, 7, [], {"merge_method": "dataflow", "sources": [
        {"model": SOURCES["a"], "name": "a"}, {"name": "m", "merge": nan.recipe}], "path": [["a", 0], ["m", 1], ["a", 3]]}, 0)
    assert ev.evaluate(dfs_nan).status == "failed"
    assert _same(ev.evaluate(good), ok)


@pytest.mark.slow
def test_keyboard_interrupt_propagates(evaluator, monkeypatch):
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluator.scorer, "score", interrupt)
    with pytest.raises(KeyboardInterrupt):
        evaluator.evaluate(_candidate("ps_task_arithmetic", evaluator, "ki"))


@pytest.mark.slow
def test_a_genome_only_candidate_fails_since_only_the_driver_decodes(evaluator):
    cand = _candidate("ps_task_arithmetic", evaluator, "g")
    result = evaluator.evaluate(dataclasses.replace(cand, recipe={}))
    assert result.status == "failed" and "has no recipe" in result.error and "\n" not in result.error
    assert evaluator.evaluate(cand).status == "ok"


@pytest.mark.slow
def test_sources_are_loaded_once(evaluator):
    ev = evaluator
    model = ev.materializer.model
    for cand in (_candidate("ps_task_arithmetic", ev, "p"), _candidate("hybrid", ev, "h", pick=0),
                 _candidate("dfs_paths", ev, "d")):
        assert ev.evaluate(cand).status == "ok"
        assert ev.materializer.model is model
    assert ev.counts["materializer"] == 1
    assert ev.counts["load_models"] <= len(SOURCES)  # each source's live model at most once, ever
    loaded = ev.sources.loaded
    ev.evaluate(_candidate("dfs_paths", ev, "d2"))
    assert loaded and all(ev.sources.loaded[k] is v for k, v in loaded.items())


def test_a_data_flow_worker_holds_only_its_sources_weights(setup):
    """Once every worker built the parameter-space Materializer (fp32 base and task vectors): two 7B sources of a
    data-flow search cost ~94 GiB where their 27 GiB of weights would do."""
    from evomerge.io.checkpoint import Checkpoint

    root, config = setup
    ev = Evaluator(config, root)
    cand = _candidate("dfs_paths", ev, "d")  # model a's own layers, in order
    assert {p[0] for p in cand.recipe["path"]} == {"a"}
    assert ev.evaluate(cand).status == "ok"
    assert not ev.sources.has_materializer and list(ev.sources.loaded) == [SOURCES["a"]]
    held = {p.data_ptr(): p.numel() * p.element_size() for p in ev.sources.loaded[SOURCES["a"]].parameters()}
    assert sum(held.values()) == sum(t.nbytes for t in Checkpoint.open(root / SOURCES["a"]).tensors.values())
    assert ev.evaluate(_candidate("ps_task_arithmetic", ev, "p")).status == "ok"  # the first PS candidate builds it
    assert ev.sources.has_materializer
    # the Materializer reads the other sources into the same store: each checkpoint is held once, in its dtype,
    # and source a's live model still runs on the store's tensors
    held = sum(t.nbytes for ref in (BASE, *SOURCES.values()) for t in Checkpoint.open(root / ref).tensors.values())
    assert ev.sources.store.held_bytes() == held
    store_ptrs = {t.data_ptr() for t in ev.sources.store.tensors(SOURCES["a"]).values()}
    assert all(p.data_ptr() in store_ptrs for p in ev.sources.loaded[SOURCES["a"]].parameters())


@pytest.mark.slow
def test_a_worker_split_over_devices_scores_as_one_device(setup, evaluator):
    """workers.gpus_per_worker >= 2: every model split by layers (here over two CPU 'devices', so the hooks
    move nothing; bench/gpu_check.sh runs a split across real devices). Same results for every kind."""
    root, config = setup
    split = Evaluator(config, root, worker="w0", node="n0", devices=["cpu", "cpu"])
    assert len(split.sources.split.starts) == 2  # both devices hold layers
    for preset, key in [("ps_task_arithmetic", "ps0"), ("dfs_paths", "d0"), ("hybrid", "h1")]:
        cand = _candidate(preset, evaluator, key, pick=1 if preset == "hybrid" else 0)
        r = split.evaluate(cand)
        _check_ok(r, split)
        assert _same(r, evaluator.evaluate(cand))
    layers = split.materializer.model.model.layers
    assert all(len(layer._forward_pre_hooks) == 1 for layer in layers)
    assert split.sources.loaded[SOURCES["a"]].model.layers[3]._forward_pre_hooks


@pytest.mark.slow
def test_cpu_workers_compile_the_kernels_only_for_large_models_and_score_the_same(setup, evaluator, monkeypatch):
    """A CPU worker merges eagerly below specs.FUSED_CPU_PARAMS and with the compiled kernels above it; task
    arithmetic compiled writes the eager bits, so a candidate scores exactly the same either way."""
    from evomerge.merge import fused, specs

    root, config = setup
    cand = _candidate("ps_task_arithmetic", evaluator, "k0")
    eager = evaluator.evaluate(cand)
    assert not evaluator.materializer.workspace.fused
    monkeypatch.setattr(specs, "FUSED_CPU_PARAMS", 1)
    compiled_ev = Evaluator(config, root, worker="w0", node="n0")
    compiled = compiled_ev.evaluate(cand)
    assert compiled_ev.materializer.workspace.fused and "weighted_sum" in fused._compiled and not fused._broken
    _check_ok(compiled, compiled_ev)
    assert _same(eager, compiled)


@pytest.mark.slow
def test_cpu_workers_build_the_precompiled_sum_and_score_the_same(setup, tmp_path, monkeypatch):
    """A CPU worker below FUSED_CPU_PARAMS merges task arithmetic in eager ops while it builds the precompiled
    kernel in the background, then with the package: the same candidate scores exactly the same."""
    monkeypatch.setenv("EVOMERGE_KERNEL_CACHE", str(tmp_path / "kernels"))
    root, config = setup
    ev = Evaluator(config, root, worker="w0", node="n0")
    cand = _candidate("ps_task_arithmetic", ev, "k0")
    eager = ev.evaluate(cand)
    sums = ev.materializer.precompiled
    assert not ev.materializer.workspace.fused and sums.build and sums.calls == 0 and len(sums._builders) == 1
    sums.wait()
    again = ev.evaluate(cand)
    assert sums.calls > 0 and list((tmp_path / "kernels").glob("*.pt2"))
    _check_ok(again, ev)
    assert _same(eager, again)
