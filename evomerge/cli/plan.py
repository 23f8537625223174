"""`evomerge plan`: what each search worker will hold, by component and sources setting, and whether it fits.

The options that state the memory the workers get (--device-memory, --host-memory) are shared with `search`,
which refuses, before its run directory exists, a configured setting that does not fit.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _size(option: str):
    def parse(text: str) -> int:
        from evomerge.errors import EvomergeError
        from evomerge.search.capacity import parse_size

        try:
            return parse_size(text, option)
        except EvomergeError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{option}: ")) from None

    return parse


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of workers")
    return int(text)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """--device-memory / --host-memory: the memory the workers will get, instead of this machine's."""
    p.add_argument("--device-memory", type=_size("--device-memory"), default=None, metavar="SIZE",
                   help="free memory of each worker's GPU, e.g. 80GB or 79.2GiB; plans for GPU workers (default: "
                   "the free memory of this machine's GPUs, when the workers get GPUs)")
    p.add_argument("--host-memory", type=_size("--host-memory"), default=None, metavar="SIZE",
                   help="host RAM the workers of a node share, e.g. 256GB (default: this machine's MemAvailable)")


def add_plan_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    plan = sub.add_parser("plan", parents=[common], help="plan each worker's memory from the sources' headers",
                          description="Read the run config, the search space and the sources' config.json and "
                          "safetensors headers (never the weights), and print what each worker holds (sources, live "
                          "model, scratch, caches, activations) for each sources.placement and storage_dtype, "
                          "whether it fits the memory the workers get, and what to set.")
    plan.add_argument("config", type=Path, help="run config YAML")
    add_memory_options(plan)
    plan.add_argument("--workers", type=_count, default=None, metavar="N",
                      help="workers per node (default: as `search` starts them: workers.count, one per GPU, or one "
                      "per 2 CPUs)")
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Column, Table

    from evomerge.config import RunConfig, load_config
    from evomerge.search.capacity import workers_for
    from evomerge.search.memory_plan import plan_search

    config = load_config(args.config, RunConfig)
    workers = workers_for(config, device_memory=args.device_memory, host_memory=args.host_memory,
                          workers=args.workers)
    plan = plan_search(config, args.config.resolve().parent, str(args.config), workers)
    headers, rows = plan.table()
    table = Table(Column(headers[0], no_wrap=True), *(Column(h, justify="right") for h in headers[1:]),
                  title=plan.title(), caption=plan.caption())
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    print(plan.verdict())
    return 0
