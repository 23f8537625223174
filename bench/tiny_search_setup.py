"""Build a tiny search workspace into DIR and print the path of its run config (for bench/gpu_search.sh).

The workspace is the tests' own (evomerge.testing.workspace.make_search_workspace): a tiny llama family (base + 2
sources) with a locally trained tokenizer, two tiny lm-eval multiple-choice tasks, a real calibration written by
`evomerge calibrate` (on this machine's CPU), and run.yaml, a PS task-arithmetic search made smaller here:

    python3 bench/tiny_search_setup.py /tmp/tiny_ws             # prints /tmp/tiny_ws/run.yaml
    python3 -m evomerge search /tmp/tiny_ws/run.yaml --run-dir /tmp/tiny_ws/runs/r --in-process --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="where to build the workspace (must not exist, or be empty)")
    p.add_argument("--pop-size", type=int, default=4, help="candidates per generation (default: 4)")
    p.add_argument("--generations", type=int, default=2, help="generations (default: 2)")
    p.add_argument("--items", type=int, default=30, help="items per task (default: 30)")
    p.add_argument("--anchors", type=int, default=6, help="anchor items per task (default: 6)")
    p.add_argument("--arch", default="llama", help="tiny architecture: llama, qwen2, mistral or gpt2 (default: llama)")
    args = p.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        print(f"tiny_search_setup: {args.dir} exists and is not empty", file=sys.stderr)
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)

    from evomerge.testing.tiny import TinySpec
    from evomerge.testing.workspace import make_search_workspace

    start = time.perf_counter()
    root = make_search_workspace(args.dir.resolve(), spec=TinySpec(arch=args.arch), items=args.items,
                                 anchors=args.anchors,
                                 algorithm={"pop_size": args.pop_size, "generations": args.generations})
    print(f"tiny workspace built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(root / "run.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
