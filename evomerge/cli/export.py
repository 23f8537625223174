"""`evomerge export`: candidates of a run as Hugging Face checkpoints, optionally verified against the ledger.

Library imports sit inside the command, so `evomerge --help` loads no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.errors import EvomergeError

EXIT_MISMATCH = 1  # --verify found an export whose anchor answers differ from the ledger's


def add_export_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export", parents=[common], help="write candidates of a run (default: its front) as Hugging Face checkpoints",
        description="Rebuild each chosen candidate from the run's ledger (its recipe, its seed) and write it to "
        "OUT/<candidate id>/: sharded safetensors, config, tokenizer, generation config, a model card (README.md) "
        "and the recipe (mergekit_config.yml, or evomerge_recipe.yml for data-flow and hybrid merges). "
        "Exits 1 when --verify finds a mismatch.")
    export.add_argument("run_dir", type=Path, help="the run directory")
    export.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--front", action="store_true", help="the current Pareto front, as `status` shows it: one "
                       "candidate per distinct objective vector (default)")
    which.add_argument("--ids", default=None, help="comma-separated candidate ids (ledger keys, or unique prefixes "
                       "such as g0002-0003)")
    export.add_argument("--all-ties", action="store_true", help="with the front: also every candidate that ties with "
                        "a front member on all objectives (clones), not only the earliest of each")
    export.add_argument("--verify", action="store_true", help="load each export back with plain transformers, score "
                        "it on the full tasks, and check its anchor answers equal the ledger's")
    export.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing the "
                        "directories of the candidates exported (other content is kept)")
    export.add_argument("--shard-size", default="5GB", help="maximum size of one safetensors shard (default: 5GB)")
    export.add_argument("--device", default="cpu", help="where to merge and verify: cpu, cuda, cuda:1 (default: cpu)")
    export.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evomerge.cli.progress import counting
    from evomerge.export import export_run

    ids = None
    if args.ids is not None:
        ids = [i.strip() for i in args.ids.split(",") if i.strip()]
        if not ids:
            raise EvomergeError("--ids is empty: give comma-separated candidate ids, e.g. --ids g0002-0003,g0004")
    start = time.perf_counter()
    if args.all_ties and ids is not None:
        raise EvomergeError("--all-ties applies to the front: drop it, or drop --ids")
    # a bar, or off a terminal plain lines "export: 2/5 models (40%), ..., ETA 3m10s" between the per-model ones
    with counting(Console(stderr=True), "export", "models") as progress:
        exported = export_run(args.run_dir, args.out, ids=ids, all_ties=args.all_ties, verify=args.verify,
                              force=args.force, shard_size=args.shard_size, device=args.device,
                              log=lambda msg: print(msg, file=sys.stderr), progress=progress)
    print(f"exported {len(exported)} model(s) to {args.out} in {time.perf_counter() - start:.1f} s")
    checked = [e for e in exported if e.verification is not None]
    if not checked:
        return 0
    _print_verification(checked)
    bad = [e for e in checked if not e.verification.matched]
    for e in bad:
        print(f"evomerge: anchor answers of {e.key} differ from the ledger on {len(e.verification.mismatches)} of "
              f"{e.verification.checked} items (see {e.path / 'verify.json'})", file=sys.stderr)
    return EXIT_MISMATCH if bad else 0


def _print_verification(checked) -> None:
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
