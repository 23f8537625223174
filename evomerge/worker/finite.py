"""Finite weights: the check the Evaluator runs on every candidate and `evomerge merge` on every output."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every entry of every tensor is finite. One float32 sum per tensor (no tensor-sized boolean
    mask), one host sync: a NaN or inf anywhere makes its tensor's sum non-finite; only a tensor whose sum is
    not finite is then checked entry by entry (its sum may have overflowed from huge finite values)."""
    tensors = [t for t in tensors if t.dtype.is_floating_point and t.numel()]
    if not tensors:
        return True
    finite = torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors]))
    if bool(finite.all()):
        return True
    # a non-finite sum: a NaN/inf entry, or finite entries so large that their sum overflows; look exactly
    return all(bool(torch.isfinite(t).all()) for t, f in zip(tensors, finite.tolist()) if not f)


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or inf, in order (cheap when there are none: see all_finite)."""
    named = list(named)
    if all_finite(t for _, t in named):
        return []
    return [name for name, t in named if not all_finite([t])]
