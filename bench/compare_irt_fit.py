"""Own 2PL MAP fit (evomerge.fitness.irt) vs py-irt 0.7.1 (variational, hierarchical priors) on the same data.

    .venv/bin/python bench/compare_irt_fit.py [--epochs 2000]

py-irt lives in its own venv, bench/out/pyirt-venv (git-ignored), never in evomerge's dependencies:
    python3 -m venv bench/out/pyirt-venv
    grep '^torch==' constraints.txt > bench/out/pyirt-constraints.txt   # py-irt wants pandas<3, rich<14
    bench/out/pyirt-venv/bin/pip install -c bench/out/pyirt-constraints.txt py-irt==0.7.1

For each simulated data set (known item parameters): wall time, correlation of the recovered b (and a for D=1)
with the truth, and what matters downstream: the p-IRT error on 200 held-out models scored on 100 random items,
and the slope of predicted vs true accuracy with all items seen (1 = no attenuation of abilities).
Both fits' parameters are put on the same footing (abilities standardised over the calibration models) first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.special import expit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.fitness.irt import ItemParams, Prior, fit_ability
from evomerge.fitness.irt_fit import _standardize, fit_2pl

VENV_PY = ROOT / "bench" / "out" / "pyirt-venv" / "bin" / "python"


def simulate(m: int, n: int, d: int, heldout: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.lognormal(0.0, 0.3 if d > 1 else 0.5, size=(n, d)) * 2.0 / np.sqrt(d)
    b = rng.normal(0.0, 3.0, size=n)
    theta = rng.normal(size=(m + heldout, d))
    y = (rng.random((m + heldout, n)) < expit(theta @ a.T - b)).astype(np.float64)
    return a, b, y[:m], y[m:]


def downstream(items: ItemParams, held: np.ndarray, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    truth = held.mean(axis=1)
    errs = []
    for row, acc in zip(held, truth):
        idx = rng.choice(held.shape[1], 100, replace=False)
        theta = fit_ability(items.take(idx), row[idx][None])
        p = items.prob(theta)[0]
        p[idx] = row[idx]
        errs.append(abs(p.mean() - acc))
    pred = items.prob(fit_ability(items, held)).mean(axis=1)
    return float(np.mean(errs)), float(np.polyfit(truth, pred, 1)[0])


def pyirt(y: np.ndarray, d: int, epochs: int) -> tuple[ItemParams, np.ndarray, float]:
    out = ROOT / "bench" / "out" / "pyirt"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "y.npz", y=y)
    model = "2pl" if d == 1 else "multidim_2pl"
    subprocess.run([str(VENV_PY), str(ROOT / "bench" / "pyirt_runner.py"), str(out / "y.npz"), str(out / "fit.json"),
                    "--model", model, "--dims", str(d), "--epochs", str(epochs)], check=True, capture_output=True)
    r = json.loads((out / "fit.json").read_text())
    theta, a, b = _standardize(np.array(r["theta"]), np.array(r["a"]), np.array(r["b"]))
    return ItemParams(a, b), theta, r["seconds"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2000, help="py-irt epochs (its default, and tinyBenchmarks')")
    p.add_argument("--skip-pyirt", action="store_true", help="own fits only")
    p.add_argument("--cases", default="0,1,2", help="which data sets (0: 1-D 40x5000, 1: 1-D 300x200, 2: 3-D 40x5000)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "compare_irt_fit.json")
    args = p.parse_args()
    if not VENV_PY.exists() and not args.skip_pyirt:
        sys.exit(f"no py-irt venv at {VENV_PY}: see this script's docstring")
    cases = [("1-D, 40 x 5000", 40, 5000, 1), ("1-D, 300 x 200", 300, 200, 1), ("3-D, 40 x 5000", 40, 5000, 3)]
    rows = []
    for label, m, n, d in (cases[int(i)] for i in args.cases.split(",")):
        a, b, y, held = simulate(m, n, d, 200, seed=m + n + d)
        fits = {}
        for name, a_sd in (("own, a_sd=0.03", 0.03), ("own, a_sd=1", 1.0)):
            f = fit_2pl(y, d, prior=Prior(a_sd=a_sd))
            fits[name] = (f.items, f.theta, f.seconds)
        if not args.skip_pyirt:
            try:
                fits["py-irt"] = pyirt(y, d, args.epochs)
            except subprocess.CalledProcessError as e:
                # multidim_2pl diverges to NaN on the 3-D case (measured twice, after ~280 s)
                last = e.stderr.decode(errors="replace").strip().splitlines()[-3:] if e.stderr else []
                rows.append({"data": label, "fit": "py-irt", "failed": " ".join(last)[:300]})
                print(json.dumps(rows[-1]), flush=True)
        for name, (items, _theta, seconds) in fits.items():
            mae, slope = downstream(items, held, seed=1)
            row = {"data": label, "fit": name, "seconds": seconds, "corr_b": float(np.corrcoef(items.b, b)[0, 1]),
                   "corr_a": float(np.corrcoef(items.a[:, 0], a[:, 0])[0, 1]) if d == 1 else None,
                   "pirt_mae_100": mae, "slope_all_items": slope}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| data | fit | seconds | corr b | corr a | p-IRT MAE (100 items) | slope, all items |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['data']} | {r['fit']} | failed: {r['failed'][:80]} | | | | |")
            continue
        ca = "-" if r["corr_a"] is None else f"{r['corr_a']:.3f}"
        print(f"| {r['data']} | {r['fit']} | {r['seconds']:.1f} | {r['corr_b']:.3f} | {ca} | {r['pirt_mae_100']:.4f} | "
              f"{r['slope_all_items']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
