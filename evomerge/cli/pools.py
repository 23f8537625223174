"""Which pool evaluates the candidates of `search`, `resume` and `demo`: Ray workers, or this process."""

from __future__ import annotations

import argparse


def add_pool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray on loopback)")
    p.add_argument("--in-process", action="store_true", help="no Ray: evaluate in this process, one at a time")
    p.add_argument("--device", default=None, help="where candidates are materialized and scored (default: cuda for "
                   "GPU workers, else cpu)")


def make_pool(prepared, args: argparse.Namespace, console):
    """`--in-process`: one evaluator here; else Ray workers (each loads the sources once, which takes a while)."""
    if args.in_process:
        from evomerge.worker.local_pool import LocalPool

        return LocalPool(prepared, device=args.device or "cpu")
    from evomerge.search.pool import RayPool
    from evomerge.worker.evaluator import Evaluator

    with console.status("starting Ray workers (sources are loaded once per worker)"):
        pool = RayPool(prepared, Evaluator, address=args.address, device=args.device)
    console.log(f"{pool.count} Ray worker(s) ready")
    return pool

