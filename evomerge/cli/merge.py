"""`evomerge merge` (a recipe YAML into a checkpoint) and `evomerge methods` (the merge methods' table).

Library imports sit inside the commands, so `evomerge --help` loads no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_merge_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    merge = sub.add_parser(
        "merge",
        parents=[common],
        help="merge models from a recipe YAML (mergekit format, or a data-flow layer path) into a checkpoint",
        description="Merge models from a mergekit merge YAML (merge_method, base_model, models or slices, "
        "parameters, dtype, out_dtype, tokenizer_source or tokenizer, chat_template; passthrough slices make "
        "frankenmerges and depth up-scaled models), or run a data-flow recipe (merge_method: dataflow; sources, "
        "path) whose layer path is exported with its scales folded in, and write a Hugging Face checkpoint. "
        "Models are local folders or repos in the local Hugging Face cache (REPO@REVISION for a cached revision).",
    )
    merge.add_argument("recipe", type=Path, help="recipe YAML (mergekit merge format, or merge_method: dataflow)")
    merge.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    merge.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 (default: cpu)")
    merge.add_argument("--shard-size", default="5GB", help="maximum size of one safetensors shard (default: 5GB)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare_*, della*) (default: 0)")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="read pickled .bin weights (torch.load weights_only=True)")
    merge.add_argument("--allow-nonfinite", action="store_true",
                       help="write NaN/inf weights instead of refusing them (refused by default, naming the tensor)")
    merge.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    merge.set_defaults(func=cmd_merge)


def add_methods_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    methods = sub.add_parser("methods", parents=[common], help="list merge methods and their parameters")
    methods.set_defaults(func=cmd_methods)


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.worker.merge_command import merge_from_yaml

    start = time.perf_counter()
    result = merge_from_yaml(
        args.recipe, args.out, device=args.device, shard_size=args.shard_size, seed=args.seed,
        allow_pickle=args.allow_pickle, allow_nonfinite=args.allow_nonfinite, force=args.force,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    print(f"wrote {result.out} ({result.n_tensors} tensors, {result.nbytes / 2**20:.1f} MiB, "
          f"{result.n_shards} shard(s)) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import shutil

    print("\n".join(methods_listing(shutil.get_terminal_size((100, 24)).columns)))
    return 0


def methods_listing(width: int) -> list[str]:
    """One entry per method: its name, then its whole description and its parameters (name=default; no
    default: required) and base policy, word-wrapped to `width` columns (never cut)."""
    import textwrap

    from evomerge.merge.specs import METHODS, TENSOR  # the torch-free catalogue

    indent = max(map(len, METHODS.names())) + 2

    def wrap(text: str) -> list[str]:  # at spaces only: names like nuslerp_row_wise=False stay whole
        return textwrap.wrap(text, max(width - indent, 30), break_long_words=False, break_on_hyphens=False)

    def fmt(p) -> str:
        return p.name + ("" if p.default is None else f"={p.default}")

    lines = []
    for name in METHODS.names():
        m = METHODS[name]
        body = wrap(m.description)
        if m.kind == TENSOR or m.params:  # the data-flow recipe form has its own keys, no parameters
            per_model = ", ".join(fmt(p) for p in m.params if p.per_model) or "none"
            merge_wide = ", ".join(fmt(p) for p in m.params if not p.per_model) or "none"
            base = "required" if m.needs_base else "optional"
            body += wrap(f"per model: {per_model}; merge-wide: {merge_wide}; base model: {base}")
        lines.append(name.ljust(indent) + body[0])
        lines += [" " * indent + line for line in body[1:]]
    return lines
