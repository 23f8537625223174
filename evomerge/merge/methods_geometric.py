"""Spherical merges added with mergekit 0.1.5: nuslerp, multislerp and karcher.

Same calling convention as evomerge.merge.methods (whose bottom import registers these): `base` in float32
and `deltas`, each `model - base` (None: the input is the base itself); parameters resolved per tensor, each a
required keyword. Semantics, including the numerical guards (eps clamps, colinear fallbacks), follow mergekit
0.1.5 so that merges agree to float32 rounding (bench/check_against_mergekit.py).

nuslerp and multislerp have two forms in mergekit: with a base they interpolate task vectors and add the result
to the base (`relative=True`), without one (a recipe with no base_model) they interpolate the
models' weights (`relative=False`, where `base` is only the reference the deltas are taken against). The
keyword is the one extension of the calling convention here: the per-tensor form cannot tell "the models' common
base" from "the reference of the deltas", and these two forms differ exactly there.

Simple implementations: they allocate (no `ws` scratch); `out`, when given, receives the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.methods import implements


def _finish(result: Tensor, out: Tensor | None) -> Tensor:
    return out.copy_(result) if out is not None else result


def _weights_of_inputs(base: Tensor, deltas: Sequence[Tensor | None], weight: Sequence[float] | float,
                       relative: bool) -> tuple[list[Tensor], list[float]]:
    """The vectors a spherical method interpolates, with their weights: relative, the task vectors (the base's
    own, None, is not an input, as in mergekit); otherwise every input's weights (base + delta)."""
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(deltas)
    if relative:
        pairs = [(d, w) for d, w in zip(deltas, weights) if d is not None]
    else:
        pairs = [(base if d is None else base + d, w) for d, w in zip(deltas, weights)]
    return [v for v, _ in pairs], [float(w) for _, w in pairs]


# -- nuslerp ---------------------------------------------------------------------------------------------


def _unit_rows(x: Tensor) -> Tensor:
    """x / ||x|| along the last dim, the norm clamped at 1e-7 (mergekit's guard for zero rows)."""
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def _slerp_rows(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of each row (last dim) of v0 toward v1; rows whose angle is ~0 or ~pi
    (1 - cos^2 <= eps^2) interpolate linearly. Norms follow the arc formula: equal-norm rows keep their norm."""
    cos = (_unit_rows(v0) * _unit_rows(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # finite on the branch torch.where discards
    arc = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, arc)


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool, flatten: bool) -> Tensor:
    """mergekit's nuslerp of two tensors: flatten, the whole tensor is one vector; otherwise each row
    (row_wise: each column, i.e. vectors along dim 0) is interpolated on its own."""
    shape = v0.shape
    if flatten:
        return _slerp_rows(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    if row_wise:  # vectors along dim 0: move that dim last
        return _slerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1).reshape(shape)
    return _slerp_rows(t, v0, v1).reshape(shape)


@implements("nuslerp")
def nuslerp(base, deltas, *, weight, nuslerp_row_wise, nuslerp_flatten, relative=True, out=None, ws=None):
    """t = weight_2 / (weight_1 + weight_2) (0.5 when the weights sum to ~0): t = 0 gives the first model."""
    vs, wts = _weights_of_inputs(base, deltas, weight, relative)
    if len(vs) != 2:
        raise ValueError(f"nuslerp merges exactly 2 models{' besides the base' if relative else ''}, got {len(vs)}")
    total = sum(wts)
    t = 0.5 if abs(total) < 1e-6 else wts[1] / total
    merged = nuslerp_vectors(t, vs[0], vs[1], row_wise=bool(nuslerp_row_wise), flatten=bool(nuslerp_flatten))
    return _finish(base + merged if relative else merged, out)


# -- multislerp ------------------------------------------------------------------------------------------


@implements("multislerp")
def multislerp(base, deltas, *, weight, normalize_weights, eps, relative=True, out=None, ws=None):
    """Barycentric interpolation on the unit sphere: the weighted mean direction, corrected in its tangent
    space and mapped back by the exponential map, scaled by the weighted mean norm."""
    vs, wts = _weights_of_inputs(base, deltas, weight, relative)
    if not vs:
        return _finish(base.clone(), out)
    if len(vs) == 1:  # nothing to interpolate: mergekit returns that model
        return _finish(base + vs[0] if relative else vs[0].clone(), out)  # a copy: vs[0] may be the base
    flat = torch.stack([v.reshape(-1) for v in vs])  # (N, P)
    w = torch.tensor(wts, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (N, 1)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)  # (P,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:  # the directions cancel out
        if len(vs) != 2:
            raise ValueError("multislerp: the weighted directions cancel out (antipodal inputs with balancing "
                             "weights): change a weight")
        result = flat[0] * w[0] + flat[1] * w[1]  # two inputs: linear interpolation, as mergekit
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean  # (N, P)
        step = (tangents * w.view(-1, 1)).sum(0)
        step_norm = torch.norm(step) + eps
        result = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
        result = result * (norms.squeeze(-1) * w).sum()
    result = result.view(base.shape)
    return _finish(base + result if relative else result, out)


# -- karcher ---------------------------------------------------------------------------------------------


@implements("karcher")
def karcher(base, deltas, *, max_iter, tol, out=None, ws=None):
    """Equal-weight Karcher (Riemannian) mean of every input's direction (the base counts as an input when
    listed or given, as in mergekit), by at most max_iter Riemannian gradient steps, scaled by the mean norm."""
    if max_iter != int(max_iter) or max_iter < 0:
        raise ValueError(f"karcher max_iter must be a whole number >= 0, got {max_iter}")
    xs = [base if d is None else base + d for d in deltas]
    if len(xs) == 1:
        return _finish(xs[0].clone(), out)
    return _finish(karcher_mean(xs, [1.0 / len(xs)] * len(xs), int(max_iter), float(tol)), out)


def karcher_mean(xs: Sequence[Tensor], alphas: Sequence[float], max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher mean on the unit sphere, times sum_i alpha_i * ||x_i||. Inputs of norm <= tol take
    no part in the direction (but do in the scale); if every input is that small, the result is zero."""
    norms = [torch.linalg.vector_norm(x) for x in xs]  # 0-dim tensors
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    units = [xs[i] / norms[i] for i in valid]
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]

    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mean += ai * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm  # start: the normalized mean
    for _ in range(max_iter):
        # the Riemannian gradient: sum_i a_i * log_mean(u_i), log_m(u) = theta / sin(theta) * (u - cos(theta) m)
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)  # the exponential map
        n = torch.linalg.vector_norm(mean)
        if n.item() > tol:
            mean = mean / n
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return scale * mean

