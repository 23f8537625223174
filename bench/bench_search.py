"""Search throughput: candidates per hour with 1 vs 2 Ray workers on the same search, and resume overhead.

    .venv/bin/python bench/bench_search.py [--pop 8] [--generations 4]

Builds the tiny search workspace of the tests (bench/out/search_ws), then runs the same seeded search
with 1 and with 2 workers (pool start-up excluded: sources load once per worker) and prints candidates
per hour and their ratio (goal >= 1.8x), the fronts' equality, and the time `resume` takes on a finished
run (checkpoint load + ledger lookups, no evaluation).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from evomerge.search import workers  # before anything imports Ray (it sets Ray's auth mode)
from evomerge.search.session import create_run, drive, open_run, status
from evomerge.testing.workspace import make_search_workspace


def run_once(root: Path, n_workers: int, pop: int, generations: int) -> tuple[float, int, dict]:
    config = yaml.safe_load((root / "run.yaml").read_text())
    config.update(workers={"count": n_workers, "cpus_per_worker": 1},
                  algorithm={"pop_size": pop, "generations": generations})
    path = root / f"run-{n_workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = root / "runs" / f"w{n_workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run, prepared = create_run(path, run_dir)
    with workers.RayPool(prepared) as pool:
        start = time.perf_counter()
        drive(run, prepared, pool)
        seconds = time.perf_counter() - start
        state = status(run, prepared)
        resume_start = time.perf_counter()
        run, prepared = open_run(run_dir)
        drive(run, prepared, pool)  # finished: nothing left to evaluate
        resume = time.perf_counter() - resume_start
    workers.ray.shutdown()
    return seconds, state["evaluations"]["done"], {"front": state["front"], "resume_s": resume}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pop", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench/out/search_ws"))
    args = p.parse_args()
    if not (args.out / "calibration.json").is_file():
        shutil.rmtree(args.out, ignore_errors=True)
        make_search_workspace(args.out)
    results = {n: run_once(args.out, n, args.pop, args.generations) for n in (1, 2)}
    rate = {n: 3600 * done / seconds for n, (seconds, done, _) in results.items()}
    for n, (seconds, done, extra) in results.items():
        print(f"{n} worker(s): {done} candidates in {seconds:.1f} s = {rate[n]:,.0f} candidates/hour; "
              f"resume of the finished run {extra['resume_s']:.2f} s")
    print(f"2 vs 1 workers: {rate[2] / rate[1]:.2f}x (goal >= 1.8x); fronts equal: "
          f"{results[1][2]['front'] == results[2][2]['front']}")


if __name__ == "__main__":
    main()
