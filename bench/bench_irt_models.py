"""How many calibration models does the IRT fit need to be informative?

For each number of calibration models M, simulate a 2PL task, calibrate on M models, and score held-out models
of the same population on the anchors: mean absolute error of anchor_mean, pirt and gpirt against their true
full-task accuracy, averaged over repetitions (fresh items and models each time), with the share of
repetitions where p-IRT beats the anchor mean and the mean fitted gp-IRT lambda; "gp, lambda 0.5" mixes the two
with MERGE^3's fixed weight instead of the fitted one; random_mean (no calibration) is the plain mean of a fresh
uniform random subset of as many items per held-out model.

    .venv/bin/python bench/bench_irt_models.py                         # 40 items, 10 and 30 anchors (the probe)
    .venv/bin/python bench/bench_irt_models.py --items 1000 --anchors 30 --dims-true 2

M = 3 is below what calibration accepts (MIN_MODELS); the bench lowers that floor to measure it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.fitness import calibration_fit
from evomerge.fitness.calibration_fit import fit_calibration
from evomerge.fitness.estimators import estimate
from evomerge.fitness.responses import Responses

ESTIMATORS = ["anchor_mean", "pirt", "gpirt"]


def one(m: int, n_anchors: int, args: argparse.Namespace, rep: int) -> dict:
    rng = np.random.default_rng([args.seed, m, n_anchors, rep])
    n, d = args.items, args.dims_true
    a = rng.lognormal(0.0, 0.3, size=(n, d)) * args.disc / np.sqrt(d)
    b = rng.normal(0.0, 1.5 * args.disc, size=n)

    def answers(count: int) -> np.ndarray:
        theta = rng.normal(size=(count, d))
        return (rng.random((count, n)) < expit(theta @ a.T - b)).astype(np.float64)

    calib = Responses([f"m{i}" for i in range(m)], [f"q{j}" for j in range(n)], answers(m), "simulated")
    heldout = answers(args.heldout_models)
    truth = heldout.mean(axis=1)
    # no calibration at all: the plain mean of a fresh uniform random subset of n items per model
    subsets = [rng.choice(n, n_anchors, replace=False) for _ in heldout]
    out = {"random_mean": float(np.mean(np.abs(np.array([r[s].mean() for r, s in zip(heldout, subsets)]) - truth)))}
    fixed = {"dims": 1, "a_sd": 0.1} if args.fixed else {"dims": args.dims}
    cal = fit_calibration({"t": calib}, n_anchors=n_anchors, seed=rep, anchor_method=args.method, **fixed)
    ids = cal.anchors("t")
    cols = [calib.items.index(i) for i in ids]
    est = [estimate(cal, "t", ids, row[cols], ESTIMATORS) for row in heldout]
    out |= {name: float(np.mean(np.abs(np.array([e[name] for e in est]) - truth))) for name in ESTIMATORS}
    # gp-IRT with MERGE^3's fixed lambda 0.5 instead of the fitted one
    mix = np.array([0.5 * e["anchor_mean"] + 0.5 * e["pirt"] for e in est])
    out["gp_half"] = float(np.mean(np.abs(mix - truth)))
    out["lambda"] = cal.task("t").lambdas["gpirt"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="3,4,5,6,8,10,12,15,20,30,50", help="numbers of calibration models")
    p.add_argument("--items", type=int, default=40)
    p.add_argument("--anchors", default="10,30", help="anchor counts, comma-separated")
    p.add_argument("--method", default="irt", help="anchor method (irt, correctness, random)")
    p.add_argument("--dims", type=int, default=None, help="fix the IRT dimension (default: chosen on held-out)")
    p.add_argument("--fixed", action="store_true", help="D = 1 and slope sd 0.1: no held-out choice of either")
    p.add_argument("--dims-true", type=int, default=1)
    p.add_argument("--disc", type=float, default=1.5, help="scale of the simulated slopes and difficulties")
    p.add_argument("--heldout-models", type=int, default=100)
    p.add_argument("--reps", type=int, default=20, help="repetitions (fresh task and models) per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "bench_irt_models.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    calibration_fit.MIN_MODELS = 3  # measure below the floor too
    rows = []
    print(f"{args.items} items, true D={args.dims_true}, {args.method} anchors{' (D=1, a_sd=0.1)' * args.fixed}, "
          f"{args.reps} repetitions, "
          f"{args.heldout_models} held-out models each; MAE of the full-task accuracy estimate")
    print("| anchors | M | random_mean | anchor_mean | pirt | gpirt | gp, lambda 0.5 | pirt < anchor_mean "
          "| gpirt <= anchor_mean | lambda | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n_anchors in [int(x) for x in args.anchors.split(",")]:
        for m in [int(x) for x in args.models.split(",")]:
            start = time.perf_counter()
            res = [one(m, n_anchors, args, rep) for rep in range(args.reps)]
            mean = {k: float(np.mean([r[k] for r in res])) for k in res[0]}
            wins = float(np.mean([r["pirt"] < r["anchor_mean"] for r in res]))
            gwins = float(np.mean([r["gpirt"] <= r["anchor_mean"] for r in res]))
            rows.append({"anchors": n_anchors, "models": m, **mean, "pirt_wins": wins, "gpirt_wins": gwins})
            print(f"| {n_anchors} | {m} | {mean['random_mean']:.4f} | {mean['anchor_mean']:.4f} | {mean['pirt']:.4f} | {mean['gpirt']:.4f} | "
                  f"{mean['gp_half']:.4f} | "
                  f"{wins:.0%} | {gwins:.0%} | {mean['lambda']:.2f} | {time.perf_counter() - start:.0f} |",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
