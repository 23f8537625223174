"""`evomerge demo`: runs evomerge.demo.pipeline with a rich display and the chosen pool, prints its table.

Library imports sit inside the command, so `evomerge --help` loads no torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evomerge.cli.pools import add_pool_options


def add_demo_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo", parents=[common], help="the demo search: train a tiny base and two specialists, search merges of "
        "them, export the front, and compare it with the specialists and hand recipes on held-out test items",
        description="Build the demo kit (once, cached in .cache/demo), calibrate (once per kit), run the NSGA-II "
        "search of runs/demo.yaml (resumed if interrupted), score a grid of hand recipes the same way, export the "
        "front, and print a table on the held-out test splits. Seeded: the same command prints the same table.")
    demo.add_argument("--run-dir", type=Path, default=None, help="the demo run directory (default: runs/demo)")
    add_pool_options(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evomerge.cli.pools import make_pool
    from evomerge.cli.progress import RichDemoUI
    from evomerge.demo.pipeline import run_demo

    start = time.perf_counter()
    console = Console(stderr=True)
    result = run_demo(args.run_dir, lambda prepared: make_pool(prepared, args, console), RichDemoUI(console))
    _print_table(result.rows)
    for line in result.summary:
        print(line)
    print(f"front models exported to {result.front_dir}; demo done in {time.perf_counter() - start:.0f} s")
    return 0


def _print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    from evomerge.demo.search_demo import SEARCHED, TEST_TASKS, short_name

    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    number = lambda h: Column(h, justify="right")  # noqa: E731
    table = Table(Column("model", no_wrap=True), "kind", number("search est."),
                  *(number(t.removeprefix("demo_")) for t in TEST_TASKS), number("mean"),
                  title="Accuracy (%) on the held-out test splits",
                  caption=f"search est.: mean IRT estimate on the search splits of {' and '.join(SEARCHED)} (how the "
                  "search ranks models); mean: of add and words; cross is never trained nor searched; hand recipes: "
                  "method, weights adder/translator, density")
    for r in rows:
        table.add_row(short_name(r), r.kind, pct(r.estimated_mean), *(pct(r.test[t]) for t in TEST_TASKS),
                      pct(r.test_mean))
    Console().print(table)
