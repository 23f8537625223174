"""The `evomerge` argument parser, assembled from each command's `add_*_parser(sub, common)`."""

from __future__ import annotations

import argparse

from evomerge import __version__
from evomerge.cli import calibration, dashboard, demo, export, jobs, merge, plan, search
from evomerge.cli.usage import UsageParser

# The order of `evomerge --help`.
_COMMANDS = (
    merge.add_merge_parser,
    demo.add_demo_parser,
    merge.add_methods_parser,
    calibration.add_irt_parser,
    calibration.add_calibrate_parser,
    plan.add_plan_parser,
    search.add_search_parser,
    search.add_submit_parser,
    jobs.add_jobs_parser,
    search.add_resume_parser,
    search.add_status_parser,
    export.add_export_parser,
    dashboard.add_dashboard_parser,
    dashboard.add_report_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="evomerge",
        description="Evolutionary search for merges of fine-tuned language models.",
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=UsageParser)
    common = UsageParser(add_help=False)  # the options every command takes
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    for add in _COMMANDS:
        add(sub, common)
    return parser
