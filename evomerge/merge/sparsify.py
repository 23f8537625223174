"""Masks that sparsify task vectors: exact magnitude rank ranges, and seeded Bernoulli draws.

Magnitude selection is the hot spot of TIES and breadcrumbs: a `kthvalue` costs ~20 memory copies
of the tensor on CPU. The materializer keeps, per resident task vector, its magnitudes sorted once
(`SortedMagnitudes`, 4 bytes per entry), so "the k largest" becomes two thresholds found by binary
search: keep lo < |x| <= hi, which a single pass (or a fused kernel) applies. Only when equal
magnitudes straddle a cut are tied positions looked up, so that exactly k entries are kept (ties go
to the lowest index, deterministically).

Random masks come from a counter-based hash of (seed, position), 16 bits per entry: the same on
every device and in every kernel; keep probabilities are thereby multiples of 2^-16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evomerge.seeds import derive_seed

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
        if float(t) == 0.0:  # tied zeros: the same values whichever of them are kept
            return 0.0, None
        need = k - int((mag > t).sum())
        return float(t), (mag == t).nonzero().squeeze(1)[:need]  # nonzero() is ascending: lowest indices win
    v = sm.values
    t = v[n - k]  # the k-th largest
    if float(t) == 0.0:  # the tie is among zeros: kept or not, they add nothing (frozen weights' task vectors)
        return 0.0, None
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


def _top_mask(mag: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """out (bool) = the k largest of mag, ties at the cut to the lowest positions; device ops only, so an
    accelerator never waits on a host sync (the count of tied entries to keep stays a device tensor)."""
    n = mag.numel()
    if k >= n or k <= 0:
        return out.fill_(k > 0)
    t = torch.kthvalue(mag, n - k + 1).values  # the k-th largest
    torch.gt(mag, t, out=out)
    need = k - out.sum()  # tied entries that belong to the top k
    tied = mag == t
    out |= tied & (tied.cumsum(0, dtype=torch.int32) <= need)
    return out


def select_ranks_into(x: torch.Tensor, upto: int, skip: int, out: torch.Tensor) -> torch.Tensor:
    """out = x where its descending magnitude rank is in skip .. upto-1, else 0: the same entries as
    rank_range + apply_rank_range keep, found per call without sorted magnitudes."""
    mag = x.reshape(-1).abs()
    keep = _top_mask(mag, upto, torch.empty(mag.shape, dtype=torch.bool, device=x.device))
    if skip > 0:
        keep &= ~_top_mask(mag, skip, torch.empty_like(keep))
    return torch.where(keep.view(x.shape), x, torch.zeros((), dtype=x.dtype, device=x.device), out=out)


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


# Random masks come from a counter-based hash of (seed, position): Mueller's 32-bit mixer written in
# int64 arithmetic that never overflows (every product stays below 2^63). The same draws therefore come
# out of eager ops, compiled kernels, CPU and GPU, and a fused kernel computes them in registers
# instead of reading random numbers from memory.
_K1 = 0x9E3779B1  # < 2^32; positions < 2^31, so position * _K1 + seed < 2^63
_K2 = 0x045D9F3B  # < 2^27; 32-bit values times it stay below 2^59
_MASK32 = 0xFFFFFFFF
_CHUNK = {"cpu": 1 << 16}  # entries per chunk of eager draws: cache-sized on CPU, large where launches cost
_CHUNK_DEFAULT = 1 << 24


def model_seed(seed: int, model: int) -> int:
    """31-bit seed of one model's draws within one tensor (hash_lanes needs seeds below 2^31)."""
    return derive_seed(seed, model, bits=31)


def hash_lanes(positions: torch.Tensor, seed) -> torch.Tensor:
    """Uniform integers in [0, 2^16) for int64 positions (< 2^31) and a 31-bit seed (int or tensor)."""
    h = (positions * _K1 + seed) & _MASK32
    h = ((h ^ (h >> 16)) * _K2) & _MASK32
    h = ((h ^ (h >> 16)) * _K2) & _MASK32
    return (h ^ (h >> 16)) >> 16


KEEP_EVERY = _LANES  # a threshold that keeps every entry


def keep_threshold(p: float) -> int:
    """A lane is kept when below this: P(keep) = round(p * 2^16) / 2^16."""
    return round(min(max(p, 0.0), 1.0) * _LANES)


def _check_size(n: int) -> None:
    if n >= 2**31:
        raise ValueError(f"a tensor of {n} entries is too large for the random masks (limit 2^31)")


def _lane_chunks(n: int, seed: int, device: torch.device):
    """Yield (start, lanes) over positions 0..n-1: hash_lanes, step for step, computed in place on
    reused int64 buffers (fresh int64 temporaries per op would cost more than the hashing)."""
    _check_size(n)
    chunk = _CHUNK.get(torch.device(device).type, _CHUNK_DEFAULT)
    h = torch.empty(min(n, chunk), dtype=torch.int64, device=device)
    t = torch.empty_like(h)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        hm, tm = h[:m], t[:m]
        torch.arange(start, start + m, out=hm)
        hm.mul_(_K1).add_(seed).bitwise_and_(_MASK32)
        for _ in range(2):
            torch.bitwise_right_shift(hm, 16, out=tm)
            hm.bitwise_xor_(tm).mul_(_K2).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(hm, 16, out=tm)
        yield start, hm.bitwise_xor_(tm).bitwise_right_shift_(16)


def bernoulli_into(out: torch.Tensor, threshold: int, seed: int) -> None:
    """Fill out (float) with a 0/1 mask: entry i is 1 when hash_lanes(i, seed) < threshold
    (keep_threshold(p) for a keep probability p)."""
    flat = out.view(-1)
    for start, lanes in _lane_chunks(flat.numel(), seed, out.device):
        torch.lt(lanes, threshold, out=flat[start : start + lanes.numel()])


def bernoulli_tensor(p: torch.Tensor, seed: int) -> torch.Tensor:
    """0/1 float mask with per-entry keep probabilities p (each rounded to a multiple of 2^-16)."""
    t = torch.round(p.reshape(-1).clamp(0, 1) * _LANES).long()
    mask = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
    for start, lanes in _lane_chunks(p.numel(), seed, p.device):
        end = start + lanes.numel()
        torch.lt(lanes, t[start:end], out=mask[start:end])
    return mask.view(p.shape)
