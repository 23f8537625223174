"""The memory plan (evomerge.search.memory_plan): bytes by component from headers, `evomerge plan`, and `search`
refusing, before its run directory exists, a config whose workers cannot hold their sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.search import memory_plan as mp
from evomerge.search.capacity import Workers, parse_size, workers_for
from evomerge.search.memory_plan import Setting, estimate, plan_search, read_workload
from evomerge.testing.sparse import MISTRAL_7B, disk_bytes, llama_shapes, write_sparse_checkpoint

GiB = 2**30
CPU = Workers(gpu=False, per_node=1, gpus_each=0.0, device_free=None, host_available=64 * GiB, source="stated")


def gpu(free: int, per_node: int = 1, gpus_each: float = 1.0) -> Workers:
    return Workers(gpu=True, per_node=per_node, gpus_each=gpus_each, device_free=free, host_available=256 * GiB,
                   source="stated")


def run_config(family, space="ps_ties_dare", batch_size=2, **sources) -> RunConfig:
    models = {f"m{i}": str(p) for i, p in enumerate(family.sources)}
    return RunConfig.model_validate({
        "name": "p", "sources": {"models": models, "base_model": str(family.base), **sources},
        "search_space": space, "fitness": {"calibration": "unused.json", "batch_size": batch_size},
        "objectives": [{"task": "t"}]})


def parts(e) -> dict[str, tuple[int, str]]:
    return {n: (b, p) for n, b, p in e.parts}


def test_components_from_headers_equal_hand_computed_bytes(llama, tmp_path):
    """The tiny Llama (hidden 32, 4 layers, 4 heads, 2 KV heads, MLP 64, vocab 320, untied, fp32): every
    component counted by hand from its shapes."""
    assert json.loads((llama.base / "config.json").read_text())["vocab_size"] == 320
    per_layer = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32 + 2 * 32  # q k v o, gate up down, 2 norms
    P = 4 * per_layer + 2 * 320 * 32 + 32  # + embeddings, head, final norm
    largest, K, B, T = 320 * 32, 3, 2, 128  # T: max_position_embeddings 128 < PLAN_SEQ_LEN
    w = read_workload(run_config(llama), tmp_path, "test")
    assert (w.k, w.params, w.auto_dtype, w.seq_len, w.batch) == (K, P, "float32", T, B)

    def activations(m: int, cpu: bool, split: int = 1) -> int:
        logits = 2 * B * T * 320 * m
        kv = -(-2 * 4 * B * T * 2 * 8 * m // split)
        layer = B * T * (4 * 32 + 3 * 64) * m
        return logits + kv + layer + (B * 4 * T * T * 4 if cpu else 0)

    # CPU worker, as configured (auto: fp32; the selection cache is on for CPU workers; ties reads magnitudes)
    cpu = estimate(w, Setting("device", "auto", True), CPU)
    assert parts(cpu) == {
        "sources": ((K + 1) * P * 4, "host"), "live model": (P * 4, "host"),
        "scratch": ((3 * K + 6 + 2 - 2) * largest * 4, "host"), "selection caches": (K * P * 4, "host"),
        "activations": (activations(4, cpu=True), "host"), "worker process": (mp.WORKER_PROCESS_BYTES, "host")}
    assert cpu.host_node == sum(b for b, _ in parts(cpu).values()) and cpu.per_gpu == 0
    # host placement on a CPU stages nothing, and methods that may rescale (all of ties_dare's) merge whole
    # tensors there rather than pay a measuring pass, even where a piece is smaller than the largest tensor
    cpu_host = parts(estimate(w, Setting("host", "auto", True), CPU, piece=4096))
    assert "staging" not in cpu_host and cpu_host["scratch"] == parts(cpu)["scratch"]
    # stored in bf16: sources and the live model (built in the storage dtype) halve
    half = parts(estimate(w, Setting("device", "bfloat16", False), CPU))
    assert half["sources"][0] == (K + 1) * P * 2 and half["live model"][0] == P * 2
    assert "selection caches" not in half and half["activations"][0] == activations(2, cpu=True)
    assert half["scratch"][0] == (3 * K + 6 + 2) * largest * 4  # + an fp32 copy of the base; a CPU cuts exactly
    assert half["selection transients"][0] == mp.SELECTION_TRANSIENTS * largest * 4  # but exact selections

    # GPU worker, sources on the host: the device holds live model, scratch (the fused kernel's: no sign election
    # buffers), the transients of exact selections (no caches), staging, activations, runtime
    g = gpu(80 * GiB)
    host = estimate(w, Setting("host", "auto", False), g)
    transients = mp.SELECTION_TRANSIENTS * largest * 4
    assert parts(host) == {
        "sources": ((K + 1) * P * 4, "host"), "live model": (P * 4, "device"),
        "scratch": (2 * K * largest * 4, "device"), "selection transients": (transients, "device"), "staging": (2 * (K + 1) * largest * 4, "device"),
        "activations": (activations(4, cpu=False), "device"), "CUDA runtime": (mp.DEVICE_RUNTIME_BYTES, "device"),
        "worker process": (mp.WORKER_PROCESS_BYTES, "host")}
    assert host.per_gpu == P * 4 + 2 * K * largest * 4 + transients + 2 * (K + 1) * largest * 4 + activations(4, False) \
        + mp.DEVICE_RUNTIME_BYTES
    assert host.host_node == (K + 1) * P * 4 + mp.WORKER_PROCESS_BYTES
    # two workers on the node pin a copy each; a worker over 2 GPUs holds half the sources and model on each
    assert estimate(w, Setting("host", "auto", False), gpu(80 * GiB, per_node=2)).host_node == 2 * host.host_node
    # a worker that reserves 2 GPUs still holds everything on one (no split by layers yet)
    two = parts(estimate(w, Setting("device", "auto", False), gpu(80 * GiB, gpus_each=2)))
    assert two["sources"][0] == (K + 1) * P * 4 and two["live model"][0] == P * 4


def test_only_methods_the_space_can_produce_count_and_data_flow_holds_the_sources_alone(llama, tmp_path):
    w_ta = read_workload(run_config(llama, space="ps_task_arithmetic"), tmp_path, "test")
    assert w_ta.cache_bytes == 0  # task arithmetic selects nothing: no cache even when on
    assert "selection caches" not in parts(estimate(w_ta, Setting("device", "auto", True), CPU))
    # K + 2 copies of the embedding (the base, 3 task vectors, the result), less the base's and the result's
    # (float32 sources and live model)
    assert parts(estimate(w_ta, Setting("device", "auto", True), CPU))["scratch"][0] == 3 * 320 * 32 * 4
    della = read_workload(run_config(llama, space={"preset": "ps_ties_dare", "ps": {"methods": ["ties", "della"]}}),
                          tmp_path, "test")
    assert della.cache_bytes == 4 + 2
    dfs = read_workload(run_config(llama, space="dfs_paths"), tmp_path, "test")
    e = parts(estimate(dfs, Setting("device", "auto", False), CPU))
    assert set(e) == {"sources", "activations", "worker process"}  # no live model, scratch or base
    assert e["sources"][0] == 3 * dfs.params * 4 and "sources.base_model" not in dfs.held
    assert dfs.path_layers == 2 * 3 * 4  # repeats x every source's layers: the longest path a candidate may run


def test_a_config_that_cannot_fit_is_refused_by_search_naming_sources_placement(tmp_path):
    """GPU workers stated at a size between what host and device placement need: `evomerge search` exits 2 with
    one line that names sources.placement and what host placement needs, and creates no run directory."""
    from evomerge.search.preflight import check_memory
    from evomerge.testing.workspace import make_search_workspace

    fitness = {"calibration": "calibration.json", "task_paths": ["tasks"], "estimator": "pirt", "batch_size": 1}
    root = make_search_workspace(tmp_path / "ws", fitness=fitness)  # batch 1: a smaller batch cannot help
    config_path = root / "run.yaml"
    config = RunConfig.model_validate(yaml.safe_load(config_path.read_text()))
    check_memory(config, root, "run.yaml", workers_for(config, in_process=True))  # today's CPU search fits
    w = read_workload(config, root, "test")
    device = estimate(w, Setting("device", "auto", False), gpu(80 * GiB)).per_gpu
    host = estimate(w, Setting("host", "auto", False), gpu(80 * GiB)).per_gpu
    assert host < device
    free = (host + device) // 2
    run_dir = tmp_path / "runs" / "r"
    out = subprocess.run([sys.executable, "-m", "evomerge", "search", str(config_path), "--run-dir", str(run_dir),
                          "--device-memory", f"{free}B", "--host-memory", "64GiB"], check=False,
                         capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"evomerge: error: {config_path}: sources.placement: a worker needs ")
    assert f"which has {mp.gib(free)} free; set sources.placement: host (needs {mp.gib(host)} per GPU" in lines[0]
    assert not run_dir.exists()
    # resuming a run on such workers is refused the same way, naming the run's config, before anything runs
    from evomerge.search.session import create_run

    run, _ = create_run(config_path, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    out = subprocess.run([sys.executable, "-m", "evomerge", "resume", str(run_dir), "--device-memory", f"{free}B",
                          "--host-memory", "64GiB"], check=False, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"evomerge: error: {run.config_path}: sources.placement: a worker needs ")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_evomerge_plan_prints_the_table_and_what_to_set(llama, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(llama, batch_size=1).model_dump(mode="json")))
    assert main(["plan", str(config), "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    for row in ("sources", "live model", "scratch", "selection caches", "activations", "host RAM available", "fits"):
        assert row in out
    assert "CPU worker" in out and "64.0 GiB" in out
    assert out.strip().splitlines()[-1] == ("fits as configured: sources.placement: device, sources.storage_dtype: "
                                            "auto (float32), sources.selection_cache: on")
    # a GPU too small for the sources on it, large enough with them on the host
    w = read_workload(run_config(llama, batch_size=1), tmp_path, "test")
    device = estimate(w, Setting("device", "auto", False), gpu(80 * GiB)).per_gpu
    host = estimate(w, Setting("host", "auto", False), gpu(80 * GiB)).per_gpu
    assert main(["plan", str(config), "--device-memory", f"{(host + device) // 2}B", "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "staging" in out and "GPU free" in out
    assert out.strip().splitlines()[-1] == ("fits: sources.placement: host, sources.storage_dtype: auto (float32), "
                                            "sources.selection_cache: off (set sources.placement: host)")


@pytest.mark.parametrize("args, expected", [
    (["--device-memory", "80XB"], "--device-memory: '80XB' is not a memory size"),
    (["--host-memory", "0GB"], "--host-memory: '0GB' is not a memory size"),
    (["--workers", "0"], "--workers: '0' is not a positive number of workers"),
])
def test_bad_plan_options_are_one_line_errors(llama, tmp_path, args, expected):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(llama).model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "evomerge", "plan", str(config), *args], check=False,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and expected in out.stderr, out.stderr


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("80GB", "x") == 80 * 10**9 and parse_size("79.5GiB", "x") == int(79.5 * GiB)
    assert parse_size("80G", "x") == 80 * GiB and parse_size("512MiB", "x") == 512 * 2**20
    assert parse_size("1234B", "x") == 1234


def _read_bytes() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io rchar)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["rchar"])


def test_header_only_7b_sources_are_planned_without_reading_their_data(tmp_path):
    """Four Mistral-7B-shaped bf16 checkpoints whose data is a hole (54 GiB apparent, ~0 on disk): the plan reads
    their headers only, and counts every tensor."""
    shapes = llama_shapes(MISTRAL_7B)
    for name in ("base", "ft0", "ft1", "ft2"):
        write_sparse_checkpoint(tmp_path / name, MISTRAL_7B, shapes, "BF16")
    assert sum(disk_bytes(tmp_path / n) for n in ("base", "ft0", "ft1", "ft2")) < 2**20
    config = RunConfig.model_validate({
        "name": "p", "sources": {"models": {f"ft{i}": f"ft{i}" for i in range(3)}, "base_model": "base"},
        "search_space": {"preset": "ps_ties_dare", "ps": {"methods": ["ties"]}},
        "fitness": {"calibration": "unused.json", "batch_size": 8}, "objectives": [{"task": "t"}]})
    before, start = _read_bytes(), time.perf_counter()
    plan = plan_search(config, tmp_path, "test", gpu(parse_size("23.6GiB", "x")))
    read, took = _read_bytes() - before, time.perf_counter() - start
    assert read < 8 * 2**20 and took < 10, (read, took)  # headers (~30 KB each), config.json, the space preset
    P = 7_241_732_096  # Mistral-7B-v0.1's parameter count
    w = plan.workload
    assert (w.params, w.k, w.auto_dtype, w.seq_len) == (P, 3, "bfloat16", mp.PLAN_SEQ_LEN)
    device = parts(plan.configured)  # GPU workers: placement device, selection cache off by auto
    assert device["sources"] == (4 * P * 2, "device") and device["live model"] == (P * 2, "device")
    assert device["scratch"] == ((2 * 3 + 2) * 32000 * 4096 * 4, "device") and "selection caches" not in device
    assert plan.configured.fits is False
    refusal = plan.refusal("run.yaml")
    assert refusal.startswith("run.yaml: sources.placement: a worker needs ") and "set sources.placement: host" in \
        refusal and "\n" not in refusal


def test_cpu_workers_that_overfill_the_node_are_told_how_many_fit_and_unknown_memory_refuses_nothing(llama, tmp_path):
    config = run_config(llama, batch_size=1)
    crowded = Workers(gpu=False, per_node=2, gpus_each=0.0, device_free=None, host_available=3 * GiB // 2,
                      source="stated")
    plan = plan_search(config, tmp_path, "run.yaml", crowded)
    assert plan.configured.fits is False and plan.configured.host_node > 2 * mp.WORKER_PROCESS_BYTES
    refusal = plan.refusal("run.yaml")
    assert refusal.startswith("run.yaml: workers.count: 2 workers on a node need ") and \
        refusal.endswith(f"set workers.count: 1 (needs {mp.gib(plan.fix().estimate.host_node)} of host RAM)")
    # GPU workers whose GPUs this machine cannot see (a cluster's, say): planned, never refused
    unseen = Workers(gpu=True, per_node=1, gpus_each=1.0, device_free=None, host_available=64 * GiB, source="?")
    plan = plan_search(config, tmp_path, "run.yaml", unseen)
    assert plan.configured.fits is None and plan.refusal("run.yaml") is None
    assert plan.verdict().startswith("fits: unknown (?); as configured (sources.placement: device, ")


@pytest.mark.parametrize("fixture,methods,cache", [
    ("llama", ["task_arithmetic"], False), ("llama", ["ties"], False), ("llama", ["dare_ties", "della"], True), ("llama", ["ties"], True),
    ("qwen2_bf16", ["ties"], True),  # bf16 task vectors tie in magnitude: the cached cut's slow path
    ("qwen2_bf16", ["ties", "task_arithmetic"], False)])
def test_planned_scratch_covers_what_the_materializer_allocates(request, tmp_path, fixture, methods, cache):
    """The plan's scratch against the Materializer's own buffers after merging every source with each method of
    the space: never under, and within 20% (the constants are measured: a change of the merge code shows here)."""
    import torch

    from evomerge.merge.recipe import Recipe
    from evomerge.worker.materializer import Materializer

    family = request.getfixturevalue(fixture)
    config = run_config(family, space={"preset": "ps_ties_dare", "ps": {"methods": methods}})
    planned = parts(estimate(read_workload(config, tmp_path, "t"), Setting("device", "auto", cache), CPU))["scratch"][0]
    paths = {str(p): p for p in [family.base, *family.sources]}
    m = Materializer(paths, str(family.base), device=torch.device("cpu"), selection_cache=cache)
    for method in methods:
        given = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 0.3, "density": 0.5}
        models = [{"model": str(p), "parameters": given} for p in family.sources]
        doc = {"merge_method": method, "base_model": str(family.base), "models": models}
        m.materialize(Recipe.from_mergekit(doc, where=method))
    measured = m.workspace.nbytes()
    assert measured <= planned <= 1.2 * measured, (measured, planned)


def test_cpu_workers_plan_block_scratch_for_elementwise_methods():
    """Linear and task arithmetic merge large tensors in blocks on CPU workers: their scratch is copies of a
    block, not of the largest tensor; a sparsifying method in the same space still sets the size."""
    from evomerge.merge.specs import BLOCK_ENTRIES
    from evomerge.search.memory_plan import scratch_fp32_entries

    big, k = 50 * BLOCK_ENTRIES, 2
    ta = lambda methods, blocks: scratch_fp32_entries(k, methods, False, "bfloat16", "bfloat16", False, big, blocks)
    assert ta(("task_arithmetic",), True) == (k + 2) * BLOCK_ENTRIES  # base, task vectors, result
    assert ta(("task_arithmetic",), False) == (k + 2) * big
    assert ta(("task_arithmetic", "ties"), True) == (3 * k + 6 + 2) * big  # a CPU cuts by thresholds (+ cut, kept)
    assert ta(("ties",), False) == (3 * k + 6) * big
    small = scratch_fp32_entries(k, ("linear",), False, "bfloat16", "bfloat16", False, 1000, True)
    assert small == (k + 2) * 1000  # a model whose tensors all fit one block: whole tensors


def test_host_placement_plans_scratch_and_staging_of_a_piece(llama, tmp_path):
    """Sources on the host: methods that go piece by piece keep scratch of a piece; TIES only with its
    cache (which then lives in host RAM); a method that needs whole tensors stages the largest one."""
    from evomerge.search.memory_plan import piece_entries, scratch_fp32_entries

    big, k, piece = 50 * piece_entries(True), 2, piece_entries(True)
    eager = lambda methods, cache: scratch_fp32_entries(k, methods, cache, "bfloat16", "bfloat16", False, big,
                                                        False, piece)
    assert eager(("ties",), True) == (3 * k + 6 + 2) * piece
    assert eager(("ties",), False) == (3 * k + 6) * big  # an exact selection needs the whole tensor
    assert eager(("dare_ties", "della"), False) == (3 * k + 6) * piece
    assert eager(("dare_ties", "slerp"), False) == (2 * k + 2) * big  # slerp's norms: whole tensors
    gpu = Workers(gpu=True, per_node=1, gpus_each=1.0, device_free=None, host_available=None, source="test")
    w = read_workload(run_config(llama, space={"preset": "ps_ties_dare", "ps": {"methods": ["ties"]}}), tmp_path, "t")
    on, off = (parts(estimate(w, Setting("host", "auto", c), gpu)) for c in (True, False))
    assert on["selection caches"][1] == "host" and "selection caches" not in off
    largest = 320 * 32  # the embedding: smaller than a GPU piece, so staged whole either way
    assert on["staging"][0] == off["staging"][0] == 2 * 4 * largest * 4
