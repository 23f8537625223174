"""Entry-selecting merges added with mergekit 0.1.5: sce, nearswap, arcee_fusion, ram and ramplus_tl.

Same calling convention as evomerge.merge.methods (whose bottom import registers these): `base` in float32
and `deltas`, each `model - base`; every method here is taken against the base, whose own task vector (None)
is not an input, as in mergekit. Semantics follow mergekit 0.1.5 (bench/check_against_mergekit.py compares).

Simple implementations: they allocate (no `ws` scratch); `out`, when given, receives the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evomerge.merge.methods import implements


def _finish(result: Tensor, out: Tensor | None) -> Tensor:
    return out.copy_(result) if out is not None else result


def _task_vectors(deltas: Sequence[Tensor | None]) -> Tensor | None:
    """(N, *shape): the models' task vectors, the base's own (None) left out; None when none is left."""
    present = [d for d in deltas if d is not None]
    return torch.stack(present) if present else None


# -- sce -------------------------------------------------------------------------------------------------


def sce_select(tvs: Tensor, select_topk: float) -> Tensor:
    """Mask (float, shaped like one task vector) of the entries whose variance across the models is among the
    top select_topk fraction of the entries that vary at all (entries all models change alike never count)."""
    if select_topk <= 0:
        return torch.zeros_like(tvs[0])
    if select_topk >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)  # float32 product, as mergekit rounds it
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


@implements("sce")
def sce(base, deltas, *, select_topk, int8_mask, out=None, ws=None):
    """Select (select_topk), Calculate (each model's weight: the mean square of its selected task vector, over
    their sum), Erase (entries whose sign differs from the sign of the sum), then the weighted mean of what is left."""
    tvs = _task_vectors(deltas)
    if tvs is None:
        return _finish(base.clone(), out)
    if select_topk < 1:
        tvs = tvs * sce_select(tvs, select_topk).unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1  # a zero sum counts as positive
    agree = tvs.sign() == majority  # zero entries agree with neither sign
    energy = tvs.square().reshape(len(tvs), -1).mean(dim=1)  # (N,)
    total = energy.sum().item()
    w = torch.full_like(energy, 1 / len(tvs)) if abs(total) < 1e-6 else energy / total
    w = w.view(-1, *([1] * (tvs.dim() - 1))) * agree  # (N, *shape)
    merged = (tvs * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)
    return _finish(base + merged, out)


# -- nearswap --------------------------------------------------------------------------------------------


def _one_task_vector(deltas: Sequence[Tensor | None], method: str) -> Tensor | None:
    present = [d for d in deltas if d is not None]
    if len(present) > 1:
        raise ValueError(f"{method} merges exactly 1 model besides the base, got {len(present)}")
    return present[0] if present else None


@implements("nearswap")
def nearswap(base, deltas, *, t, out=None, ws=None):
    """Each entry moves from the base toward the other model by min(|difference|, t): entries that differ by at
    most t take the other model's value, the rest move by t (weight t / |difference|, clamped to [0, 1])."""
    d = _one_task_vector(deltas, "nearswap")
    if d is None:
        return _finish(base.clone(), out)
    weight = (t / d.abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return _finish(base + weight * d, out)


# -- arcee_fusion ----------------------------------------------------------------------------------------

QUANTILE_SAMPLE = 1_000_000  # larger tensors: quantiles of this many entries drawn with replacement (mergekit's)


def fusion_importance(model: Tensor, base: Tensor) -> Tensor:
    """|model - base| times the KL divergence of softmax(model) from softmax(base) along the last dim (per row)."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def outlier_threshold(scores: Tensor, seed: int) -> Tensor:
    """median + 1.5 * IQR of the scores; quantile q is the sorted sample's entry at floor(q * (n - 1))."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        gen = torch.Generator(device=flat.device).manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=gen, device=flat.device)]
    ordered = torch.sort(flat).values
    q = torch.tensor([0.25, 0.5, 0.75])
    q1, median, q3 = ordered[(q * (ordered.numel() - 1)).long().to(ordered.device)]
    return median + 1.5 * (q3 - q1)


@implements("arcee_fusion")
def arcee_fusion(base, deltas, *, seed, out=None, ws=None):
    """Keep the other model's change where its importance is an outlier. Deterministic for tensors of up to
    QUANTILE_SAMPLE entries; larger ones estimate the quartiles from a sample drawn from `seed` (mergekit
    draws it from the global torch generator)."""
    d = _one_task_vector(deltas, "arcee_fusion")
    if d is None:
        return _finish(base.clone(), out)
    importance = fusion_importance(base + d, base)
    keep = importance >= outlier_threshold(importance, seed)
    return _finish(base + d * keep, out)


# -- ram, ramplus_tl -------------------------------------------------------------------------------------


def _ram_parts(deltas: Sequence[Tensor | None], epsilon: float):
    """(task vectors zeroed where |entry| <= epsilon, (N, P); changed-entry mask; per-entry count of models
    that changed it, (1, P)); None when no model is left."""
    tvs = _task_vectors(deltas)
    if tvs is None:
        return None
    flat = tvs.reshape(len(tvs), -1)
    changed = flat.abs() > epsilon
    return flat * changed, changed, changed.sum(dim=0, keepdim=True)


@implements("ram")
def ram(base, deltas, *, epsilon, out=None, ws=None):
    """Entries one model changed are taken as they are; entries several changed get the mean of the changes."""
    parts = _ram_parts(deltas, epsilon)
    if parts is None:
        return _finish(base.clone(), out)
    tvs, _, count = parts
    merged = (tvs * (count == 1) + tvs * (count > 1) / count.clamp(min=1)).sum(dim=0)
    return _finish(base + merged.view(base.shape), out)


@implements("ramplus_tl")
def ramplus_tl(base, deltas, *, r, alpha, epsilon, out=None, ws=None):
    """RAM, with model i's unique entries scaled by 1 + r * clamp(rho_i, 0, alpha), rho_i = (entries it shares
    with another model) / (entries only it changed), counted in this tensor (tensor-local)."""
    parts = _ram_parts(deltas, epsilon)
    if parts is None:
        return _finish(base.clone(), out)
    tvs, changed, count = parts
    unique, shared = count == 1, count > 1
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)  # (N,)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (tvs * unique * boost.unsqueeze(-1) + tvs * shared / count.clamp(min=1)).sum(dim=0)
    return _finish(base + merged.view(base.shape), out)
