"""Benchmark: evomerge's in-place materializer vs mergekit 0.1.5 `run_merge`, against a memory-bandwidth bound.

    .venv/bin/python bench/bench_materialize.py [--sizes 10M,100M] [--repeats 5] [--device cpu] [--no-mergekit]

For each model size a random Llama family (base + 3 sources = base + task vector, fp32) is built once
and cached under bench/out/families/. Each recipe (linear, ties, dare_ties) is written as a mergekit
YAML and run by both tools:
- evomerge: one Materializer per family (its load time is reported apart), then `materialize`
  (one warm-up call, then the median of --repeats);
- mergekit: `run_merge` in-process in bench/.mergekit-venv (see mergekit_runner.py), same YAML,
  one warm-up then the median of --repeats. This includes reading the inputs from the (warm) page
  cache and writing the output file: that is what a merge costs mergekit, and what evomerge's
  resident task vectors and in-place writes avoid.
The bound is the minimal traffic of a merge (read base + each task vector once, write the output
once, all fp32) divided by the copy bandwidth measured on the same device in the same run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import yaml
from benchlib import OUT, cached_family, checkpoint_params, run_mergekit, write_yaml

from evomerge.merge.recipe import Recipe
from evomerge.testing.tiny import TinySpec
from evomerge.worker.materializer import Materializer

N_SOURCES = 3
SIZES = {
    # 10,490,112: 8 layers x 1.05M + 2 x 1.05M embeddings (untied)
    "10M": TinySpec(arch="llama", hidden=256, layers=8, heads=8, kv_heads=8, intermediate=1024, vocab=4096),
    # 97,536,768: 12 layers x 7.08M + 2 x 6.3M embeddings
    "100M": TinySpec(arch="llama", hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=8192),
    # 953,223,168: 16 layers x 51.4M + 2 x 65.5M embeddings (fp32: 3.8 GB per model, ~22 GB on the device)
    "1B": TinySpec(arch="llama", hidden=2048, layers=16, heads=32, kv_heads=32, intermediate=5632, vocab=32000),
}
WEIGHTS, DENSITIES = (0.5, 0.3, 0.2), (0.5, 0.6, 0.7)


def recipes(base: str, sources: list[str]) -> dict[str, dict]:
    """The benchmarked mergekit YAMLs (as dicts); model strings are absolute paths, valid for both tools."""
    per_model = [{"model": s, "parameters": {"weight": w, "density": d}}
                 for s, w, d in zip(sources, WEIGHTS, DENSITIES)]
    linear = {
        "merge_method": "linear",  # no base_model: mergekit would add it as a 4th weighted input
        "models": [{"model": s, "parameters": {"weight": w}} for s, w in zip(sources, WEIGHTS)],
        "dtype": "float32",
    }
    ties = {
        "merge_method": "ties",
        "base_model": base,
        "models": copy.deepcopy(per_model),
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    ties["models"][0]["parameters"]["weight"] = [0.3, 0.5, 0.7]  # per-layer gradient
    dare_ties = {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": copy.deepcopy(per_model),
        "dtype": "float32",
    }
    return {"linear": linear, "ties": ties, "dare_ties": dare_ties}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes read + written per second by dst.copy_(src) of one fp32 buffer (median of `repeats`)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults / allocator, not bandwidth
    secs = statistics.median(timed(functools.partial(dst.copy_, src), device) for _ in range(repeats))
    return 2 * nbytes / secs


def bench_size(size: str, args, device: torch.device, bandwidth: float) -> tuple[list[dict], dict]:
    spec = SIZES[size]
    t0 = time.perf_counter()
    family = cached_family(OUT / "families" / size, spec, N_SOURCES)
    build_s = time.perf_counter() - t0
    params = checkpoint_params(family.base)
    base, sources = str(family.base.resolve()), [str(s.resolve()) for s in family.sources]
    docs = recipes(base, sources)
    yaml_paths = {name: write_yaml(OUT / "recipes" / size / f"{name}.yml", doc) for name, doc in docs.items()}
    print(f"\n== {size}: {params:,} parameters ({params * 4 / 2**20:.0f} MiB per fp32 model); "
          f"family ready in {build_s:.1f} s", flush=True)

    # evomerge: load once (sources, then the live model it writes into), then only materialize is timed
    t0 = time.perf_counter()
    m = Materializer({p: p for p in [base, *sources]}, base=base, device=device)
    sync(device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.model  # noqa: B018  (built on first use)
    sync(device)
    build_model_s = time.perf_counter() - t0
    rows, first = [], {}
    for name, path in yaml_paths.items():
        recipe = Recipe.from_mergekit(yaml.safe_load(path.read_text()), where=str(path))  # as the CLI reads it
        run = functools.partial(m.materialize, recipe, seed=0)
        n_deltas = sum(1 for e in recipe.inputs() if e.model != base)
        moved = (1 + n_deltas + 1) * params * 4  # base + task vectors in, merged model out (fp32)
        row = {"size": size, "params": params, "method": name, "bytes_moved": moved, "bound_s": moved / bandwidth}
        for mode in ("eager", "fused"):
            m.workspace.fused = mode == "fused"  # same materializer, same resident data: only the kernel differs
            first[f"{name} {mode}"] = timed(run, device)  # warm-up: scratch, sorted magnitudes, compilation
            secs = [timed(run, device) for _ in range(args.repeats)]
            row[f"{mode}_s"], row[f"{mode}_all_s"] = statistics.median(secs), secs
            print(f"evomerge {name} {mode}: median {row[f'{mode}_s'] * 1e3:.1f} ms "
                  f"(warm-up {first[f'{name} {mode}'] * 1e3:.1f} ms)", flush=True)
        rows.append(row)
    model_bytes = sum(t.numel() * t.element_size() for _, t in m.named_tensors())
    info = {"size": size, "params": params, "load_s": load_s, "build_model_s": build_model_s, "first_s": first,
            "resident_bytes": m.resident_bytes(), "model_bytes": model_bytes, "scratch_bytes": m.workspace.nbytes()}
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_mergekit:
        result = run_mergekit(
            [{"name": name, "yaml": str(p)} for name, p in yaml_paths.items()],
            device=str(device), seed=0, repeats=args.repeats, warmup=1, clear_loader_cache=args.clear_loader_cache,
        )
        info["mergekit_version"] = result["mergekit_version"]
        for row in rows:
            job = result["jobs"][row["method"]]
            if job["error"]:
                print(f"mergekit {row['method']} failed: {job['error']}")
            else:
                row["mergekit_s"], row["mergekit_all_s"] = statistics.median(job["times_s"]), job["times_s"]
    return rows, info


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def print_table(rows: list[dict]) -> None:
    head = ["size", "params", "method", "eager ms", "fused ms", "mergekit ms", "speedup eager", "speedup fused",
            "bound ms", "eager/bound", "fused/bound"]
    body = []
    for r in rows:
        mk = r.get("mergekit_s")
        speedup = {mode: "-" if mk is None else f"{mk / r[f'{mode}_s']:.1f}x" for mode in ("eager", "fused")}
        body.append([
            r["size"], f"{r['params']:,}", r["method"], fmt_ms(r["eager_s"]), fmt_ms(r["fused_s"]), fmt_ms(mk),
            speedup["eager"], speedup["fused"], fmt_ms(r["bound_s"]),
            f"{r['eager_s'] / r['bound_s']:.2f}", f"{r['fused_s'] / r['bound_s']:.2f}",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(line(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,100M", help=f"comma-separated, from {', '.join(SIZES)} (default: 10M,100M)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (default: 5)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N], for both tools (default: cpu)")
    ap.add_argument("--no-mergekit", action="store_true", help="time evomerge only (e.g. 1B on CPU)")
    ap.add_argument("--clear-loader-cache", action="store_true",
                    help="clear mergekit's LoaderCache before each run_merge (cold shard handles, like a new CLI run)")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown size {unknown[0]!r}: choose from {', '.join(SIZES)}")
    device = torch.device(args.device)

    # import the model classes now, so their one-time import cost is not counted as loading
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    wall = time.perf_counter()
    # the tree under test, so numbers can be matched to code
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], check=False, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent).stdout.strip()
    bandwidth = copy_bandwidth(device)
    print(f"evomerge tree {rev or 'unknown'}")
    print(f"device {device} ({torch.get_num_threads()} CPU threads, torch {torch.__version__}); "
          f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write, 512 MiB fp32 dst.copy_(src), median of 5)")
    rows, infos = [], []
    for size in sizes:
        r, info = bench_size(size, args, device, bandwidth)
        rows += r
        infos.append(info)

    print(f"\nrepeats {args.repeats} (median, after 1 warm-up); speedup = mergekit/evomerge; "
          f"bound = bytes moved / {bandwidth / 1e9:.2f} GB/s")
    print_table(rows)
    print()
    for info in infos:
        first = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in info["first_s"].items())
        print(f"{info['size']}: evomerge load {info['load_s']:.2f} s "
              f"(+ {info['build_model_s']:.2f} s to build the live model); "
              f"resident {info['resident_bytes'] / 2**20:.0f} MiB (base + task vectors + cached indexes) "
              f"+ live model {info['model_bytes'] / 2**20:.0f} MiB "
              f"+ scratch {info['scratch_bytes'] / 2**20:.0f} MiB; first materialize: {first}")
    print(f"total wall time {time.perf_counter() - wall:.0f} s")
    out = OUT / "bench_results.json"
    out.write_text(json.dumps({"device": str(device), "bandwidth_Bps": bandwidth, "repeats": args.repeats,
                               "rows": rows, "info": infos}, indent=1))
    print(f"raw numbers: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
