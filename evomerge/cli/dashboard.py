"""`evomerge dashboard` and `evomerge report`: watch a search in the browser, or share a finished one as one file.

Both only read the run directory (its ledger and config snapshot, and verify.json files under --exports).
Library imports sit inside the commands, so `evomerge --help` loads neither aiohttp nor plotly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evomerge.report import DEFAULT_HOST, DEFAULT_PORT


def _add_exports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exports", type=Path, action="append", default=[], metavar="DIR",
                        help="an --out folder of `evomerge export --verify`: its DIR/<candidate id>/verify.json "
                        "full-task scores are shown next to the estimates (repeatable)")


def add_dashboard_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    dash = sub.add_parser(
        "dashboard", parents=[common], help="a local web page that follows a search as it runs",
        description="Serve a page that follows the run (it re-reads the ledger every few seconds): the front of "
        "every generation, hypervolume, evaluations and failures, worker activity, and any candidate's recipe, "
        "anchor answers and estimates. Reads the run directory only; Ctrl-C stops it.")
    dash.add_argument("run_dir", type=Path, help="the run directory (running or finished)")
    dash.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this "
                      "machine only; 0.0.0.0 shows the run to anyone who can reach this machine)")
    dash.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port to listen on (default: {DEFAULT_PORT}; 0: any free port)")
    _add_exports(dash)
    dash.set_defaults(func=cmd_dashboard)


def add_report_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    report = sub.add_parser(
        "report", parents=[common], help="the dashboard's views as one self-contained HTML file",
        description="Write the dashboard's views of a run (every generation's front, hypervolume, evaluations, "
        "workers, and every finished candidate) into one HTML file with plotly.js and the data inlined: it opens "
        "offline, anywhere. Written atomically.")
    report.add_argument("run_dir", type=Path, help="the run directory")
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write (replaced if it exists)")
    _add_exports(report)
    report.set_defaults(func=cmd_report)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from evomerge.errors import EvomergeError
    from evomerge.report.data import RunSource
    from evomerge.report.server import serve

    if not 0 <= args.port <= 65535:
        raise EvomergeError(f"--port {args.port}: not a port; give 1-65535 (or 0 for any free one)")
    src = RunSource.open(args.run_dir, args.exports)

    def ready(url: str) -> None:
        print(f"dashboard of {src.run.path}: {url}  (Ctrl-C stops it)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"evomerge: warning: listening on {args.host}: anyone who can reach this machine can read this "
                  "run's ledger", file=sys.stderr, flush=True)

    try:
        serve(src, args.host, args.port, on_ready=ready)
    except KeyboardInterrupt:  # Ctrl-C: the server has closed; SIGTERM returns from serve()
        pass
    print("dashboard stopped", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evomerge.report.bundle import check_report_path, write_report
    from evomerge.report.data import RunSource

    check_report_path(args.out)  # before reading the run
    src = RunSource.open(args.run_dir, args.exports)
    out = write_report(src, args.out)
    print(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB, opens offline)")
    return 0
