"""`evomerge demo`: runs evomerge.demo.pipeline with a rich display and the chosen pool, prints its table.

Library imports sit inside the command, so `evomerge --help` loads no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.cli.pools import add_pool_options
from evomerge.demo.smollm2 import INSTALL


def add_demo_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo", parents=[common], help="the demo search: fine-tune two specialists of SmolLM2-135M-Instruct, search "
        "merges of them, export the front, and compare it with the specialists and hand recipes on held-out items",
        description="Build the demo kit (once, cached in .cache/demo), calibrate (once per kit), run the NSGA-II "
        "search (resumed if interrupted), score a grid of hand recipes the same way, run a hybrid search (layer "
        "paths through the specialists and the front merges) seeded with the front (SmolLM2 kit), export the "
        "fronts, and print a table on the held-out test splits. Seeded: the same command prints the same table.")
    demo.add_argument("--kit", choices=("smollm2", "toy"), default="smollm2",
                      help="smollm2: an adder and a translator fine-tuned from SmolLM2-135M-Instruct (needs "
                      f"`{INSTALL}`); toy: a 0.86M-parameter character-level Llama trained from scratch, the "
                      "tests' kit (runs/demo.yaml)")
    demo.add_argument("--kit-size", choices=("full", "tiny"), default="full",
                      help="tiny (--kit smollm2 only): the base cut to 2 layers, 6 fine-tuning steps, a small search: "
                      "the same stages in minutes, for tests")
    demo.add_argument("--run-dir", type=Path, default=None,
                      help="the demo run directory (default: runs/demo-smollm2[-tiny], runs/demo for --kit toy)")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where --kit smollm2 keeps its kit (default: .cache/demo; the toy kit's is fixed there, "
                      "runs/demo*.yaml name it)")
    add_pool_options(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evomerge.cli.pools import make_pool
    from evomerge.cli.progress import RichDemoUI
    from evomerge.demo.pipeline import run_demo
    from evomerge.demo.search_demo import HYBRID_DIR

    start = time.perf_counter()
    console = Console(stderr=True)
    inputs, run_dir = _kit_inputs(args.kit, args.kit_size, args.cache_dir, args.run_dir)
    result = run_demo(run_dir, lambda prepared: make_pool(prepared, args, console), RichDemoUI(console), inputs)
    _print_table(result.rows)
    for line in result.summary:
        print(line)
    hybrid = result.run_dir / HYBRID_DIR / "front"
    also = f" and {hybrid}" if any(r.kind == "hybrid" for r in result.rows) else ""
    print(f"front models exported to {result.front_dir}{also}; demo done in {time.perf_counter() - start:.0f} s")
    return 0


def _kit_inputs(kit: str, size: str, cache_dir: Path | None, run_dir: Path | None):
    """(DemoInputs, run directory) of the chosen kit."""
    from evomerge.demo.pipeline import DemoInputs
    from evomerge.demo.search_demo import DEFAULT_CACHE, DEFAULT_RUN_DIR
    from evomerge.errors import EvomergeError

    if kit == "toy":
        if size != "full" or cache_dir is not None:
            raise EvomergeError(f"{'--kit-size' if size != 'full' else '--cache-dir'} is for --kit smollm2 "
                                "(the toy kit has one size, in .cache/demo)")
        return DemoInputs(), run_dir
    from evomerge.demo.smollm2_kit import demo_inputs

    default = DEFAULT_RUN_DIR.with_name("demo-smollm2" + ("" if size == "full" else f"-{size}"))
    return demo_inputs(cache_dir or DEFAULT_CACHE, size), run_dir or default


def _print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    from evomerge.demo.search_demo import SEARCHED, TEST_TASKS, short_name

    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    number = lambda h: Column(h, justify="right")  # noqa: E731
    table = Table(Column("model", no_wrap=True), Column("kind", no_wrap=True), number("search est."), number("search all"),
                  *(number(t.removeprefix("demo_")) for t in TEST_TASKS), number("mean"),
                  title="Accuracy (%) on the held-out test splits",
                  caption=f"search est.: mean IRT estimate on the search splits of {' and '.join(SEARCHED)} (how the "
                  "search ranks models, from its anchor items); search all: mean accuracy on every search item (what "
                  "the best model is chosen on); mean: of add and words; cross is never trained nor searched; hand "
                  "recipes: method, weights adder/translator, density")
    for r in rows:
        table.add_row(short_name(r), r.kind, pct(r.estimated_mean), pct(r.rescored_mean),
                      *(pct(r.test[t]) for t in TEST_TASKS), pct(r.test_mean))
    Console(width=None if sys.stdout.isatty() else 100).print(table)  # piped: wide enough for every column
