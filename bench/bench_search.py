"""Search throughput: candidates per hour with 1 vs 2 Ray workers on the same search, where an evaluation's
time goes (the share outside model forward passes), and resume overhead.

    .venv/bin/python bench/bench_search.py [--pop 8] [--generations 4] [--hidden 32 --layers 4] [--anchors 6]

Builds a search workspace like the tests' (bench/out/search_ws-HxLxA; --hidden/--layers size its models,
--items/--anchors its tasks), then runs the same seeded search with 1 and with 2 workers (pool start-up
excluded: sources load once per worker) and prints candidates per hour and their ratio (goal >= 1.8x), the fronts' equality,
the split of evaluation wall time from the workers' own timings in the ledger (goal: <= 10% outside
forward passes), and the time `resume` takes on a finished run (checkpoint load + ledger lookups).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import time
from pathlib import Path

import yaml

from evomerge.search import pool as ray_pool  # before anything imports Ray (it sets Ray's auth mode)
from evomerge.search.session import create_run, drive, open_run, status
from evomerge.testing.tiny import TinySpec
from evomerge.testing.workspace import make_search_workspace
from evomerge.worker.evaluator import Evaluator

PARTS = ("materialize", "check", "forward", "score outside forward", "estimate", "other")


def time_split(run_dir: Path) -> dict[str, float]:
    """Seconds per part of evaluation, summed over the ledger's finished evaluations (the workers' clocks)."""
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        rows = [json.loads(t) for (t,) in db.execute("SELECT timings FROM evaluations WHERE status = 'ok'")]
    total = {k: sum(r.get(k, 0.0) for r in rows) for k in ("materialize", "check", "score", "forward",
                                                            "estimate", "total")}
    split = {"materialize": total["materialize"], "check": total["check"], "forward": total["forward"],
             "score outside forward": total["score"] - total["forward"], "estimate": total["estimate"]}
    split["other"] = total["total"] - sum(split.values())
    return {**split, "total": total["total"]}


def run_once(root: Path, n_workers: int, pop: int, generations: int) -> tuple[float, int, dict]:
    config = yaml.safe_load((root / "run.yaml").read_text())
    config.update(workers={"count": n_workers, "cpus_per_worker": 1},
                  algorithm={"pop_size": pop, "generations": generations})
    path = root / f"run-{n_workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = root / "runs" / f"w{n_workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run, prepared = create_run(path, run_dir)
    with ray_pool.RayPool(prepared, Evaluator) as pool:
        start = time.perf_counter()
        drive(run, prepared, pool)
        seconds = time.perf_counter() - start
        state = status(run, prepared)
        resume_start = time.perf_counter()
        run, prepared = open_run(run_dir)
        drive(run, prepared, pool)  # finished: nothing left to evaluate
        resume = time.perf_counter() - resume_start
    ray_pool.ray.shutdown()
    return seconds, state["evaluations"]["done"], {"front": state["front"], "resume_s": resume,
                                                     "split": time_split(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pop", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32, help="hidden size of the models (default: the tests' 32)")
    p.add_argument("--layers", type=int, default=4, help="layers of the models (default: 4)")
    p.add_argument("--items", type=int, default=30, help="items per task (default: the tests' 30)")
    p.add_argument("--anchors", type=int, default=6, help="anchor items scored per task (default: the tests' 6)")
    p.add_argument("--out", type=Path, default=None, help="workspace (default: bench/out/search_ws-HxLxA)")
    args = p.parse_args()
    args.out = args.out or Path(f"bench/out/search_ws-{args.hidden}x{args.layers}x{args.anchors}")
    if not (args.out / "calibration.json").is_file():
        shutil.rmtree(args.out, ignore_errors=True)
        spec = TinySpec(hidden=args.hidden, layers=args.layers, heads=max(4, args.hidden // 64),
                        kv_heads=max(2, args.hidden // 128), intermediate=4 * args.hidden)
        make_search_workspace(args.out, spec=spec, items=args.items, anchors=args.anchors)
    results = {n: run_once(args.out, n, args.pop, args.generations) for n in (1, 2)}
    rate = {n: 3600 * done / seconds for n, (seconds, done, _) in results.items()}
    for n, (seconds, done, extra) in results.items():
        print(f"{n} worker(s): {done} candidates in {seconds:.1f} s = {rate[n]:,.0f} candidates/hour; "
              f"resume of the finished run {extra['resume_s']:.2f} s")
    print(f"2 vs 1 workers: {rate[2] / rate[1]:.2f}x (goal >= 1.8x); fronts equal: "
          f"{results[1][2]['front'] == results[2][2]['front']}")
    split = results[1][2]["split"]  # one worker: its clocks are not slowed by a second worker on the cores
    print("evaluation wall time, 1 worker: " + ", ".join(f"{k} {100 * split[k] / split['total']:.1f}%"
                                                          for k in PARTS))
    print(f"outside model forward passes: {100 * (1 - split['forward'] / split['total']):.1f}% (goal <= 10%)")


if __name__ == "__main__":
    main()
