"""Check: the exact magnitude cut of TIES and breadcrumbs without selection caches (sparsify.kth_largest) equals
kthvalue's on this device, and how long each takes on tensors of a 1B model's sizes.

    .venv/bin/python bench/check_selection.py [--device cuda]

Prints, per size and density, ms for kthvalue, kth_largest and the whole exact selection (select_ranks_into), and
exits 1 if any cut differs.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from benchlib import device_argument

from evomerge.merge.sparsify import kth_largest, select_ranks_into

SIZES = {"embeddings 32000x2048": 65_536_000, "mlp 5632x2048": 11_534_336, "attention 2048x2048": 4_194_304}


def timed(device: torch.device, repeats: int, fn, *args) -> tuple[object, float]:
    """fn(*args) and its median ms over `repeats` calls after a warm-up one."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = fn(*args)
    secs = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = fn(*args)
        sync()
        secs.append(time.perf_counter() - t)
    return result, statistics.median(secs) * 1e3


def main() -> int:
    device = device_argument(__doc__)
    gen = torch.Generator().manual_seed(0)
    bad = 0
    print("| tensor | density | kthvalue ms | kth_largest ms | select_ranks_into ms | equal |")
    print("|---|---|---|---|---|---|")
    for name, n in SIZES.items():
        x = (torch.randn(n, generator=gen) * 0.02).bfloat16().float().to(device)  # bf16 steps: tied magnitudes
        mag, out = x.abs(), torch.empty_like(x)
        for density in (0.1, 0.5, 0.9):
            k = max(1, int(density * n))
            ref, ref_ms = timed(device, 1, torch.kthvalue, mag, n - k + 1)  # slow on CUDA: once
            cut, ms = timed(device, 3, kth_largest, mag, k)
            _, select_ms = timed(device, 3, select_ranks_into, x, k, 0, out)
            kept = int((out != 0).sum())
            same = bool(ref.values == cut) and kept == k  # randn has no zeros: every kept entry shows
            bad += not same
            print(f"| {name} | {density} | {ref_ms:.1f} | {ms:.2f} | {select_ms:.2f} | {same} ({kept} kept of {k}) |")
    print("cuts equal" if not bad else f"{bad} cuts differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
