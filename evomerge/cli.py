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
        help="merge models from a mergekit-style recipe YAML into a Hugging Face checkpoint",
        description="Merge models from a mergekit merge YAML (merge_method, base_model, models, parameters, "
        "dtype, out_dtype, tokenizer_source) and write a Hugging Face checkpoint.",
    )
    merge.add_argument("recipe", type=Path, help="recipe YAML (mergekit merge format)")
    merge.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    merge.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 (default: cpu)")
    merge.add_argument("--shard-size", default="5GB", help="maximum size of one safetensors shard (default: 5GB)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare_*, della*) (default: 0)")
    merge.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (torch.load weights_only=True)")
    merge.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    merge.set_defaults(func=_cmd_merge)

    demo = sub.add_parser("demo", parents=[common], help="build a tiny model family and merge it with every method")
    demo.add_argument("--cache", type=Path, default=Path(".cache/demo"), help="where the demo models are kept")
    demo.set_defaults(func=_cmd_demo)

    methods = sub.add_parser("methods", parents=[common], help="list merge methods and their parameters")
    methods.set_defaults(func=_cmd_methods)
    return parser


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
    from rich.table import Table

    from evomerge.demo.merge_tour import run_demo

    console = Console()
    out = args.cache / "merged-ties"
    rows = run_demo(args.cache, out, log=console.print)
    table = Table("method", "materialize ms", "|merged - base| / |task vector|", "entries changed",
                  title="One recipe per method, written in place into one live model")
    for r in rows:
        table.add_row(r["method"], f"{r['ms']:.1f}", f"{r['moved']:.3f}", f"{r['changed']:.0%}")
    console.print(table)
    console.print(f"wrote the TIES merge as a Hugging Face checkpoint to {out}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
