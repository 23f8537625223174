"""`evomerge search`, `resume`, `submit` and `status`: start, continue, send to a cluster, and inspect a run.

A search that ends writes its front plot (RUN_DIR/front.png); `status` only reads, unless asked to --plot.
Library imports sit inside the commands, so `evomerge --help` loads no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.cli.plan import add_memory_options
from evomerge.cli.pools import add_pool_options


def add_search_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    search = sub.add_parser("search", parents=[common], help="run an evolutionary merge search from a run config",
                            description="Validate the run config, create the run directory (atomically), and run "
                            "the search to its budget, checkpointing after every generation.")
    search.add_argument("config", type=Path, help="run config YAML")
    search.add_argument("--run-dir", type=Path, default=None, help="where the run lives (default: runs/<name>)")
    add_pool_options(search)
    add_memory_options(search)
    search.set_defaults(func=cmd_search)


def add_submit_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    submit = sub.add_parser("submit", parents=[common], help="submit a search as a Ray job to a cluster",
                            description="Validate the run config here, then submit `evomerge search CONFIG` as a "
                            "Ray job to the cluster whose job server (dashboard) is at --address; prints the job id.")
    submit.add_argument("config", type=Path, help="run config YAML (paths readable where the job runs)")
    submit.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265")
    submit.add_argument("--run-dir", type=Path, default=None, help="where the run lives (default: runs/<name>)")
    submit.set_defaults(func=cmd_submit)


def add_resume_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    resume = sub.add_parser("resume", parents=[common], help="continue a search after a crash or a stop")
    resume.add_argument("run_dir", type=Path, help="the run directory")
    add_pool_options(resume)
    add_memory_options(resume)
    resume.set_defaults(func=cmd_resume)


def add_status_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    stat = sub.add_parser("status", parents=[common], help="generation, evaluations and the current front of a run")
    stat.add_argument("run_dir", type=Path, help="the run directory")
    stat.add_argument("--json", action="store_true", help="print JSON (generation, evaluations, front)")
    stat.add_argument("--plot", nargs="?", const="", default=None, metavar="PATH",
                      help="also write the front's plot (its first two objectives) as PNG to PATH (default: "
                      "RUN_DIR/front.png)")
    stat.set_defaults(func=cmd_status)


def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.config import RunConfig, load_config
    from evomerge.search.session import create_run

    _check_memory(args, load_config(args.config, RunConfig), args.config.resolve().parent, str(args.config))
    run, prepared = create_run(args.config, args.run_dir)  # the run directory is made only after the checks
    print(f"run directory: {run.path}")
    return _search_to_the_end(run, prepared, args)


def _check_memory(args: argparse.Namespace, config, config_dir: Path, where: str) -> None:
    """Refuse a search whose workers cannot hold what they must (`evomerge plan` shows the parts)."""
    from evomerge.search.capacity import workers_for
    from evomerge.search.preflight import check_memory

    workers = workers_for(config, device=args.device, in_process=args.in_process, address=args.address,
                          device_memory=args.device_memory, host_memory=args.host_memory)
    check_memory(config, config_dir, where, workers)


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search.session import open_run

    run, prepared = open_run(args.run_dir)
    # the workers of this resume (another machine, say) must hold the run's sources as its config sets them
    _check_memory(args, prepared.config, prepared.config_dir, str(run.config_path))
    return _search_to_the_end(run, prepared, args)


def cmd_submit(args: argparse.Namespace) -> int:
    from evomerge.config import RunConfig, load_config
    from evomerge.search.jobs import submit_search
    from evomerge.search.session import prepare

    config = load_config(args.config, RunConfig)
    prepare(config, args.config.resolve().parent, str(args.config))  # fail here, not in the job
    run_dir = args.run_dir or Path(config.run_dir or f"runs/{config.name}")  # here, not the job's working dir
    print(submit_search(args.config, args.address, run_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from evomerge.io.paths import check_writable
    from evomerge.search.plot import FRONT_PLOT, plot_front
    from evomerge.search.session import open_run, status

    if args.plot:
        check_writable(Path(args.plot), "--plot")
    run, prepared = open_run(args.run_dir)
    state = status(run, prepared)
    png = None
    if args.plot is not None:
        png = plot_front(state, Path(args.plot) if args.plot else run.path / FRONT_PLOT)  # `--plot` alone: ""
        if png is None:
            print("evomerge: no front plot: the front is empty or has a single objective", file=sys.stderr)
    if args.json:
        print(json.dumps({**state, "plot": str(png) if png else None}, indent=1))
    else:
        _print_front(state, prepared, png)
    return 0


def _search_to_the_end(run, prepared, args: argparse.Namespace) -> int:
    """Run the search to its budget on the chosen pool, write its front plot, print its front."""
    from rich.console import Console

    from evomerge.cli.pools import make_pool
    from evomerge.cli.progress import search_bars
    from evomerge.search.plot import FRONT_PLOT, plot_front
    from evomerge.search.session import drive, status

    console = Console(stderr=True)
    algorithm = prepared.config.algorithm
    if status(run, prepared)["generation"] < algorithm.generations:  # a finished run starts no workers
        pool = make_pool(prepared, args, console)
        try:
            with search_bars(console, algorithm.generations, algorithm.pop_size) as (on_generation, on_result):
                drive(run, prepared, pool, on_generation=on_generation, on_result=on_result)
        finally:
            pool.close()
    state = status(run, prepared)
    _print_front(state, prepared, plot_front(state, run.path / FRONT_PLOT))
    done, failed = state["evaluations"]["done"], state["evaluations"]["failed"]
    if done and failed == done:  # a run with nothing scored is no success, however far it got
        with run.open_ledger() as ledger:
            reason = (ledger.all("failed")[0].error or "no reason recorded").strip().splitlines()[-1]
        print(f"evomerge: every candidate failed ({failed} of {done}); the first: {reason}", file=sys.stderr)
        return 1
    return 0


def _shown(value: float, objective) -> str:
    return f"{value:.4f}" if objective.task else f"{value:,.0f}"


def _print_front(state: dict, prepared, png: Path | None) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    objectives = prepared.config.objectives
    names = [o.name for o in objectives]
    headers = [f"{o.task} (estimated accuracy)" if o.task else o.name for o in objectives]
    table = Table(Column("id", no_wrap=True), *headers, Column("ties", justify="right"),
                  title=f"Pareto front: generation {state['generation']}/{state['generations']}, "
                  f"{state['evaluations']['done']} evaluations ({state['evaluations']['failed']} failed)",
                  caption="ties: candidates with these same scores (export --all-ties writes them all)")
    for item in state["front"]:
        table.add_row(item["id"], *(_shown(item["objectives"][n], o) for n, o in zip(names, objectives)),
                      str(item["ties"]))
    Console().print(table)
    if png:
        print(f"front plot: {png}")
