"""The task-arithmetic combine step as one compiled kernel (torch.compile).

In plain torch ops a TIES combine of N task vectors makes ~6N+10 passes over memory; compiled, it
reads each task vector and the base once and writes the result once, which is what the memory-
bandwidth bound allows. Compiling takes seconds once per process and number of models (shapes are
dynamic, coefficients are tensors, so new recipes do not recompile), which pays off only when many
recipes are merged: the materializer uses it when asked (`fused=True`), one-shot merges do not.
If compilation is unavailable (no C++ compiler, say), the eager kernel runs instead, with a warning.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_compiled = None
_broken = False


def _kernel(
    out: Tensor,  # (n,)
    base: Tensor,  # (n,)
    srcs: list[Tensor],  # N x (n,)
    lo: Tensor,  # (N,) entry i of src kept where lo < |src| <= hi
    hi: Tensor,  # (N,)
    coef: Tensor,  # (N,) multiplies the kept entries
    weight: Tensor,  # (N,) what the consensus divisor counts
    lam: Tensor,  # ()
    consensus: bool,
    normalize: bool,
) -> None:
    kept = []
    for i, s in enumerate(srcs):
        a = s.abs()
        kept.append(torch.where((a > lo[i]) & (a <= hi[i]), s * coef[i], 0.0))
    if not consensus:  # coef already carries lambda and the normalization
        total = base
        for k in kept:
            total = total + k
        out.copy_(total)
        return
    summed = kept[0]
    for k in kept[1:]:
        summed = summed + k
    sign = torch.where(summed >= 0, 1.0, -1.0)
    agreeing = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for i, k in enumerate(kept):
        agree = k * sign > 0
        agreeing = agreeing + torch.where(agree, k, 0.0)
        divisor = divisor + torch.where(agree, weight[i], 0.0)
    if normalize:
        agreeing = agreeing / torch.where(divisor == 0, 1.0, divisor)
    out.copy_(base + lam * agreeing)


def _compiled_kernel():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_kernel, dynamic=True, fullgraph=True)
    return _compiled


def fused_combine(out: Tensor, base: Tensor, parts: Sequence, *, lam: float, consensus: bool, normalize: bool, ws=None) -> None:
    """Same result as the eager combine (up to float rounding), in one pass over memory."""
    global _broken
    dev = base.device
    args = (
        out.view(-1),
        base.reshape(-1),
        [p.src.reshape(-1) for p in parts],
        torch.tensor([p.keep.lo for p in parts], device=dev),
        torch.tensor([p.keep.hi for p in parts], device=dev),
        torch.tensor([p.coef for p in parts], device=dev),
        torch.tensor([p.weight for p in parts], device=dev),
        torch.tensor(lam, device=dev),
        consensus,
        normalize,
    )
    if not _broken:
        try:
            _compiled_kernel()(*args)
            return
        except Exception as e:  # compilation needs a working compiler toolchain; degrade, don't fail
            _broken = True
            log.warning("fused merge kernel unavailable (%s: %s); using the eager kernel", type(e).__name__, e)
    _kernel(*args)
