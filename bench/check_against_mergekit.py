"""Equality check: `evomerge merge` and mergekit 0.1.5 `run_merge` on the same YAML give the same tensors.

    .venv/bin/python bench/check_against_mergekit.py [--tol 1e-5] [--random-tol 0.02]

On a small random Llama family (fp32, base + 3 sources; cached under bench/out/check/) every recipe
below is merged by the evomerge CLI (project venv) and by mergekit (bench/.mergekit-venv), and the
two safetensors outputs are compared tensor by tensor. The recipes exercise per-model parameters,
top-level fallbacks and merge-wide parameters, per-layer gradients and `filter` conditionals.

Deterministic methods must agree to --tol (max abs diff). The random ones (dare_*, della*) draw
different masks by design (evomerge seeds per tensor, mergekit uses the global torch RNG in tensor
order), so for them only the distribution is compared: the share of entries left at the base value
and the L2 norm of the merged task vector, over the whole model.

Round trip: the mergekit_config.yml that evomerge writes beside its output (Recipe.to_mergekit())
is also fed to mergekit (model_validate + run_merge); its output must equal evomerge's output and,
bit for bit, mergekit's output on the original YAML.

Coverage: every parameter-space method of evomerge's catalogue has a recipe here, and every method
mergekit 0.1.5 registers is in the catalogue (passthrough aside: evomerge's recipe layer does it).

Exit status: 0 if every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import OUT, cached_family, load_safetensors, run_mergekit, write_yaml

from evomerge.merge.specs import tensor_method_names
from evomerge.testing.tiny import TinySpec

SPEC = TinySpec(arch="llama", hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=512)
ROOT = OUT / "check"
# the same t -> value mapping in both tools: 3 points over 4 layers, so layers fall between points
GRADIENT = [0.2, 0.8, 0.4]
SETS = ("embed_tokens", "lm_head", "self_attn", "mlp", "norms")
# arcee_fusion is random only above 1M entries per tensor (quartiles of a sample); every tensor here is smaller
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
# mergekit methods that are not per-tensor merges in evomerge: passthrough (copy one model's tensors, with
# `slices:`) belongs to the recipe layer (evomerge/merge/recipe.py), not to the method catalogue
NOT_TENSOR_METHODS = {"passthrough"}


def recipes(b: str, s: list[str]) -> dict[str, dict]:
    """name -> mergekit YAML (dict). b: base path, s: source paths."""
    def model(path, **params):
        return {"model": path, "parameters": params} if params else {"model": path}

    attn_vs_rest = lambda a, rest: [{"filter": "self_attn", "value": a}, {"value": rest}]
    mlp_vs_rest = lambda a, rest: [{"filter": "mlp", "value": a}, {"value": rest}]
    return {
        # no base: a weighted average of the listed models; s2's weight falls back to the top level
        "linear": {
            "merge_method": "linear",
            "models": [model(s[0], weight=GRADIENT), model(s[1], weight=attn_vs_rest(0.7, 0.3)), model(s[2])],
            "parameters": {"weight": 0.25, "normalize": True},
            "dtype": "float32",
        },
        # with base_model, linear merges the base as one more input, weighted by the top-level fallback
        "linear_base": {
            "merge_method": "linear",
            "base_model": b,
            "models": [model(s[0], weight=0.5), model(s[1], weight=mlp_vs_rest(GRADIENT, 0.3))],
            "parameters": {"weight": 0.1, "normalize": False},
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": [model(s[0], weight=GRADIENT), model(s[1], weight=mlp_vs_rest(0.9, 0.4)), model(s[2])],
            "parameters": {"weight": 0.3, "lambda": 0.8},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": b,
            "models": [
                model(s[0], weight=0.5, density=[0.3, 0.9]),
                model(s[1], weight=attn_vs_rest(0.6, 0.3), density=0.6),
                model(s[2], weight=0.2, density=0.7),
            ],
            "parameters": {"normalize": True, "lambda": 1.1},
            "dtype": "float32",
        },
        "ties_rescale": {
            "merge_method": "ties",
            "base_model": b,
            "models": [model(s[0], weight=0.6), model(s[1], weight=GRADIENT, density=mlp_vs_rest(0.3, 0.8))],
            "parameters": {"density": 0.5, "normalize": False, "rescale": True},
            "dtype": "float32",
        },
        # exactly two models (base + one), t merge-wide: a gradient per filtered tensor group
        "slerp": {
            "merge_method": "slerp",
            "base_model": b,
            "models": [model(b), model(s[0])],
            "parameters": {"t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]},
            "dtype": "float32",
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": b,
            "models": [
                model(s[0], weight=0.5, density=0.8, gamma=0.02),
                model(s[1], weight=0.3, density=[0.6, 0.9]),
                model(s[2], weight=mlp_vs_rest(0.4, 0.2), density=0.7),
            ],
            "parameters": {"gamma": 0.05, "lambda": 0.9},
            "dtype": "float32",
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": b,
            "models": [
                model(s[0], weight=0.5, density=0.8),
                model(s[1], weight=attn_vs_rest(0.5, 0.3), density=0.7, gamma=[0.01, 0.1]),
                model(s[2], weight=0.2, density=0.9),
            ],
            "parameters": {"gamma": 0.03, "normalize": True},
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": b,
            "models": [model(s[0]), model(s[1]), model(s[2])],
            "parameters": {"filter_wise": False},
            "dtype": "float32",
        },
        # random methods: distribution only
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": b,
            "models": [
                model(s[0], weight=0.5, density=0.5),
                model(s[1], weight=0.3, density=[0.4, 0.8]),
                model(s[2], weight=0.2, density=0.7),
            ],
            "dtype": "float32",
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": b,
            "models": [
                model(s[0], weight=0.5, density=0.5),
                model(s[1], weight=0.3, density=0.6),
                model(s[2], weight=0.2, density=0.7),
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "della": {
            "merge_method": "della",
            "base_model": b,
            "models": [
                model(s[0], weight=0.5, density=0.5),
                model(s[1], weight=0.3, density=0.6, epsilon=0.1),
                model(s[2], weight=0.2, density=0.7),
            ],
            "parameters": {"epsilon": 0.15, "lambda": 1.0},
            "dtype": "float32",
        },
        "della_linear": {
            "merge_method": "della_linear",
            "base_model": b,
            "models": [model(s[0], weight=0.5, density=0.4), model(s[1], weight=0.5, density=0.6)],
            "dtype": "float32",
        },
        # -- methods added with mergekit 0.1.5 (task vectors here are N(0, 0.02^2): thresholds of 0.01
        # leave about 40% of each model's entries below them, so every branch of a mask is taken) --
        # nuslerp: t = w2 / (w1 + w2) per tensor; the whole tensor as one vector, then per row, per column
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [model(s[0], weight=0.3), model(s[1], weight=attn_vs_rest(0.7, GRADIENT))],
            "dtype": "float32",
        },
        "nuslerp_rows": {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [model(s[0], weight=0.6), model(s[1], weight=0.4)],
            "parameters": {"nuslerp_flatten": False},
            "dtype": "float32",
        },
        "nuslerp_columns": {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [model(s[0], weight=GRADIENT), model(s[1], weight=0.5)],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "float32",
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": b,
            "models": [model(s[0], weight=0.5), model(s[1], weight=GRADIENT), model(s[2], weight=mlp_vs_rest(0.2, 0.6))],
            "dtype": "float32",
        },
        "multislerp_unnormalized": {
            "merge_method": "multislerp",
            "base_model": b,
            "models": [model(s[0], weight=0.5), model(s[1], weight=0.7)],
            "parameters": {"normalize_weights": False, "eps": 1e-6},
            "dtype": "float32",
        },
        # karcher: every input counts, the base (appended last) included
        "karcher": {
            "merge_method": "karcher",
            "base_model": b,
            "models": [model(s[0]), model(s[1]), model(s[2])],
            "dtype": "float32",
        },
        "karcher_no_base": {
            "merge_method": "karcher",
            "models": [model(s[0]), model(s[1])],
            "parameters": {"max_iter": 3, "tol": 1e-4},
            "dtype": "float32",
        },
        "sce": {
            "merge_method": "sce",
            "base_model": b,
            "models": [model(s[0]), model(s[1]), model(s[2])],
            "parameters": {"select_topk": mlp_vs_rest(0.3, GRADIENT)},
            "dtype": "float32",
        },
        "sce_all": {
            "merge_method": "sce",
            "base_model": b,
            "models": [model(s[0]), model(s[1])],
            "dtype": "float32",
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": b,
            "models": [model(s[0])],
            "parameters": {"t": attn_vs_rest(0.01, [0.0, 0.02, 0.005])},
            "dtype": "float32",
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": b,
            "models": [model(s[1])],
            "dtype": "float32",
        },
        "ram": {
            "merge_method": "ram",
            "base_model": b,
            "models": [model(s[0]), model(s[1]), model(s[2])],
            "parameters": {"epsilon": 0.01},
            "dtype": "float32",
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": b,
            "models": [model(s[0]), model(s[1]), model(s[2])],
            "parameters": {"epsilon": mlp_vs_rest(0.01, 0.02), "r": 0.5, "alpha": GRADIENT},
            "dtype": "float32",
        },
    }


def coverage_failures(docs: dict[str, dict], mergekit_methods: list[str]) -> list[str]:
    """Every evomerge parameter-space method has a recipe here, and every method mergekit registers is one of
    them, except those evomerge expresses otherwise (NOT_TENSOR_METHODS)."""
    tested = {doc["merge_method"] for doc in docs.values()}
    ours = set(tensor_method_names())
    out = [f"{m}: evomerge method without a recipe in this check" for m in sorted(ours - tested)]
    out += [f"{m}: mergekit 0.1.5 method that evomerge lacks" for m in sorted(set(mergekit_methods) - ours - NOT_TENSOR_METHODS)]
    return out


def tensor_set(name: str) -> str:
    for key in ("embed_tokens", "lm_head", "self_attn", "mlp"):
        if key in name:
            return key
    return "norms"  # input/post-attention layernorms and the final norm


def max_diff_by_set(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs diff per tensor set; raises if the two outputs do not hold the same tensors."""
    if a.keys() != b.keys():
        raise AssertionError(f"different tensor names: only in first {sorted(a.keys() - b.keys())}, "
                             f"only in second {sorted(b.keys() - a.keys())}")
    out: dict[str, float] = {}
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise AssertionError(f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        s = tensor_set(name)
        out[s] = max(out.get(s, 0.0), d)
    return out


def distribution(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(share of entries equal to the base, L2 norm of out - base) over the whole model."""
    same = total = 0
    sq = 0.0
    for name, t in out.items():
        d = t.double() - base[name].double()
        same += int((d == 0).sum())
        total += d.numel()
        sq += float((d * d).sum())
    return same / total, sq**0.5


def run_evomerge(yml: Path, out: Path) -> tuple[bool, str]:
    """The CLI as a user runs it (same interpreter as this script, i.e. the project venv); (ok, last output line)."""
    cmd = [sys.executable, "-m", "evomerge", "merge", str(yml), "--out", str(out), "--force", "--seed", "0"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs diff, deterministic methods (default 1e-5)")
    ap.add_argument("--random-tol", type=float, default=0.02,
                    help="random methods: allowed gap in the share of base-valued entries and relative gap in the "
                         "merged task vector's L2 norm (default 0.02)")
    args = ap.parse_args()
    wall = time.perf_counter()

    family = cached_family(ROOT / "family", SPEC, n_sources=3)
    base, sources = str(family.base.resolve()), [str(p.resolve()) for p in family.sources]
    docs = recipes(base, sources)
    ymls = {name: write_yaml(ROOT / "recipes" / f"{name}.yml", doc) for name, doc in docs.items()}
    evo_dir, mk_dir, rt_dir = ROOT / "evomerge", ROOT / "mergekit", ROOT / "mergekit_roundtrip"

    failures: list[str] = []
    t0 = time.perf_counter()
    for name, yml in ymls.items():
        ok, last = run_evomerge(yml, evo_dir / name)
        if not ok:
            failures.append(f"{name}: evomerge merge failed: {last}")
    evo_s = time.perf_counter() - t0

    jobs = [{"name": name, "yaml": str(yml), "out": str(mk_dir / name)} for name, yml in ymls.items()]
    written = {name: evo_dir / name / "mergekit_config.yml" for name in ymls}  # evomerge's Recipe.to_mergekit()
    jobs += [{"name": f"{name}@roundtrip", "yaml": str(y), "out": str(rt_dir / name)}
             for name, y in written.items() if y.is_file()]
    t0 = time.perf_counter()
    result = run_mergekit(jobs, seed=0)
    mk_s = time.perf_counter() - t0
    for job, r in result["jobs"].items():
        if r["error"]:
            failures.append(f"{job}: mergekit failed: {r['error']}")

    failures += coverage_failures(docs, result.get("methods", []))
    base_sd = load_safetensors(family.base)
    print(f"\nfamily: {SPEC}, 3 sources, fp32; mergekit {result['mergekit_version']}; tolerance {args.tol:g}")
    print("max |evomerge - mergekit| per tensor set (roundtrip: mergekit on evomerge's mergekit_config.yml "
          "vs evomerge; rt-vs-orig: mergekit roundtrip vs mergekit original)\n")
    w = max(map(len, ymls)) + 1
    print(f"{'recipe':<{w}}" + "".join(f"{s:>13}" for s in SETS) + f"{'roundtrip':>11}{'rt-vs-orig':>11}  verdict")
    for name in ymls:
        paths = [evo_dir / name, mk_dir / name, rt_dir / name]
        if not all(p.is_dir() and any(p.glob("*.safetensors")) for p in paths):
            print(f"{name:<{w}}  missing output (see failures)")
            continue
        evo, mk, rt = (load_safetensors(p) for p in paths)
        try:
            diffs = max_diff_by_set(evo, mk)
            rt_diff = max(max_diff_by_set(evo, rt).values())
            rt_orig = max(max_diff_by_set(mk, rt).values())
        except AssertionError as e:
            failures.append(f"{name}: {e}")
            print(f"{name:<{w}}  {e}")
            continue
        row = f"{name:<{w}}" + "".join(f"{diffs.get(s, float('nan')):>13.2e}" for s in SETS)
        if name in RANDOM_METHODS:
            (share_e, norm_e), (share_m, norm_m) = distribution(evo, base_sd), distribution(mk, base_sd)
            close = abs(share_e - share_m) <= args.random_tol and abs(norm_e / norm_m - 1) <= args.random_tol
            ok = close and rt_orig == 0
            verdict = (f"{'ok' if ok else 'FAIL'} (random: at-base share {share_e:.4f} vs {share_m:.4f}, "
                       f"|delta| {norm_e:.4f} vs {norm_m:.4f})")
            row += f"{'-':>11}{rt_orig:>11.2e}  {verdict}"
        else:
            ok = max(diffs.values()) <= args.tol and rt_diff <= args.tol and rt_orig == 0
            row += f"{rt_diff:>11.2e}{rt_orig:>11.2e}  {'ok' if ok else 'FAIL'}"
            if distribution(evo, base_sd)[1] == 0:  # agreeing on "nothing merged" would prove nothing
                ok = False
                row += " (the merge left every tensor at the base)"
        if not ok:
            failures.append(f"{name}: outside tolerance")
        print(row)

    print(f"\nevomerge CLI {evo_s:.1f} s for {len(ymls)} merges (one process each); mergekit {mk_s:.1f} s for "
          f"{len(jobs)} merges (one process); total {time.perf_counter() - wall:.1f} s")
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
