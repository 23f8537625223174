"""Full-task responses of demo-size models, for bench_irt.py: calibration rows and held-out merges.

Builds (or reuses) the demo kit, then scores on the full search split of each demo task: the two
specialists, the base, --calibration-merges seeded random merges (exactly what `evomerge calibrate`
scores), and --heldout-merges further merges from the same distribution that calibration never sees
(rows named heldout_*). Writes one CSV per task and prints how long scoring took per item, the cost
that anchors save.

    .venv/bin/python bench/demo_irt_responses.py --out bench/out/demo_irt
    .venv/bin/python bench/bench_irt.py --responses bench/out/demo_irt/demo_add.csv --sources adder,translator
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoTokenizer

from evomerge.demo.kit import build_demo_kit
from evomerge.fitness.lmeval import Scorer
from evomerge.fitness.self_calibration import reference_models, score_references, write_responses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/demo_irt"))
    p.add_argument("--cache", type=Path, default=Path(".cache/demo"))
    p.add_argument("--tasks", default="demo_add,demo_words,demo_cross")
    p.add_argument("--calibration-merges", type=int, default=30)
    p.add_argument("--heldout-merges", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-only", action="store_true", help="only time anchor-subset vs full-task scoring")
    args = p.parse_args()

    kit = build_demo_kit(args.cache, log=print)
    sources = dict(kit.specialists)
    paths = {**{n: str(q) for n, q in sources.items()}, "base": str(kit.base)}
    refs = reference_models(list(sources), "base", args.calibration_merges + args.heldout_merges, args.seed)
    n_calib = len(sources) + 1 + args.calibration_merges
    scorer = Scorer(tasks=args.tasks.split(","), tokenizer=AutoTokenizer.from_pretrained(kit.base), batch_size=64)
    n_items = sum(scorer.num_items(t) for t in scorer.tasks)
    if args.timing_only:
        return time_anchors(scorer, paths, refs[-3:], n_items)
    start = time.perf_counter()
    responses = score_references(refs, paths, "base", scorer,
                                 progress=lambda done, total, name: print(f"\r{done}/{total}", end="", flush=True))
    seconds = time.perf_counter() - start
    print()
    for task, r in responses.items():
        names = r.models[:n_calib] + [f"heldout_{m}" for m in r.models[n_calib:]]
        responses[task] = type(r)(names, r.items, r.values, r.source)
    for path in write_responses(responses, args.out):
        print(f"wrote {path}")
    print(f"{len(refs)} models x {n_items} items scored in {seconds:.1f} s ({1e3 * seconds / len(refs):.0f} ms per model)")
    time_anchors(scorer, paths, refs[-3:], n_items)


def time_anchors(scorer, paths: dict[str, str], probe: list, n_items: int) -> None:
    """Wall time of scoring n items per task vs all items, on the same models, materialization included."""
    from evomerge.worker.materializer import Materializer

    materializer = Materializer(paths, "base")

    def per_model(items) -> float:
        start = time.perf_counter()
        for ref in probe:
            scorer.score(materializer.materialize(ref.recipe), items=items)
        return (time.perf_counter() - start) / len(probe)

    full = per_model(None)
    print(f"wall time per model: {1e3 * full:.0f} ms on all {n_items} items")
    for n in (10, 20, 30, 60, 100):
        part = per_model({t: list(range(n)) for t in scorer.tasks})
        print(f"  n={n:3d} per task: {1e3 * part:6.0f} ms, {part / full:.3f} of the full-task time "
              f"({n * len(scorer.tasks) / n_items:.3f} of the items)")

if __name__ == "__main__":
    main()
