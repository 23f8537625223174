"""Command line: parse, call, print. Errors a user can fix print as one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge import __version__
from evomerge.errors import EvomergeError

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except EvomergeError as e:
        if args.debug:
            raise
        print(f"evomerge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (like every other error), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evomerge",
        description="Evolutionary search for merges of fine-tuned language models.",
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")

    merge = sub.add_parser(
        "merge",
        parents=[common],
        help="merge models from a recipe YAML (mergekit format, or a data-flow layer path) into a checkpoint",
        description="Merge models from a mergekit merge YAML (merge_method, base_model, models, parameters, "
        "dtype, out_dtype, tokenizer_source), or run a data-flow recipe (merge_method: dataflow; sources, path) "
        "whose layer path is exported with its scales folded in, and write a Hugging Face checkpoint.",
    )
    merge.add_argument("recipe", type=Path, help="recipe YAML (mergekit merge format, or merge_method: dataflow)")
    merge.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    merge.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 (default: cpu)")
    merge.add_argument("--shard-size", default="5GB", help="maximum size of one safetensors shard (default: 5GB)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare_*, della*) (default: 0)")
    merge.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (torch.load weights_only=True)")
    merge.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    merge.set_defaults(func=_cmd_merge)

    demo = sub.add_parser(
        "demo", parents=[common], help="the demo search: train a tiny base and two specialists, search merges of "
        "them, export the front, and compare it with the specialists and hand recipes on held-out test items",
        description="Build the demo kit (once, cached in .cache/demo), calibrate (once per kit), run the NSGA-II "
        "search of runs/demo.yaml (resumed if interrupted), score a grid of hand recipes the same way, export the "
        "front, and print a table on the held-out test splits. Seeded: the same command prints the same table.")
    demo.add_argument("--run-dir", type=Path, default=None, help="the demo run directory (default: runs/demo)")
    _pool_options(demo)
    demo.set_defaults(func=_cmd_demo)

    methods = sub.add_parser("methods", parents=[common], help="list merge methods and their parameters")
    methods.set_defaults(func=_cmd_methods)
    _irt_parser(sub, common)

    calibrate = sub.add_parser(
        "calibrate", parents=[common], help="score reference models on full tasks, fit IRT, choose anchor items",
        description="Self-calibration: score the sources, their base and seeded random merges of them on the full "
        "tasks (or import a responses matrix), fit IRT per task, choose anchor items, and write a calibration file "
        "plus the responses as CSV beside it.")
    calibrate.add_argument("config", type=Path, help="calibration config YAML (models, base_model, tasks, out, ...)")
    calibrate.add_argument("--force", action="store_true", help="replace an existing calibration file")
    calibrate.set_defaults(func=_cmd_calibrate)

    search = sub.add_parser("search", parents=[common], help="run an evolutionary merge search from a run config",
                            description="Validate the run config, create the run directory (atomically), and run "
                            "the search to its budget, checkpointing after every generation.")
    search.add_argument("config", type=Path, help="run config YAML")
    search.add_argument("--run-dir", type=Path, default=None, help="where the run lives (default: runs/<name>)")
    _pool_options(search)
    search.set_defaults(func=_cmd_search)

    submit = sub.add_parser("submit", parents=[common], help="submit a search as a Ray job to a cluster",
                            description="Validate the run config here, then submit `evomerge search CONFIG` as a "
                            "Ray job to the cluster whose job server (dashboard) is at --address; prints the job id.")
    submit.add_argument("config", type=Path, help="run config YAML (paths readable where the job runs)")
    submit.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265")
    submit.add_argument("--run-dir", type=Path, default=None, help="where the run lives (default: runs/<name>)")
    submit.set_defaults(func=_cmd_submit)
    from evomerge.cli_jobs import add_jobs_parser

    add_jobs_parser(sub, common)

    resume = sub.add_parser("resume", parents=[common], help="continue a search after a crash or a stop")
    resume.add_argument("run_dir", type=Path, help="the run directory")
    _pool_options(resume)
    resume.set_defaults(func=_cmd_resume)

    stat = sub.add_parser("status", parents=[common], help="generation, evaluations and the current front of a run")
    stat.add_argument("run_dir", type=Path, help="the run directory")
    stat.add_argument("--json", action="store_true", help="print JSON (generation, evaluations, front)")
    stat.set_defaults(func=_cmd_status)

    export = sub.add_parser(
        "export", parents=[common], help="write candidates of a run (default: its front) as Hugging Face checkpoints",
        description="Rebuild each chosen candidate from the run's ledger (its recipe, its seed) and write it to "
        "OUT/<candidate id>/: sharded safetensors, config, tokenizer, generation config, a model card (README.md) "
        "and the recipe (mergekit_config.yml, or evomerge_recipe.yml for data-flow and hybrid merges). "
        "Exits 1 when --verify finds a mismatch.")
    export.add_argument("run_dir", type=Path, help="the run directory")
    export.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--front", action="store_true", help="the current Pareto front, as `status` shows it (default)")
    which.add_argument("--ids", default=None, help="comma-separated candidate ids (ledger keys, or unique prefixes "
                       "such as g0002-0003)")
    export.add_argument("--verify", action="store_true", help="load each export back with plain transformers, score "
                        "it on the full tasks, and check its anchor answers equal the ledger's")
    export.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing the "
                        "directories of the candidates exported (other content is kept)")
    export.add_argument("--shard-size", default="5GB", help="maximum size of one safetensors shard (default: 5GB)")
    export.add_argument("--device", default="cpu", help="where to merge and verify: cpu, cuda, cuda:1 (default: cpu)")
    export.set_defaults(func=_cmd_export)
    return parser


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.config import CalibrationConfig, load_config
    from evomerge.fitness.calibrate import calibrate, calibration_outputs, write_outputs

    config = load_config(args.config, CalibrationConfig)
    out, responses_dir = calibration_outputs(config, args.config, force=args.force)
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(TextColumn("scoring reference models"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("", total=None)
        calibration, responses = calibrate(
            config, args.config, progress=lambda done, total, name: progress.update(bar, completed=done, total=total,
                                                                                   description=name))
    write_outputs(calibration, responses, out, responses_dir)
    for name, t in calibration.tasks.items():
        r = responses[name]
        print(f"task {name}: {len(r.models)} models x {len(r.items)} items, IRT dimension {t.diagnostics['dims']}, "
              f"{len(t.anchors)} anchors, accuracy {r.accuracy().min():.2f}-{r.accuracy().max():.2f}")
    print(f"wrote {out} and {responses_dir}/ in {time.perf_counter() - start:.1f} s")
    return 0


def _pool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray on loopback)")
    p.add_argument("--in-process", action="store_true", help="no Ray: evaluate in this process, one at a time")
    p.add_argument("--device", default=None, help="where candidates are materialized and scored (default: cuda for "
                   "GPU workers, else cpu)")


def _cmd_search(args: argparse.Namespace) -> int:
    from evomerge.search.session import create_run

    run, prepared = create_run(args.config, args.run_dir)
    print(f"run directory: {run.path}")
    return _drive(run, prepared, args)


def _cmd_submit(args: argparse.Namespace) -> int:
    from evomerge.config import RunConfig, load_config
    from evomerge.search.session import prepare
    from evomerge.search.workers import submit_search

    config = load_config(args.config, RunConfig)
    prepare(config, args.config.resolve().parent, str(args.config))  # fail here, not in the job
    run_dir = args.run_dir or Path(config.run_dir or f"runs/{config.name}")  # here, not the job's working dir
    print(submit_search(args.config, args.address, run_dir))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search.session import open_run

    run, prepared = open_run(args.run_dir)
    return _drive(run, prepared, args)


def _drive(run, prepared, args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    pool = _pool(prepared, args, console)
    try:
        _search_with_progress(run, prepared, pool, console)
    finally:
        getattr(pool, "close", lambda: None)()
    return _print_status(run, prepared, as_json=False)


def _pool(prepared, args: argparse.Namespace, console):
    from evomerge.search.session import LocalPool

    if args.in_process:
        return LocalPool(prepared, device=args.device or "cpu")
    from evomerge.search.workers import RayPool

    with console.status("starting Ray workers (sources are loaded once per worker)"):
        pool = RayPool(prepared, address=args.address, device=args.device)
    console.log(f"{pool.count} Ray worker(s) ready")
    return pool


def _search_with_progress(run, prepared, pool, console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.search.session import drive

    algorithm = prepared.config.algorithm
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        gens = progress.add_task("generations", total=algorithm.generations)
        evals = progress.add_task("evaluations", total=algorithm.generations * algorithm.pop_size)

        def on_generation(report):
            progress.update(gens, completed=report.generation + 1)
            progress.advance(evals, report.reused)
            console.log(f"generation {report.generation}: {report.evaluated} evaluated, {report.reused} from the "
                        f"ledger, {report.failed} failed")

        drive(run, prepared, pool, on_generation=on_generation, on_result=lambda rec: progress.advance(evals))


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.search.session import open_run

    run, prepared = open_run(args.run_dir)
    return _print_status(run, prepared, as_json=args.json)


def _print_status(run, prepared, *, as_json: bool) -> int:
    import json

    from evomerge.search.plot import plot_front
    from evomerge.search.session import status

    state = status(run, prepared)
    png = plot_front(state, run.path / "front.png")
    if as_json:
        print(json.dumps({**state, "plot": str(png) if png else None}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Column, Table

    names = [o.name for o in prepared.config.objectives]
    table = Table(Column("id", no_wrap=True), *names, title=f"Pareto front: generation {state['generation']}/{state['generations']}, "
                  f"{state['evaluations']['done']} evaluations ({state['evaluations']['failed']} failed)")
    for item in state["front"]:
        table.add_row(item["id"], *(f"{item['objectives'][n]:.4f}" for n in names))
    Console().print(table)
    if png:
        print(f"front plot: {png}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.run import merge_from_yaml

    start = time.perf_counter()
    result = merge_from_yaml(
        args.recipe, args.out, device=args.device, shard_size=args.shard_size, seed=args.seed,
        allow_pickle=args.allow_pickle, force=args.force, log=lambda msg: print(msg, file=sys.stderr),
    )
    print(f"wrote {result.out} ({result.n_tensors} tensors, {result.nbytes / 2**20:.1f} MiB, "
          f"{result.n_shards} shard(s)) in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.demo import search_demo as demo
    from evomerge.demo.kit import build_demo_kit
    from evomerge.export import export_run
    from evomerge.search.session import status

    start = time.perf_counter()
    console = Console(stderr=True)
    demo.check_checkout()
    build_demo_kit(demo.DEFAULT_CACHE, log=console.log)
    with Progress(TextColumn("calibrating: scoring reference models"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        demo.ensure_calibration(console.log, lambda done, total, name: bar.update(task, completed=done, total=total,
                                                                                  description=name))
    run_dir = args.run_dir or demo.DEFAULT_RUN_DIR
    run, prepared = demo.open_demo_run(run_dir)
    console.log(f"run directory: {run.path}")
    state = status(run, prepared)
    if state["generation"] < state["generations"] or not (run.path / demo.HAND_FILE).is_file():
        pool = _pool(prepared, args, console)
        try:
            _search_with_progress(run, prepared, pool, console)
            with console.status("scoring hand recipes (a grid of task_arithmetic and ties) on the search split"):
                hand = demo.score_hand_recipes(prepared, pool, run.path, console.log)
        finally:
            getattr(pool, "close", lambda: None)()
        state = status(run, prepared)
    else:  # finished: no Ray; the hand-recipe scores are read back from the run directory
        console.log("search and hand recipes: finished, read from the run directory")
        hand = demo.score_hand_recipes(prepared, None, run.path, console.log)
    front, front_dir = state["front"], run.path / "front"
    todo = [f["id"] for f in front if not (front_dir / f["id"]).is_dir()]  # an export appears whole or not at all
    if todo:
        export_run(run.path, front_dir, ids=todo, force=True, log=console.log)
    rows = demo.cached_table(run.path, front)
    if rows is None:
        with console.status("scoring on the held-out test splits"):
            rows = demo.held_out_table(prepared, run.path, hand, front, {f["id"]: front_dir / f["id"] for f in front},
                                       console.log)
    _print_demo_table(rows)
    for line in demo.summary(rows):
        print(line)
    print(f"front models exported to {run.path / 'front'}; demo done in {time.perf_counter() - start:.0f} s")
    return 0


def _print_demo_table(rows) -> None:
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


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import export_run

    ids = None
    if args.ids is not None:
        ids = [i.strip() for i in args.ids.split(",") if i.strip()]
        if not ids:
            raise EvomergeError("--ids is empty: give comma-separated candidate ids, e.g. --ids g0002-0003,g0004")
    start = time.perf_counter()
    exported = export_run(args.run_dir, args.out, ids=ids, verify=args.verify, force=args.force,
                          shard_size=args.shard_size, device=args.device,
                          log=lambda msg: print(msg, file=sys.stderr))
    print(f"exported {len(exported)} model(s) to {args.out} in {time.perf_counter() - start:.1f} s")
    checked = [e for e in exported if e.verification is not None]
    if not checked:
        return 0
    from rich.console import Console
    from rich.table import Column, Table

    tasks = list(checked[0].verification.scores)
    table = Table(Column("id", no_wrap=True), *(f"{t} (estimated)" for t in tasks), "anchors match",
                  title="Full-task scores of the exported checkpoints")
    for e in checked:
        v = e.verification
        cells = [f"{v.scores[t]['accuracy']:.4f}" + ("" if v.scores[t]["estimated"] is None
                                                       else f" ({v.scores[t]['estimated']:.4f})") for t in tasks]
        table.add_row(e.key, *cells, f"{v.checked - len(v.mismatches)}/{v.checked}")
    Console().print(table)
    bad = [e for e in checked if not e.verification.matched]
    for e in bad:
        print(f"evomerge: anchor answers of {e.key} differ from the ledger on {len(e.verification.mismatches)} of "
              f"{e.verification.checked} items (see {e.path / 'verify.json'})", file=sys.stderr)
    return 1 if bad else 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Column, Table

    from evomerge.merge.methods import METHODS

    longest = max(map(len, METHODS.names()))
    table = Table(
        Column("method", no_wrap=True, min_width=longest),
        *(Column(h, overflow="fold") for h in ("what it does", "per-model parameters", "merge-wide parameters", "base")),
    )
    for name in METHODS.names():
        m = METHODS[name]
        fmt = lambda p: p.name + ("" if p.default is None else f"={p.default}")  # noqa: E731
        table.add_row(
            name,
            m.description.split("\n")[0],
            ", ".join(fmt(p) for p in m.params if p.per_model),
            ", ".join(fmt(p) for p in m.params if not p.per_model),
            "required" if m.needs_base else "optional",
        )
    Console().print(table)
    return 0


def _irt_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    irt = sub.add_parser("irt", parents=[common], help="fit IRT calibrations and estimate full-task accuracy",
                         description="Item Response Theory: fit a calibration (IRT model, anchor items, estimator "
                         "settings) from a responses matrix, and estimate full-task accuracy from anchor answers.")
    irt.set_defaults(func=lambda args: irt.print_help() or EXIT_USAGE)
    irt_sub = irt.add_subparsers(title="sub-commands", metavar="SUBCOMMAND", parser_class=_Parser)
    files = "[TASK=]PATH: a CSV or Parquet file, header model,<item id>,..., values 0/1, empty = not observed; " \
            "repeat for several tasks"

    fit = irt_sub.add_parser("fit", parents=[common], help="fit a calibration from a responses matrix",
                             description="Fit, per task, a multidimensional 2PL IRT model (dimension and slope "
                             "prior chosen on held-out models), choose anchor items and set the estimators.")
    fit.add_argument("--responses", action="append", required=True, metavar="[TASK=]PATH", help=files)
    fit.add_argument("--out", type=Path, required=True, help="calibration file to write (JSON)")
    fit.add_argument("--task", default="task", help="task name of a --responses given without TASK= (default: task)")
    fit.add_argument("--anchors", type=int, default=100, help="anchor items per task (default: 100)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the held-out split and anchor choice (default: 0)")
    fit.add_argument("--method", default="irt", help="anchor selection: irt (k-means on IRT item parameters), "
                     "correctness (k-means on correctness vectors) or random (stratified) (default: irt)")
    fit.add_argument("--dims", default=None, help="IRT dimension, or comma-separated candidates to choose from "
                     "(default: 1,2,3,5, chosen on held-out models)")
    fit.add_argument("--sources", default=None, help="comma-separated model names (rows) whose abilities mp-IRT "
                     "combines: the merge's source models")
    fit.set_defaults(func=_cmd_irt_fit)

    est = irt_sub.add_parser("estimate", parents=[common], help="estimate full-task accuracy of each row",
                             description="Estimate, for each model (row), the full-task accuracy with every "
                             "estimator, from its answers on any calibrated items (usually the anchors).")
    est.add_argument("--calibration", type=Path, required=True, help="calibration file from `evomerge irt fit`")
    est.add_argument("--responses", action="append", required=True, metavar="[TASK=]PATH", help=files)
    est.add_argument("--task", default=None, help="task of a --responses given without TASK= (default: the "
                     "calibration's only task)")
    est.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    est.set_defaults(func=_cmd_irt_estimate)


def _task_files(specs: list[str], task: str | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep and not Path(spec).exists() else (task, spec)
        if name is None:
            raise EvomergeError(f"--responses {spec}: the calibration has several tasks: "
                                "write TASK=PATH or give --task")
        if name in out:
            raise EvomergeError(f"--responses: task {name!r} is given twice: give one file per task")
        out[name] = Path(path)
    return out


def _cmd_irt_fit(args: argparse.Namespace) -> int:
    from evomerge.fitness.calibration import fit_calibration
    from evomerge.fitness.responses import read_responses

    try:
        dims = None if args.dims is None else [int(d) for d in args.dims.split(",")]
    except ValueError:
        raise EvomergeError(f"--dims {args.dims}: give an integer or comma-separated integers, "
                            "e.g. 3 or 1,2,3") from None
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    responses = {task: read_responses(path) for task, path in _task_files(args.responses, args.task).items()}
    start = time.perf_counter()
    calibration = fit_calibration(responses, n_anchors=args.anchors, seed=args.seed, anchor_method=args.method,
                                  sources=sources, dims=dims)
    calibration.save(args.out)
    for name, t in calibration.tasks.items():
        d = t.diagnostics
        print(f"task {name}: {d['models']} models x {d['items']} items, IRT dimension {d['dims']}, "
              f"{len(t.anchors)} anchors ({args.method}), gp-IRT lambda {t.lambdas['gpirt']:.3f}, "
              f"gmp-IRT lambda {t.lambdas['gmpirt']:.3f}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_irt_estimate(args: argparse.Namespace) -> int:
    import json

    from evomerge.fitness.calibration import Calibration
    from evomerge.fitness.estimators import estimate_responses
    from evomerge.fitness.responses import read_responses

    calibration = Calibration.load(args.calibration)
    default = args.task or (next(iter(calibration.tasks)) if len(calibration.tasks) == 1 else None)
    records = []
    for task, path in _task_files(args.responses, default).items():
        calibration.task(task)  # an unknown task fails before the file is read
        records += estimate_responses(calibration, task, read_responses(path))
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(k for r in records for k in r["estimates"]))
    table = Table("task", "model", "items seen", *names, title="Estimated full-task accuracy")
    for r in records:
        table.add_row(r["task"], r["model"], str(r["items_seen"]), *(f"{r['estimates'].get(n, float('nan')):.4f}"
                                                                       for n in names))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
