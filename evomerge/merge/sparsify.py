"""Masks that sparsify task vectors: exact magnitude rank ranges, and seeded Bernoulli draws.

Magnitude selection is the hot spot of TIES and breadcrumbs: a `kthvalue` costs ~20 memory copies
of the tensor on CPU (`radix_cut` finds the cut there, topk on CUDA: `kth_largest`). The
materializer keeps, per resident task vector, its magnitudes sorted once (`SortedMagnitudes`, 4 bytes
per entry), so "the k largest" becomes two thresholds found by binary search: keep lo < |x| <= hi,
which a single pass (or a fused kernel) applies. Only when equal magnitudes straddle a cut are tied
positions looked up, so that exactly k entries are kept (ties go to the lowest index, deterministically).

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
class Ties:
    """The entries whose magnitude equals `value`: the first `count` of them in flat order are meant."""

    value: float
    count: int


@dataclass(frozen=True)
class RankRange:
    """Entries kept: lo < |x| <= hi, plus the `add` ties, minus the `drop` ties. Ties are set only where
    equal magnitudes straddle a cut; a tensor merged piece by piece counts the ties earlier pieces saw."""

    lo: float
    hi: float
    add: Ties | None = None
    drop: Ties | None = None

    @property
    def exact(self) -> bool:
        return self.add is None and self.drop is None


class _Magnitudes:
    """|x| flat in float32 (made at the first cut), for exact cuts without sorted magnitudes. On CPU, large
    tensors are cut by radix_cut, whose histogram of the high bits serves a second cut (breadcrumbs cuts twice)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.numel = x, x.numel()
        self.mag: torch.Tensor | None = None
        self._high: tuple | None = None

    def cut(self, k: int) -> tuple[torch.Tensor, int, int | None]:
        """The k-th largest, the count of entries greater, and of those equal (None where not counted)."""
        if self.mag is None:
            self.mag = self.x.reshape(-1).abs().float()
        if self.mag.device.type != "cpu" or self.numel < RADIX_MIN:
            t = kth_largest(self.mag, k)
            return t, int((self.mag > t).sum()), None
        if self._high is None:
            self._high = _high_bits(self.mag)
        return radix_cut(self.mag, k, self._high)


def _top_cut(mags: _Magnitudes | None, k: int, sm: SortedMagnitudes | None) -> tuple[float, Ties | None]:
    """Strict threshold t and ties such that {|x| > t} plus the ties are exactly the k largest: from the sorted
    magnitudes where cached, else from x's (`mags`)."""
    n = sm.numel if sm is not None else mags.numel
    if k >= n:
        return -1.0, None
    if k <= 0:
        return math.inf, None
    if sm is None:  # a full selection
        t, greater, tied = mags.cut(k)
        if float(t) == 0.0:  # tied zeros: the same values whichever of them are kept
            return 0.0, None
        if tied is not None and greater + tied == k:  # every entry equal to t is kept: |x| > the float below t
            return float(torch.nextafter(t, torch.zeros_like(t))), None
        return float(t), Ties(float(t), k - greater)
    v = sm.values
    t = v[n - k]  # the k-th largest
    if float(t) == 0.0:  # the tie is among zeros: kept or not, they add nothing (frozen weights' task vectors)
        return 0.0, None
    first = int(torch.searchsorted(v, t.reshape(1)))  # where the run of entries equal to t starts
    if first == n - k:  # the run lies inside the top k: cut strictly above the next smaller value
        return (float(v[first - 1]) if first > 0 else -1.0), None
    greater = n - int(torch.searchsorted(v, t.reshape(1), right=True))
    return float(t), Ties(float(t), k - greater)  # the tied entries that belong to the top k


def rank_range(x: torch.Tensor | None, upto: int, skip: int = 0, sm: SortedMagnitudes | None = None) -> RankRange:
    """Keep the entries ranked skip .. upto-1 by descending magnitude (exact counts)."""
    mags = _Magnitudes(x) if sm is None else None  # both cuts from one |x|
    lo, add = _top_cut(mags, upto, sm)
    if skip <= 0:
        return RankRange(lo, math.inf, add)
    hi_strict, drop = _top_cut(mags, skip, sm)  # the top `skip` are |x| > hi_strict plus the `drop` ties
    return RankRange(lo, hi_strict, add, drop)


RADIX_MIN = 1 << 16  # from here a radix select beats CPU kthvalue (2^16: 0.36 vs 0.74 ms; 25M entries: 0.11 vs 0.43 s)


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the flat tensor mag (1 <= k <= numel), as a 0-d tensor on its device (CPU cuts
    of large tensors take radix_cut instead, which counts as it selects)."""
    if mag.device.type == "cpu":
        return torch.kthvalue(mag, mag.numel() - k + 1).values
    # CUDA's kthvalue selects within a slice with a single thread block: 11 s per candidate for the TIES cuts of
    # a 1B model on an H200 (bench/README.md). topk's radix select spreads one slice over the whole device.
    return kth_largest_by_topk(mag, k)


def kth_largest_by_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """kth_largest through topk, from whichever end is nearer (topk returns its k values and their indices)."""
    n = mag.numel()
    if 2 * k <= n + 1:
        return torch.topk(mag, k, sorted=False).values.min()
    return torch.topk(mag, n - k + 1, largest=False, sorted=False).values.max()


def _high_bits(mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """radix_cut's first pass: mag's bits, their high 16, and at_least[j] = the entries in buckets >= 2^15-1-j."""
    bits = mag.reshape(-1).view(torch.int32)
    high = bits >> 16  # 0 .. 2^15 - 1: the sign bit is clear
    return bits, high, torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)


def radix_cut(mag: torch.Tensor, k: int, high: tuple | None = None) -> tuple[torch.Tensor, int, int]:
    """The k-th largest of float32 magnitudes (CPU), with the counts of entries greater than it and equal to it,
    by two histograms of their bits: non-negative floats order as their bit patterns do as integers, so the high
    16 bits find the bucket that holds the k-th largest and the low 16 bits of that bucket's entries find it
    exactly. A few vectorized passes where kthvalue copies and partitions the tensor on one thread (25M entries:
    0.11 s against 0.43), and the counts need no pass of their own. high: _high_bits(mag), where known."""
    bits, high, at_least = high if high is not None else _high_bits(mag)
    j = int(torch.searchsorted(at_least, k))  # the first bucket from the top to reach k entries
    above = int(at_least[j - 1]) if j > 0 else 0
    bucket = (1 << 15) - 1 - j
    counts = torch.bincount(bits[high == bucket] & 0xFFFF, minlength=1 << 16)
    at_least = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(at_least, k - above))  # the same within the bucket, by the low bits
    low = (1 << 16) - 1 - i
    value = torch.tensor((bucket << 16) | low, dtype=torch.int32).view(torch.float32)
    return value, above + (int(at_least[i - 1]) if i > 0 else 0), int(counts[low])


def _top_mask(mag: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """out (bool) = the k largest of mag, ties at the cut to the lowest positions; device ops only, so an
    accelerator never waits on a host sync (the count of tied entries to keep stays a device tensor)."""
    n = mag.numel()
    if k >= n or k <= 0:
        return out.fill_(k > 0)
    t = kth_largest(mag, k)
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


def apply_rank_range(x: torch.Tensor, r: RankRange, out: torch.Tensor, scratch: torch.Tensor | None = None,
                     seen: dict | None = None) -> torch.Tensor:
    """out = x where kept, 0 elsewhere. seen: where x is one piece of a tensor merged in order, the ties
    earlier pieces counted, per cut (updated here); None for a whole tensor."""
    torch.ops.aten.hardshrink.out(x, r.lo, out=out)  # keeps |x| > lo
    if r.add is not None:
        torch.where(_first_ties(x, r.add, seen, "add"), x, out, out=out)
    if r.hi != math.inf:
        assert scratch is not None, "a finite upper cut needs scratch"
        torch.ops.aten.hardshrink.out(out, r.hi, out=scratch)
        out.sub_(scratch)
    if r.drop is not None:
        out.masked_fill_(_first_ties(x, r.drop, seen, "drop"), 0)
    return out


def _first_ties(x: torch.Tensor, ties: Ties, seen: dict | None, cut: str) -> torch.Tensor:
    """Bool mask of the first ties.count entries with |x| == ties.value, counting those of earlier pieces. On an
    accelerator, device ops only (the running count stays a device tensor: no host sync per tensor or piece)."""
    tied = x.abs() == ties.value
    if x.device.type == "cpu":  # no sync to avoid: the tied positions (a short list) instead of a running count
        before = int(seen.get(cut, 0)) if seen is not None else 0
        positions = tied.view(-1).nonzero().view(-1)
        if seen is not None:
            seen[cut] = before + positions.numel()
        first = torch.zeros_like(tied)
        first.view(-1)[positions[: max(0, ties.count - before)]] = True
        return first
    rank = tied.view(-1).cumsum(0, dtype=torch.int32).view(x.shape)
    if seen is not None and cut in seen:
        rank += seen[cut]
    if seen is not None:
        seen[cut] = rank.view(-1)[-1:].clone() if rank.numel() else seen.get(cut, 0)
    return tied & (rank <= ties.count)


def row_ranks(x: torch.Tensor) -> torch.Tensor:
    """Magnitude rank of every entry within its row (dim 1; a 1-D tensor is one row), 0 = smallest; equal
    magnitudes in the order of their positions (a stable sort: CPU and GPU rank ties alike, where an unstable
    CPU sort and a GPU radix sort did not). Stored compactly (int16, offset by -2^15) when rows are at most
    2^16 long."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    order = rows.abs().argsort(dim=1, stable=True)
    # the ranks are the inverse permutation of the order: one scatter instead of a second sort (half the time,
    # on CPU and GPU alike), written in the stored dtype and offset directly
    m, small = rows.shape[1], rows.shape[1] <= _LANES
    dtype, first = (torch.int16, -32768) if small else (torch.int32, 0)
    values = torch.arange(first, first + m, dtype=dtype, device=x.device).expand(rows.shape)
    return torch.empty(rows.shape, dtype=dtype, device=x.device).scatter_(1, order, values)


def ranks_as_float(ranks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row ranks (row_ranks: int16 stored offset by -32768) as float32, into `out` where given."""
    out = ranks.float() if out is None else out.copy_(ranks.view(out.shape))
    return out.add_(32768) if ranks.dtype == torch.int16 else out


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


def _lane_chunks(n: int, seed: int, device: torch.device, offset: int = 0):
    """Yield (start, lanes) over positions offset .. offset+n-1 (start counted from 0): hash_lanes, step for
    step, computed in place on reused int64 buffers (fresh int64 temporaries per op would cost more than the
    hashing)."""
    _check_size(offset + n)
    chunk = _CHUNK.get(torch.device(device).type, _CHUNK_DEFAULT)
    h = torch.empty(min(n, chunk), dtype=torch.int64, device=device)
    t = torch.empty_like(h)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        hm, tm = h[:m], t[:m]
        torch.arange(offset + start, offset + start + m, out=hm)
        hm.mul_(_K1).add_(seed).bitwise_and_(_MASK32)
        for _ in range(2):
            torch.bitwise_right_shift(hm, 16, out=tm)
            hm.bitwise_xor_(tm).mul_(_K2).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(hm, 16, out=tm)
        yield start, hm.bitwise_xor_(tm).bitwise_right_shift_(16)


def bernoulli_into(out: torch.Tensor, threshold: int, seed: int, offset: int = 0) -> None:
    """Fill out (float) with a 0/1 mask: entry i is 1 when hash_lanes(offset + i, seed) < threshold
    (keep_threshold(p) for a keep probability p; offset: where out starts in the tensor it is a piece of)."""
    flat = out.view(-1)
    for start, lanes in _lane_chunks(flat.numel(), seed, out.device, offset):
        torch.lt(lanes, threshold, out=flat[start : start + lanes.numel()])


def bernoulli_tensor(p: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """0/1 float mask with per-entry keep probabilities p (each rounded to a multiple of 2^-16, in float32)."""
    flat, mask = p.reshape(-1), torch.empty(p.numel(), dtype=p.dtype, device=p.device)
    threshold = None
    for start, lanes in _lane_chunks(p.numel(), seed, p.device, offset):
        end = start + lanes.numel()
        # round(p * 2^16) chunk by chunk in a reused float32 buffer: whole integers below 2^24, so comparing the
        # lanes with them in float32 is exact (whole-tensor int64 temporaries cost more than the draws)
        if threshold is None:
            threshold = torch.empty(lanes.numel(), dtype=torch.float32, device=p.device)
        t = threshold[: end - start]
        t.copy_(flat[start:end]).clamp_(0, 1).mul_(_LANES).round_()
        torch.lt(lanes, t, out=mask[start:end])
    return mask.view(p.shape)


# L1 norms (rescale) are defined chunk-wise: the float32 sums of |x| over consecutive chunks of L1_CHUNK entries,
# added in float64. A tensor merged piece by piece (pieces start at multiples of L1_CHUNK) then gets the very
# norms, so the same rescale factors and bits, as the whole tensor.
L1_CHUNK = 1 << 12


def l1_partials(x: torch.Tensor) -> torch.Tensor:
    """Sums of |x| over consecutive chunks of L1_CHUNK entries of x (flat; the last chunk may be shorter)."""
    flat = x.reshape(-1)
    full = flat.numel() // L1_CHUNK * L1_CHUNK
    parts = [torch.linalg.vector_norm(flat[:full].view(-1, L1_CHUNK), ord=1, dim=1)] if full else []
    if full < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[full:], ord=1).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else flat.new_zeros(0)


def l1_sum(partials: list[torch.Tensor]) -> torch.Tensor:
    """The L1 norm from the chunk sums of a tensor's pieces, in order: a float64 scalar where the sums are
    (on an accelerator, reading it is a host sync)."""
    sums = partials[0] if len(partials) == 1 else torch.cat([p.to(partials[0].device) for p in partials])
    return sums.double().sum()


def l1_total(partials: list[torch.Tensor]) -> float:
    """l1_sum as a number."""
    return float(l1_sum(partials)) if partials else 0.0


def l1_norm(x: torch.Tensor) -> float:
    return l1_total([l1_partials(x)])
