"""The demo search vs random search at equal evaluation budgets: hypervolume of the estimated front.

    .venv/bin/evomerge demo [--kit toy]                      # first: the kit, its calibration, the demo run
    .venv/bin/python bench/bench_demo.py [--seeds 0,1,2] [--kit smollm2|toy]

For each seed, NSGA-II runs the demo's search (the SmolLM2 kit's demo.yaml, or runs/demo.yaml for the toy kit;
pop_size x generations evaluations; seed 0 is the demo's own run when it exists) and random search evaluates the same number of genomes: the search space's
seed genomes (the uniform recipes NSGA-II starts from, so neither gets a better prior) and then uniform
random ones. Both are scored by the same Ray workers on the same anchors with the same estimator. Printed:
the hypervolume of each method's front of estimated accuracies (reference point: 0 accuracy on every task;
maximized), per seed and on average, and NSGA-II's gain over random search (goal >= +10%).

With --hybrid (the default for the SmolLM2 kit) each seed's NSGA-II front then seeds the demo's hybrid search
(paths through the specialists' and the front merges' layers; seed 0 reuses the demo's own), and the bench
prints, per objective, the best estimate of a new hybrid front member against the best of the ps front (goal:
a hybrid member beats every ps one on at least one objective).

The held-out comparison (best front model vs the specialists and the best hand recipe) is what
`evomerge demo` prints below its table; DEMO.md in bench/ keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.demo import search_demo as demo
from evomerge.search import pool as ray_pool  # before anything imports Ray (it sets Ray's auth mode)
from evomerge.search.driver import candidates_of, objectives_of
from evomerge.search.session import create_run, drive, open_run, status
from evomerge.worker.evaluator import Evaluator


def hypervolume(points: np.ndarray) -> float:
    """Hypervolume dominated by `points` (maximized accuracies in [0, 1]) above the reference point 0."""
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=np.zeros(points.shape[1]))(-points)) if len(points) else 0.0


def absolute_paths(config: dict) -> dict:
    """runs/demo.yaml with its paths (relative to runs/) made absolute, to be written elsewhere."""
    here = demo.DEMO_CONFIG.parent
    absolute = lambda p: str((here / p).resolve())  # noqa: E731
    sources, fitness = config["sources"], config["fitness"]
    return {**config,
            "sources": {"models": {n: absolute(p) for n, p in sources["models"].items()},
                        "base_model": absolute(sources["base_model"])},
            "fitness": {**fitness, "calibration": absolute(fitness["calibration"]),
                        "task_paths": [absolute(p) for p in fitness["task_paths"]]}}


def nsga2_points(run, prepared, pool) -> tuple[np.ndarray, int]:
    drive(run, prepared, pool)  # continues or finishes it; a finished run evaluates nothing
    tasks = [o.name for o in objectives_of(prepared.config) if o.task]
    with run.open_ledger() as ledger:
        records = ledger.all("ok")
        done = sum(ledger.counts().values())
    return np.array([[-r.objectives[t] for t in tasks] for r in records]), done


def random_points(prepared, pool, seed: int, budget: int) -> np.ndarray:
    config = prepared.config
    dim = prepared.space.dim(prepared.layer_counts)
    rng = np.random.default_rng(seed + 10_000)  # not the search's own stream
    seeds = prepared.space.initial(prepared.layer_counts)
    X = np.vstack([seeds, rng.random((budget - len(seeds), dim))])[:budget]
    cands, _ = candidates_of(X, 0, seed, prepared.decode)
    objectives = [o for o in objectives_of(config) if o.task]
    points = []
    for r in pool.evaluate(cands):
        if r.ok:
            points.append([r.estimates[o.task][config.fitness.estimator] for o in objectives])
    return np.array(points)


def hybrid_verdicts(run, prepared, stage, start_pool) -> tuple[list[str], Path, list[dict]]:
    """Per objective: the best new hybrid front member's estimate against the best ps front member's; and the
    hybrid run's directory and new front members."""
    from contextlib import closing

    front = status(run, prepared)["front"]
    h_run, h_prepared = demo.open_hybrid_run(run.path, prepared, front, stage)
    state = status(h_run, h_prepared)
    if state["generation"] < state["generations"]:  # a finished one (the demo's own) needs no workers
        with closing(start_pool(h_prepared)) as pool:
            drive(h_run, h_prepared, pool)
    new = demo.new_front(h_run, h_prepared, status(h_run, h_prepared)["front"])
    lines = []
    for task in demo.SEARCHED:
        ps = max(float(f["objectives"][task]) for f in front)
        hy = max((float(f["objectives"][task]) for f in new), default=None)
        verdict = "none new" if hy is None else f"{100 * hy:.1f}% ({'beats' if hy > ps else 'does not beat'} ps)"
        lines.append(f"{task}: best hybrid {verdict} vs best ps {100 * ps:.1f}%")
    return [f"{len(new)} new hybrid front member(s)"] + lines, h_run.path, new


def held_out(run, prepared, hand: dict, hybrid_dir: Path | None, hybrid: list[dict], tasks_dir: Path) -> list[str]:
    """The demo's held-out comparison for this seed's fronts (the hand recipes are the demo's: they do not
    depend on the seed), kept in the run directory like the demo's table."""
    from evomerge.demo.pipeline import export_fronts

    front = status(run, prepared)["front"]
    rows = demo.cached_table(run.path, front, hybrid)
    if rows is None:
        fronts = [(run.path, front)] + ([(hybrid_dir, hybrid)] if hybrid_dir is not None else [])
        exported = export_fronts(fronts, lambda line: None)
        rows = demo.held_out_table(prepared, run.path, hand, front, exported, lambda line: None, tasks_dir,
                                   hybrid=hybrid)
    return demo.summary(rows, hybrid_searched=hybrid_dir is not None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--out", type=Path, default=Path("bench/out/demo_bench"), help="where the runs go")
    p.add_argument("--kit", choices=("smollm2", "toy"), default="smollm2", help="the demo kit (default: smollm2)")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the hybrid search on each seed's front (default: on for smollm2)")
    p.add_argument("--held-out", action="store_true",
                   help="also score each seed's fronts on the held-out splits against the demo's hand recipes "
                   "and specialists, as `evomerge demo` does for its own run (SmolLM2 kit; minutes per seed)")
    args = p.parse_args()
    hybrid = args.kit == "smollm2" if args.hybrid is None else args.hybrid
    if args.kit == "smollm2":
        from evomerge.demo.smollm2_kit import RUN_CONFIG, TASKS, kit_config, kit_root

        root = kit_root(demo.DEFAULT_CACHE, kit_config("full"))
        calibration, config = root / "calibration.json", root / RUN_CONFIG  # the kit's config: absolute paths
        demo_run, out = demo.DEFAULT_RUN_DIR.with_name("demo-smollm2"), args.out / "smollm2"
    else:
        calibration, config = demo.DEFAULT_CACHE / "kit" / "calibration.json", demo.DEMO_CONFIG
        demo_run, out = demo.DEFAULT_RUN_DIR, args.out
    if not (calibration.is_file() and config.is_file()):
        print(f"run `evomerge demo --kit {args.kit}` first: it builds the kit and its calibration", file=sys.stderr)
        return 2
    base = yaml.safe_load(config.read_text())
    base = absolute_paths(base) if args.kit == "toy" else base
    rows = []
    pool = None
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            run_dir = demo_run if seed == base["seed"] and demo_run.is_dir() else out / f"nsga2-seed{seed}"
            if not (run_dir / "config.yaml").is_file():
                path = out / f"demo-seed{seed}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump({**base, "seed": seed, "name": f"demo-seed{seed}"}))
                create_run(path, run_dir)
            run, prepared = open_run(run_dir)
            if pool is None:
                pool = ray_pool.RayPool(prepared, Evaluator)  # any demo candidate: same sources, tasks and anchors
            t = time.perf_counter()
            ga, done = nsga2_points(run, prepared, pool)
            t_ga = time.perf_counter() - t
            t = time.perf_counter()
            rs = random_points(prepared, pool, seed, done)
            t_rs = time.perf_counter() - t
            rows.append((seed, done, hypervolume(ga), hypervolume(rs), t_ga, t_rs))
            print(f"seed {seed}: {done} evaluations each; hypervolume NSGA-II {rows[-1][2]:.4f}, random "
                  f"{rows[-1][3]:.4f} ({100 * (rows[-1][2] / rows[-1][3] - 1):+.1f}%)", flush=True)
            if hybrid:
                from evomerge.demo.smollm2_kit import kit_config

                pool.close()  # its workers hold the node's CPUs: the hybrid search starts its own
                pool = None

                kit = kit_config("full")
                stage = demo.HybridStage(kit.hybrid_pop_size, kit.hybrid_generations)
                t = time.perf_counter()
                lines, hybrid_dir, new = hybrid_verdicts(run, prepared, stage,
                                                         lambda hp: ray_pool.RayPool(hp, Evaluator))
                print(f"  hybrid ({time.perf_counter() - t:.0f} s): " + "; ".join(lines), flush=True)
            if args.held_out and args.kit == "smollm2":
                hand = json.loads((demo_run / demo.HAND_FILE).read_text())
                t = time.perf_counter()
                lines = held_out(run, prepared, hand, hybrid_dir if hybrid else None, new if hybrid else [],
                                 root / TASKS)
                print(f"  held-out ({time.perf_counter() - t:.0f} s):\n    " + "\n    ".join(lines), flush=True)
    finally:
        if pool is not None:
            pool.close()
    ga_mean, rs_mean = np.mean([r[2] for r in rows]), np.mean([r[3] for r in rows])
    print(f"mean over {len(rows)} seeds: NSGA-II {ga_mean:.4f}, random {rs_mean:.4f}: "
          f"{100 * (ga_mean / rs_mean - 1):+.1f}% (goal >= +10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
