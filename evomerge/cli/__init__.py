"""The command line: parse, call the library, print. Errors a user can fix print as one line, exit code 2.

One module per group of commands (merge.py: merge, methods; calibration.py: calibrate, irt; plan.py: plan;
search.py: search, resume, submit, status; export.py; dashboard.py: dashboard, report; demo.py; jobs.py), each with its
`add_*_parser` and its commands; parser.py assembles them; progress.py draws long work on stderr. The CLI
alone imports rich and argparse.
"""

from __future__ import annotations

import sys

from evomerge.cli.parser import build_parser
from evomerge.cli.usage import EXIT_USAGE
from evomerge.errors import EvomergeError

EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # bare `evomerge`: the commands, then what to do
        parser.print_help(sys.stderr)
        print("evomerge: error: give a command (evomerge COMMAND --help shows its options)", file=sys.stderr)
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
        return EXIT_INTERRUPTED


__all__ = ["main"]
