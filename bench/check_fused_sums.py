"""Check: the compiled weighted sum (linear, task arithmetic) writes the eager ops' bits on this device.

    .venv/bin/python bench/check_fused_sums.py [--device cuda]

Random bf16 and float32 sources (base + K fine-tunes, K = 1..3), sizes with and without a vector tail; prints the
entries that differ per case and exits 1 if any does. On CPU the tests check the same through the Materializer;
this is the GPU's counterpart (Triton contracts `total + delta * c` into the fused multiply-add eager CUDA uses).
"""

from __future__ import annotations

import sys

import torch
from benchlib import device_argument

from evomerge.merge import fused
from evomerge.merge.fused import fused_weighted_sum
from evomerge.merge.methods import WeightedSum


def main() -> int:
    device = device_argument(__doc__)
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for dtype in (torch.bfloat16, torch.float32):
        for k in (1, 2, 3):
            for n in (1_000_003, 1 << 22):
                base = torch.randn(n, generator=gen) * 0.02
                sources = [(base + torch.randn(n, generator=gen) * 1e-3).to(dtype).to(device) for _ in range(k)]
                base = base.to(dtype).to(device)
                coefs = torch.rand(k, generator=gen).tolist()
                wide = base.float()  # the Materializer's eager path: float32 task vectors, WeightedSum.apply
                total = WeightedSum(1.0, tuple(coefs)).apply(wide, [s.float() - wide for s in sources],
                                                             torch.empty_like(wide))
                eager = total.to(torch.bfloat16)
                compiled = torch.empty_like(eager)
                if not fused_weighted_sum(compiled, base, sources, coefs):
                    break
                differ = int((eager.view(torch.int16) != compiled.view(torch.int16)).sum())
                bad += differ
                print(f"{device.type} {str(dtype).removeprefix('torch.')} K={k} n={n}: {differ} entries differ")
    if fused._broken:
        print("the compiled kernels were unavailable: the eager fallback ran, nothing was checked")
        return 1
    print("compiled weighted sum == eager bits" if not bad else f"{bad} entries differ in all")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
