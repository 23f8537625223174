"""How fast the search's NaN/inf preflight reads source weights, against this machine's copy bandwidth.

    .venv/bin/python bench/bench_finite_scan.py [--gib 1]

Writes one bf16 safetensors file of --gib GiB (random normal values, so every chunk is clean and the scan
takes its fast path), reads it once to warm the page cache, then times in one run: the scan
(evomerge.io.finite_scan) and a plain numpy copy of the same bytes from the same memory map. Prints both
rates and their ratio: the scan should cost no more than reading the bytes once.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from evomerge.io.finite_scan import nonfinite_tensors

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp)
        n = int(args.gib * 2**30) // 2 // 64
        save_file({f"w{i}": torch.randn(n, dtype=torch.bfloat16) for i in range(64)}, model / "model.safetensors")
        file = model / "model.safetensors"
        nbytes = file.stat().st_size
        raw = np.memmap(file, dtype=np.uint8, mode="r")
        out = np.empty_like(raw)
        np.copyto(out, raw)  # warm the page cache and the destination's pages
        assert nonfinite_tensors(model) == []
        copy_s = _best_of(3, lambda: np.copyto(out, raw))
        scan_s = _best_of(3, lambda: nonfinite_tensors(model))
    print(f"{nbytes / 2**30:.2f} GiB of bf16 weights (page cache warm), best of 3")
    print(f"copy (numpy, memory map -> buffer): {nbytes / copy_s / 1e9:6.2f} GB/s")
    print(f"NaN/inf scan (evomerge):            {nbytes / scan_s / 1e9:6.2f} GB/s")
    print(f"scan time / copy time: {scan_s / copy_s:.2f}")


if __name__ == "__main__":
    main()
