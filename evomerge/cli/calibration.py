"""`evomerge calibrate` (self-calibration from a config) and `evomerge irt fit|estimate` (from responses files).

Library imports sit inside the commands, so `evomerge --help` loads no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.cli.usage import UsageParser, help_when_bare
from evomerge.errors import EvomergeError

_RESPONSES_HELP = "[TASK=]PATH: a CSV or Parquet file, header model,<item id>,..., values 0/1, empty = not " \
    "observed; repeat for several tasks"


def add_calibrate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    calibrate = sub.add_parser(
        "calibrate", parents=[common], help="score reference models on full tasks, fit IRT, choose anchor items",
        description="Self-calibration: score the sources, their base and seeded random merges of them on the full "
        "tasks (or import a responses matrix), fit IRT per task, choose anchor items, and write a calibration file "
        "plus the responses as CSV beside it.")
    calibrate.add_argument("config", type=Path, help="calibration config YAML (models, base_model, tasks, out, ...)")
    calibrate.add_argument("--force", action="store_true", help="replace an existing calibration file")
    calibrate.set_defaults(func=cmd_calibrate)


def add_irt_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    irt = sub.add_parser("irt", parents=[common], help="fit IRT calibrations and estimate full-task accuracy",
                         description="Item Response Theory: fit a calibration (IRT model, anchor items, estimator "
                         "settings) from a responses matrix, and estimate full-task accuracy from anchor answers.")
    help_when_bare(irt)
    irt_sub = irt.add_subparsers(title="sub-commands", metavar="SUBCOMMAND", parser_class=UsageParser)
    _add_irt_fit_parser(irt_sub, common)
    _add_irt_estimate_parser(irt_sub, common)


def _add_irt_fit_parser(irt_sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    fit = irt_sub.add_parser("fit", parents=[common], help="fit a calibration from a responses matrix",
                             description="Fit, per task, a multidimensional 2PL IRT model (dimension and slope "
                             "prior chosen on held-out models), choose anchor items and set the estimators.")
    fit.add_argument("--responses", action="append", required=True, metavar="[TASK=]PATH", help=_RESPONSES_HELP)
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
    fit.set_defaults(func=cmd_irt_fit)


def _add_irt_estimate_parser(irt_sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    est = irt_sub.add_parser("estimate", parents=[common], help="estimate full-task accuracy of each row",
                             description="Estimate, for each model (row), the full-task accuracy with every "
                             "estimator, from its answers on any calibrated items (usually the anchors).")
    est.add_argument("--calibration", type=Path, required=True, help="calibration file from `evomerge irt fit`")
    est.add_argument("--responses", action="append", required=True, metavar="[TASK=]PATH", help=_RESPONSES_HELP)
    est.add_argument("--task", default=None, help="task of a --responses given without TASK= (default: the "
                     "calibration's only task)")
    est.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    est.set_defaults(func=cmd_irt_estimate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evomerge.cli.progress import calibration_bar
    from evomerge.config import CalibrationConfig, load_config
    from evomerge.fitness.self_calibration import calibrate, calibration_outputs, write_outputs

    config = load_config(args.config, CalibrationConfig)
    out, responses_dir = calibration_outputs(config, args.config, force=args.force)  # refused before any scoring
    start = time.perf_counter()
    with calibration_bar(Console(stderr=True), "scoring reference models") as progress:
        calibration, responses = calibrate(config, args.config, progress=progress)
    write_outputs(calibration, responses, out, responses_dir)
    for name, t in calibration.tasks.items():
        r = responses[name]
        print(f"task {name}: {len(r.models)} models x {len(r.items)} items, IRT dimension {t.diagnostics['dims']}, "
              f"{len(t.anchors)} anchors, accuracy {r.accuracy().min():.2f}-{r.accuracy().max():.2f}")
    print(f"wrote {out} and {responses_dir}/ in {time.perf_counter() - start:.1f} s")
    _print_warnings(calibration)
    return 0


def cmd_irt_fit(args: argparse.Namespace) -> int:
    from evomerge.fitness.calibration_fit import fit_calibration
    from evomerge.fitness.responses import read_responses
    from evomerge.io.paths import check_writable

    check_writable(args.out, "--out")  # before the fit, not after it
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
              f"{len(t.anchors)} anchors ({d.get('anchor_method', args.method)}), gp-IRT lambda {t.lambdas['gpirt']:.3f}, "
              f"gmp-IRT lambda {t.lambdas['gmpirt']:.3f}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    _print_warnings(calibration)
    return 0


def cmd_irt_estimate(args: argparse.Namespace) -> int:
    import json

    from evomerge.fitness.calibration import Calibration
    from evomerge.fitness.estimators import estimate_responses
    from evomerge.fitness.responses import read_responses

    calibration = Calibration.load(args.calibration)
    default = args.task or (next(iter(calibration.tasks)) if len(calibration.tasks) == 1 else None)
    records = []
    files = _task_files(args.responses, default)
    for task, path in files.items():
        calibration.task(task)  # an unknown task fails before the file is read
        records += estimate_responses(calibration, task, read_responses(path))
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        _print_estimates(records)
    _print_warnings(calibration, list(files))  # estimates from a calibration that warned carry its warning
    return 0


def _task_files(specs: list[str], task: str | None) -> dict[str, Path]:
    """task -> file of the `--responses [TASK=]PATH` options (a path that exists is never split at '=')."""
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


def _print_estimates(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(k for r in records for k in r["estimates"]))
    table = Table("task", "model", "items seen", *names, title="Estimated full-task accuracy")
    for r in records:
        table.add_row(r["task"], r["model"], str(r["items_seen"]), *(f"{r['estimates'].get(n, float('nan')):.4f}"
                                                                       for n in names))
    Console().print(table)


def _print_warnings(calibration, tasks: list[str] | None = None) -> None:
    """A fit that cannot be trusted says so (the file keeps the same words under diagnostics.warnings)."""
    for name, t in calibration.tasks.items():
        if tasks is not None and name not in tasks:
            continue
        for warning in t.diagnostics.get("warnings", []):
            print(f"evomerge: warning: task {name}: {warning}", file=sys.stderr)
