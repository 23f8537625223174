"""Benchmark: what a worker holds and how fast it writes a candidate, per storage dtype, placement and selection
cache, against today's float32-resident materializer (commit 1e4064d, loaded from git), the memory plan, the
bandwidth bound and mergekit.

    .venv/bin/python bench/bench_memory.py [--size 100M] [--k 2,3] [--repeats 3] [--methods linear,ties,...]
                                           [--fused] [--no-mergekit] [--no-legacy]

A random Llama family stored in bf16 (base + 3 fine-tunes) is built once under bench/out/families/. Every mode
runs in its own process, so its peak RSS is its own: the Materializer is built, each method is materialized
once (warm-up: caches, compilation) and then --repeats times (median). Reported per mode:
- device B/param: bytes the worker holds on its device (sources or staging slots, caches, scratch, live model)
  per parameter, measured from the tensors themselves; plan B/param: evomerge.search.memory_plan's estimate of
  the same components, and their ratio;
- peak RSS B/param: the process's peak resident memory (everything: torch, the checkpoints read, the model);
- ms per method (eager; fused with --fused), its ratio to the legacy fp32 path's, and to the bound: the bytes
  the mode must move (read K+1 sources in the storage dtype, write the model) over the measured copy bandwidth,
  or for host placement on an accelerator, the K+1 sources staged over the measured pinned host-to-device copy;
- mergekit ms (run_merge on the same YAML, in bench/.mergekit-venv) for the same method and K.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_materialize import SIZES, copy_bandwidth
from benchlib import OUT, run_mergekit, write_yaml

from evomerge.testing.tiny import Family, make_family

LEGACY_COMMIT = "1e4064d"  # the last commit whose Materializer held fp32 base + task vectors
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della")
WEIGHTS, DENSITIES = (0.5, 0.3, 0.2), (0.5, 0.6, 0.7)
# (storage dtype, placement, selection cache); auto = the checkpoint's (bf16)
# (host, on is what host placement does by default: the caches live in host RAM and large tensors go by pieces)
MODES = [("auto", "device", "on"), ("auto", "device", "off"), ("auto", "host", "on"), ("auto", "host", "off"),
         ("float32", "device", "on")]


def family(size: str) -> Family:
    root = OUT / "families" / f"{size}-bf16"
    marker = root / "family.json"
    key = {"spec": asdict(SIZES[size]), "n_sources": 3, "dtype": "bfloat16"}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return Family(base=root / "base", sources=[root / f"source_{i}" for i in range(3)])
    marker.unlink(missing_ok=True)
    t = time.perf_counter()
    fam = make_family(root, SIZES[size], n_sources=3, seed=0, dtype=torch.bfloat16)
    marker.write_text(json.dumps(key))
    # a fresh machine (a lent GPU's) builds the family before it measures anything: say what that cost
    print(f"built the {size} family (base and 3 sources, bf16) in {time.perf_counter() - t:.0f} s", file=sys.stderr,
          flush=True)
    return fam


def recipe(method: str, fam: Family, k: int) -> dict:
    params = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
              "dare_ties": ("weight", "density"), "breadcrumbs_ties": ("weight", "density"),
              "della": ("weight", "density")}[method]
    models = [{"model": str(s), "parameters": {p: (WEIGHTS if p == "weight" else DENSITIES)[i] for p in params}}
              for i, s in enumerate(fam.sources[:k])]
    doc = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        doc["base_model"] = str(fam.base)
    if method == "della":
        doc["parameters"] = {"epsilon": 0.1}
    return doc


# -- one mode, in its own process ------------------------------------------------------------------------------
def child(spec: dict) -> dict:
    from evomerge.merge.recipe import Recipe

    fam = Family(base=Path(spec["base"]), sources=[Path(s) for s in spec["sources"]])
    k, device = spec["k"], torch.device(spec.get("device", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = {str(p): p for p in [fam.base, *fam.sources[:k]]}
    t = time.perf_counter()
    if spec["mode"] == "legacy":
        sys.path.insert(0, str(OUT))
        from legacy_materializer import Materializer as Legacy

        m = Legacy(paths, str(fam.base), device=device, fused=spec["fused"])
    else:
        from evomerge.worker.materializer import Materializer

        dtype, placement, cache = spec["mode"]
        kernel = spec.get("kernel", "fused" if spec["fused"] else "eager")
        m = Materializer(paths, str(fam.base), device=device, fused=spec["fused"], storage_dtype=dtype,
                         placement=placement, selection_cache=cache == "on",
                         precompiled="build" if kernel == "precompiled" else "off")
        if kernel == "precompiled":  # each method's packages built (or found) before anything is timed
            for method in spec["methods"]:
                m.materialize(Recipe.from_mergekit(recipe(method, fam, k), where=method))
                m.precompiled.wait()
    load_s = time.perf_counter() - t
    model = m.model
    params = sum(p.numel() for p in model.parameters())
    times, first, per_method, profiles = {}, {}, {}, {}
    live = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for method in spec["methods"]:
        if spec["mode"] != "legacy":  # scratch and staging grow to the largest request: measure each method apart
            m.workspace = type(m.workspace)(fused=spec["fused"])
            m.store._staging = [{}, {}]
        r = Recipe.from_mergekit(recipe(method, fam, k), where=method)
        sync()
        t = time.perf_counter()
        m.materialize(r)
        sync()
        first[method] = time.perf_counter() - t
        runs = []
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            m.materialize(r)
            sync()
            runs.append(time.perf_counter() - t)
        times[method] = statistics.median(runs)
        if spec.get("profile"):
            profiles[method] = kernel_profile(m.materialize, r, device)
        if spec["mode"] != "legacy":
            per_method[method] = device_bytes(m, spec["mode"]) + live
    held = m.resident_bytes() if spec["mode"] == "legacy" else device_bytes(m, spec["mode"])
    return {"params": params, "load_s": load_s, "first_s": first, "times_s": times, "device_bytes": held + live,
            "per_method_bytes": per_method, "scratch_bytes": m.workspace.nbytes(), "peak_rss": peak_rss(),
            "peak_device": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "profiles": profiles}


def kernel_profile(materialize, recipe, device: torch.device, rows: int = 8) -> str:
    """The ops that took the most time in one call, as torch.profiler's tables: on an accelerator, by device time
    and then by host time (where waits for the device, .item() and the like, show as host time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        materialize(recipe)
        if cuda:
            torch.cuda.synchronize(device)
    keys = ["self_cuda_time_total", "self_cpu_time_total"] if cuda else ["self_cpu_time_total"]
    return "\n".join(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60) for key in keys)


def device_bytes(m, mode) -> int:
    """What the worker holds where the model runs, besides the live model: sources or staging, scratch, and the
    selection caches unless the sources (and so the caches) are on the host. Legacy's resident_bytes: fp32
    base + task vectors + caches; scratch apart."""
    caches = m.cache_bytes() if mode[1] == "device" else 0
    return m.store.device_bytes() + caches + m.workspace.nbytes()


def h2d_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Bytes per second of a pinned host buffer copied to the device (median of 5)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32).pin_memory()
    dst = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst.copy_(src)
    secs = []
    for _ in range(5):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        secs.append(time.perf_counter() - t)
    return nbytes / statistics.median(secs)


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"mode {spec['mode']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the plan's estimate of the same components ----------------------------------------------------------------
def space(methods: list[str]) -> dict:
    """A search space over `methods` with only the genes they take (the space's check refuses any other)."""
    from evomerge.merge.specs import METHODS as SPECS

    ps: dict = {"methods": methods, "weight": [0.0, 1.0]}
    if any(SPECS[m].param("density") for m in methods):
        ps["density"] = [0.1, 1.0]
    if any(SPECS[m].param("lambda") for m in methods):
        ps["params"] = {"lambda": [0.5, 1.5]}
    return {"kind": "ps", "ps": ps}


def planned(fam: Family, k: int, mode, methods: list[str], fused: bool, cuda: bool = False) -> int:
    """The plan's device bytes for a GPU worker in this mode, with the scratch of the kernel measured: the plan
    gives GPU workers the fused kernel's scratch, and this bench measures on the CPU, eager unless --fused."""
    from evomerge.config import RunConfig
    from evomerge.search.capacity import Workers
    from evomerge.search.memory_plan import (
        Setting,
        estimate,
        live_dtype,
        piece_entries,
        read_workload,
        scratch_fp32_entries,
    )

    config = RunConfig.model_validate({
        "name": "bench", "sources": {"models": {f"m{i}": str(s) for i, s in enumerate(fam.sources[:k])},
                                     "base_model": str(fam.base)},
        "search_space": space(methods),
        "fitness": {"calibration": "unused.json"}, "objectives": [{"task": "t"}]})
    w = read_workload(config, OUT, "bench")
    gpu = Workers(gpu=True, per_node=1, gpus_each=1.0, device_free=None, host_available=None, source="bench")
    dtype, placement, cache = mode
    setting = Setting(placement, dtype, cache == "on")
    piece = piece_entries(gpu=cuda) if placement == "host" else None  # what the device ran (a GPU's pieces are larger)
    e = estimate(w, setting, gpu, piece=piece)
    counted = {"sources", "live model", "selection caches"} | ({"staging"} if cuda else set())  # a CPU stages nothing
    scratch = scratch_fp32_entries(w.k, w.methods, setting.selection_cache, setting.resolved(w),
                                   live_dtype(w, setting), fused, w.reference.largest[1], not cuda, piece,
                                   staged=cuda) * 4
    return scratch + sum(b for name, b, where in e.parts if name in counted and where == "device")


def legacy_module() -> None:
    source = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:evomerge/worker/materializer.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parent).stdout
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "legacy_materializer.py").write_text(source)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="100M", choices=sorted(SIZES))
    ap.add_argument("--k", default="2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fused", action="store_true", help="also time the compiled combine kernel")
    ap.add_argument("--precompiled", action="store_true", help="also time the weighted sums by kernels compiled "
                    "ahead of time (CPU; built first where the cache lacks them)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-legacy", action="store_true")
    ap.add_argument("--modes", type=int, default=len(MODES), help="run only the first N modes (after legacy)")
    ap.add_argument("--placements", default="device,host", help="run only the modes of these placements")
    ap.add_argument("--caches", default="on,off", help="run only the modes with these selection-cache settings")
    ap.add_argument("--pairs", help="run only these placement:cache modes, e.g. device:off,host:on (each "
                    "placement's default on an accelerator)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (legacy: cpu only; pass --no-legacy)")
    ap.add_argument("--profile", action="store_true", help="print each mode's costliest ops per method (one call)")
    ap.add_argument("--child")
    ap.add_argument("--report", action="store_true", help="print the tables of the last (possibly partial) run")
    args = ap.parse_args()
    if args.report:
        saved = json.loads((OUT / "bench_memory.json").read_text())
        fam = family(saved.get("size", args.size))
        for r in saved["rows"]:
            r["mode"] = r["mode"] if r["mode"] == "legacy" else tuple(r["mode"])
            if r["mode"] != "legacy":  # the plan as the code plans it now (headers only: cheap)
                r["plan_bytes"] = planned(fam, r["k"], r["mode"], saved.get("methods", args.methods.split(",")),
                                          r["fused"], saved.get("h2d") is not None)
        print_tables(saved["rows"], list(saved["rows"][0]["times_s"]), saved["bandwidth"], saved.get("h2d"))
        return
    if args.child:
        spec = json.loads(args.child)
        spec["mode"] = spec["mode"] if spec["mode"] == "legacy" else tuple(spec["mode"])
        print(json.dumps(child(spec)))
        return

    fam, methods = family(args.size), args.methods.split(",")
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    h2d = h2d_bandwidth(device) if device.type == "cuda" else None
    if h2d:
        print(f"host-to-device (pinned) {h2d / 1e9:.1f} GB/s: the bound of host placement is the staged bytes "
              "(K+1 sources) over it", flush=True)
    if not args.no_legacy:
        legacy_module()
    rows = []
    for k in (int(x) for x in args.k.split(",")):
        modes = (["legacy"] if not args.no_legacy else []) + [
            m for m in MODES[: args.modes] if m[1] in args.placements.split(",") and m[2] in args.caches.split(",")
            and (args.pairs is None or f"{m[1]}:{m[2]}" in args.pairs.split(","))]
        kernels = ["eager"] + ["fused"] * args.fused + ["precompiled"] * args.precompiled
        for mode in modes:
            for kernel in kernels:
                if kernel == "precompiled" and mode == "legacy":
                    continue
                fused = kernel == "fused"
                spec = {"base": str(fam.base), "sources": [str(s) for s in fam.sources], "k": k, "mode": mode,
                        "fused": fused, "kernel": kernel, "methods": methods, "repeats": args.repeats,
                        "device": args.device, "profile": args.profile}
                res = run_child(spec)
                for method, table in res.pop("profiles", {}).items():
                    print(f"\n{_mode_name(mode)} {kernel} {method}, one call:\n{table}", flush=True)
                rows.append({"k": k, "mode": mode, "fused": fused, "kernel": kernel, **res,
                             "plan_bytes": None if mode == "legacy" else planned(fam, k, mode, methods, fused,
                                                                                 device.type == "cuda")})
                save(rows, bandwidth, args.size, methods, h2d)  # after every mode: an interrupted run keeps what it measured (--report)
                print(f"k={k} {mode} {kernel}: done", file=sys.stderr, flush=True)
        if not args.no_mergekit:
            jobs = [{"name": m, "yaml": str(write_yaml(OUT / "recipes" / "memory" / f"{m}-k{k}.yaml",
                                                       recipe(m, fam, k)))} for m in methods]
            result = run_mergekit(jobs, repeats=args.repeats, warmup=1)
            mk = {name: statistics.median(j["times_s"]) for name, j in result["jobs"].items() if j.get("times_s")}
            for r in rows:
                if r["k"] == k:
                    r["mergekit_s"] = mk
    save(rows, bandwidth, args.size, methods, h2d)
    print_tables(rows, methods, bandwidth, h2d)


def save(rows: list[dict], bandwidth: float, size: str, methods: list[str], h2d: float | None = None) -> None:
    doc = {"size": size, "methods": methods, "bandwidth": bandwidth, "h2d": h2d, "rows": rows}
    (OUT / "bench_memory.json").write_text(json.dumps(doc, indent=1))


def _kernel(row: dict) -> str:
    return row.get("kernel", "fused" if row["fused"] else "eager")


def _mode_name(mode) -> str:
    return "legacy fp32" if mode == "legacy" else f"{mode[0]}/{mode[1]}/cache {mode[2]}"


def _moved(row: dict) -> int:
    """Minimal traffic of one candidate: read K+1 sources in the storage dtype, write the live model (bf16)."""
    s = 4 if row["mode"] == "legacy" or row["mode"][0] == "float32" else 2
    return row["params"] * ((row["k"] + 1) * s + 2)


def _staged(row: dict) -> int:
    """What host placement copies to the device per candidate: the K+1 sources in the storage dtype."""
    return row["params"] * (row["k"] + 1) * (4 if row["mode"][0] == "float32" else 2)


def print_tables(rows: list[dict], methods: list[str], bandwidth: float, h2d: float | None = None) -> None:
    staged = f", host-to-device {h2d / 1e9:.1f} GB/s (the bound of host placement)" if h2d else ""
    print(f"\ncopy bandwidth {bandwidth / 1e9:.2f} GB/s{staged}; times: median ms after one warm-up call\n")
    print("| K | mode | kernel | device B/param (costliest method) | plan B/param | plan/measured | peak RSS B/param | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["params"]
        measured = max((r.get("per_method_bytes") or {"all": r["device_bytes"]}).values())  # the costliest method
        plan = f"{r['plan_bytes'] / p:.2f}" if r["plan_bytes"] else "-"
        ratio = f"{r['plan_bytes'] / measured:.2f}" if r["plan_bytes"] else "-"
        print(f"| {r['k']} | {_mode_name(r['mode'])} | {_kernel(r)} | "
              f"{measured / p:.2f} | {plan} | {ratio} | {r['peak_rss'] / p:.2f} | {r['load_s']:.1f} |")
    print("\nDevice B/param per method (scratch and staging measured after each method alone):\n")
    print("| K | mode | kernel | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for r in rows:
        if r.get("per_method_bytes"):
            cells = [f"{r['per_method_bytes'][m] / r['params']:.2f}" for m in methods]
            print(f"| {r['k']} | {_mode_name(r['mode'])} | {_kernel(r)} | " + " | ".join(cells) + " |")
    print("\n| K | mode | kernel | " + " | ".join(f"{m} ms (x legacy, x bound, x mergekit)" for m in methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for r in rows:
        legacy = next((x for x in rows if x["k"] == r["k"] and x["mode"] == "legacy" and x["fused"] == r["fused"]), None)  # precompiled: vs eager
        bound = _staged(r) / h2d if h2d and r["mode"] != "legacy" and r["mode"][1] == "host" else _moved(r) / bandwidth
        cells = []
        for m in methods:
            t = r["times_s"][m]
            vs = f"{t / legacy['times_s'][m]:.2f}" if legacy else "-"
            mk = r.get("mergekit_s", {}).get(m)
            cells.append(f"{t * 1e3:.0f} ({vs}, {t / bound:.1f}, {mk / t:.1f})" if mk else
                         f"{t * 1e3:.0f} ({vs}, {t / bound:.1f}, -)")
        print(f"| {r['k']} | {_mode_name(r['mode'])} | {_kernel(r)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
