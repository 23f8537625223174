"""Masks that sparsify task vectors: exact magnitude rank ranges, and seeded Bernoulli draws.

Magnitude selection is the hot spot of TIES and breadcrumbs: a `kthvalue` costs ~20 memory copies
of the tensor on CPU. The materializer keeps, per resident task vector, its magnitudes sorted once
(`SortedMagnitudes`, 4 bytes per entry), so "the k largest" becomes two thresholds found by binary
search: keep lo < |x| <= hi, which a single pass (or a fused kernel) applies. Only when equal
magnitudes straddle a cut are tied positions looked up, so that exactly k entries are kept (ties go
to the lowest index, deterministically).

Random masks draw 16-bit uniform lanes from int64 words (four lanes per word, ~8x cheaper than
`torch.bernoulli` on CPU); keep probabilities are thereby multiples of 2^-16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LANES = 1 << 16


class SortedMagnitudes:
    """|x| of one fixed tensor, sorted ascending (float32, flat, on x's device)."""

    def __init__(self, x: torch.Tensor) -> None:
        mag = x.detach().reshape(-1).abs().float()
        if mag.device.type == "cpu":  # numpy's vectorized sort is ~10x faster than torch.sort on CPU
            import numpy as np

            self.values = torch.from_numpy(np.sort(mag.numpy()))
        else:
            self.values = torch.sort(mag).values
        self.numel = mag.numel()

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass(frozen=True)
class RankRange:
    """Entries kept: lo < |x| <= hi, plus `add` (flat positions) minus `drop` (flat positions).
    The position lists are non-empty only where equal magnitudes straddle a cut."""

    lo: float
    hi: float
    add: torch.Tensor | None = None
    drop: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.add is None and self.drop is None


def _top_cut(x: torch.Tensor, k: int, sm: SortedMagnitudes | None) -> tuple[float, torch.Tensor | None]:
    """Strict threshold t and tied positions p such that {|x| > t} plus p are exactly the k largest."""
    n = x.numel()
    if k >= n:
        return -1.0, None
    if k <= 0:
        return math.inf, None
    if sm is None:  # reference path: a full selection
        mag = x.reshape(-1).abs().float()
        t = torch.kthvalue(mag, n - k + 1).values
        need = k - int((mag > t).sum())
        return float(t), (mag == t).nonzero().squeeze(1)[:need]  # nonzero() is ascending: lowest indices win
    v = sm.values
    t = v[n - k]  # the k-th largest
    first = int(torch.searchsorted(v, t.reshape(1)))  # where the run of entries equal to t starts
    if first == n - k:  # the run lies inside the top k: cut strictly above the next smaller value
        return (float(v[first - 1]) if first > 0 else -1.0), None
    greater = n - int(torch.searchsorted(v, t.reshape(1), right=True))
    need = k - greater  # tied entries that belong to the top k
    tied = (x.reshape(-1).abs().float() == t).nonzero().squeeze(1)
    return float(t), tied[:need]


def rank_range(x: torch.Tensor, upto: int, skip: int = 0, sm: SortedMagnitudes | None = None) -> RankRange:
    """Keep the entries ranked skip .. upto-1 by descending magnitude (exact counts)."""
    lo, add = _top_cut(x, upto, sm)
    if skip <= 0:
        return RankRange(lo, math.inf, add)
    hi_strict, drop = _top_cut(x, skip, sm)  # the top `skip` are |x| > hi_strict plus `drop`
    return RankRange(lo, hi_strict, add, drop)


def apply_rank_range(x: torch.Tensor, r: RankRange, out: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """out = x where kept, 0 elsewhere."""
    torch.ops.aten.hardshrink.out(x, r.lo, out=out)  # keeps |x| > lo
    if r.add is not None and r.add.numel():
        out.view(-1)[r.add] = x.reshape(-1)[r.add]
    if r.hi != math.inf:
        assert scratch is not None, "a finite upper cut needs scratch"
        torch.ops.aten.hardshrink.out(out, r.hi, out=scratch)
        out.sub_(scratch)
    if r.drop is not None and r.drop.numel():
        out.view(-1)[r.drop] = 0
    return out


def row_ranks(x: torch.Tensor) -> torch.Tensor:
    """Magnitude rank of every entry within its row (dim 1; a 1-D tensor is one row), 0 = smallest.
    Stored compactly (int16, offset by -2^15) when rows are at most 2^16 long."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    ranks = rows.abs().argsort(dim=1).argsort(dim=1)
    if rows.shape[1] <= _LANES:
        return (ranks - 32768).to(torch.int16)
    return ranks.to(torch.int32)


def ranks_as_float(ranks: torch.Tensor) -> torch.Tensor:
    return ranks.float() + 32768 if ranks.dtype == torch.int16 else ranks.float()


def keep_fraction_count(density: float, numel: int) -> int:
    """Elements kept at a density, as mergekit counts them: int(density * numel)."""
    return int(density * numel)


def random_lanes(n: int, generator: torch.Generator, device: torch.device, words: torch.Tensor | None = None) -> torch.Tensor:
    """n uniform int16 lanes (each 16 random bits), four per 64-bit random word."""
    if words is None or words.numel() < (n + 3) // 4:
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words = words[: (n + 3) // 4]
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:n]


def lane_threshold(p: float) -> tuple[int, float]:
    """(t, p_eff): a lane l is kept when l + 2^15 < t, so P(keep) = p_eff = t / 2^16 = round(p * 2^16) / 2^16."""
    t = round(min(max(p, 0.0), 1.0) * _LANES)
    return t, t / _LANES


def bernoulli_into(out: torch.Tensor, p: float, generator: torch.Generator, words: torch.Tensor | None = None) -> float:
    """Fill out (float) with a 0/1 mask, each entry 1 with probability p_eff; return p_eff."""
    t, p_eff = lane_threshold(p)
    if t >= _LANES:
        out.fill_(1)
        return p_eff
    lanes = random_lanes(out.numel(), generator, out.device, words)
    torch.lt(lanes.view(out.shape), t - 32768, out=out)
    return p_eff


def bernoulli_tensor(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """0/1 float mask with per-entry keep probabilities p (each rounded to a multiple of 2^-16)."""
    t = torch.round(p.clamp(0, 1) * _LANES).to(torch.int32)
    lanes = random_lanes(p.numel(), generator, p.device).view(p.shape).to(torch.int32) + 32768
    return (lanes < t).to(p.dtype)
