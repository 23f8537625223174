"""Usage errors print as one line, like every other error, and exit with code 2."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2  # bad input of any kind: a usage error, or an EvomergeError the user can fix


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def help_when_bare(parser: argparse.ArgumentParser) -> None:
    """A command group run without its sub-command (`evomerge irt`) prints its help and exits 2."""
    parser.set_defaults(func=lambda args: parser.print_help() or EXIT_USAGE)
