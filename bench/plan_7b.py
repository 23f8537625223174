"""The memory plan of a 7B search: does a Mistral-7B-shaped TIES search of base + 3 fine-tunes (bf16) fit an 80 GB
GPU with the sources on the device, and a 24 GB GPU with the sources on the host?

The sources are header-only checkpoints (evomerge.testing.sparse: the data region is a hole, so ~0 disk): the
planner reads headers and config.json only. Targets are the free memory of fresh cards (mem_get_info of an 80 GB
H100/A100 and of a 24 GB card, before anything else runs). The host is stated (--host-memory) so the result does not
depend on this machine.

    .venv/bin/python bench/plan_7b.py [--out bench/out/plan_7b] [--batch-size 8] [--host-memory 256GB]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from evomerge.config import RunConfig
from evomerge.search.capacity import parse_size, workers_for
from evomerge.search.memory_plan import gib, plan_search
from evomerge.testing.sparse import MISTRAL_7B, disk_bytes, llama_shapes, write_sparse_checkpoint

K = 3
CARDS = {"80 GB card (79.2 GiB free)": "79.2GiB", "24 GB card (23.6 GiB free)": "23.6GiB"}


def write_sources(root: Path) -> dict[str, Path]:
    shapes = llama_shapes(MISTRAL_7B)
    return {name: write_sparse_checkpoint(root / name, MISTRAL_7B, shapes, "BF16")
            for name in ("base", *(f"ft{i}" for i in range(K)))}


def config_for(root: Path, batch_size: int, placement: str) -> RunConfig:
    return RunConfig.model_validate({
        "name": "plan7b",
        "sources": {"models": {f"ft{i}": str(root / f"ft{i}") for i in range(K)}, "base_model": str(root / "base"),
                    "placement": placement},
        "search_space": {"preset": "ps_ties_dare", "ps": {"methods": ["ties"]}},
        "fitness": {"calibration": "unused.json", "batch_size": batch_size},  # the planner does not read it
        "objectives": [{"task": "t"}],
        "workers": {"gpus_per_worker": 1, "count": 1},
    })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="where the header-only sources go (default: a temp dir)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="fitness.batch_size values planned (default: 1,8,32)")
    ap.add_argument("--host-memory", default="256GB", help="host RAM of the GPU node (default: 256GB)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        t = time.perf_counter()
        paths = write_sources(root)
        apparent = sum(f.stat().st_size for p in paths.values() for f in p.glob("*.safetensors"))
        print(f"wrote {len(paths)} header-only Mistral-7B checkpoints (bf16): {apparent / 2**30:.1f} GiB apparent, "
              f"{sum(disk_bytes(p) for p in paths.values()) / 2**20:.2f} MiB on disk, {time.perf_counter() - t:.2f} s")
        host = parse_size(args.host_memory, "--host-memory")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for placement in ("device", "host"):
                config = config_for(root, batch, placement)
                for i, (card, free) in enumerate(CARDS.items()):
                    workers = workers_for(config, device_memory=parse_size(free, "--device-memory"), host_memory=host)
                    t = time.perf_counter()
                    plan = plan_search(config, root, "bench", workers)
                    took = time.perf_counter() - t
                    e = plan.configured
                    if i == 0:
                        parts = ", ".join(f"{n} {gib(b)}{' (host)' if p == 'host' else ''}" for n, b, p in e.parts)
                        print(f"\nTIES K={K}, batch {batch} x {plan.workload.seq_len} tokens, placement {placement}: "
                              f"{gib(e.per_gpu)} per GPU, {gib(e.host_node)} host RAM (planned in {took:.3f} s)\n"
                              f"  {parts}")
                    verdict = "FITS" if e.fits else f"does not fit -> {plan.verdict()}"
                    print(f"  {card}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
