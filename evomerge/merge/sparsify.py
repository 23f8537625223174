"""Masks that sparsify task vectors: exact magnitude top-k, and seeded Bernoulli draws.

Magnitude selection is the hot spot of TIES/breadcrumbs: a full `kthvalue` costs ~20 memory copies
of the tensor on CPU. A `MagnitudeIndex`, built once per resident task vector, buckets the
magnitudes by quantile (uint8 per element, exact counts per bucket), so a query for the k largest
only selects within one bucket (~1/256 of the tensor).

Random masks draw 16-bit uniform lanes from int64 words (four lanes per word, ~8x cheaper than
`torch.bernoulli` on CPU). The keep probability is thereby rounded to a multiple of 2^-16; the
rescale divides by that effective probability, so expectations are preserved exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

N_BUCKETS = 256
_SAMPLE = 1 << 16  # magnitudes sampled to place the bucket edges
_LANES = 1 << 16


class MagnitudeIndex:
    """Quantile buckets of |x| for one fixed tensor x, for fast exact top-k masks."""

    def __init__(self, x: torch.Tensor, chunk: int = 1 << 22) -> None:
        flat = x.detach().reshape(-1)
        self.numel = flat.numel()
        step = max(1, self.numel // _SAMPLE)
        sample = flat[::step].abs().float().sort().values
        q = torch.linspace(0, sample.numel() - 1, N_BUCKETS + 1, device=x.device)[1:-1].long()
        self.edges = sample[q].contiguous()  # (N_BUCKETS-1,) ascending
        # bucket ids in chunks, so the int64 output of bucketize stays small
        self.bucket = torch.empty(self.numel, dtype=torch.uint8, device=x.device)
        for s in range(0, self.numel, chunk):
            part = flat[s : s + chunk].abs().float()
            self.bucket[s : s + chunk] = torch.bucketize(part, self.edges, right=True)
        counts = torch.bincount(self.bucket.long(), minlength=N_BUCKETS).cpu()
        # count_ge[j] = number of elements in buckets >= j; count_ge[N_BUCKETS] = 0
        self.count_ge = torch.cat([counts.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.long)]).tolist()

    def nbytes(self) -> int:
        return self.bucket.numel() + self.edges.numel() * 4


@dataclass(frozen=True)
class Cut:
    """The k largest-|x| entries of a tensor: those with |x| > threshold, plus `ties` (flat positions
    of entries with |x| == threshold, the lowest indices first, as many as needed for exactly k)."""

    threshold: float
    ties: torch.Tensor


def magnitude_cut(x: torch.Tensor, k: int, index: MagnitudeIndex | None = None) -> Cut:
    n = x.numel()
    none = torch.empty(0, dtype=torch.long, device=x.device)
    if k >= n:
        return Cut(-1.0, none)
    if k <= 0:
        return Cut(math.inf, none)
    flat = x.reshape(-1)
    if index is None:  # exact selection over the whole tensor
        pos = None
        mag = flat.abs().float()
        need = k
    else:
        assert index.numel == n, "MagnitudeIndex was built for another tensor"
        # bucket j holds the k-th largest: count_ge[j] >= k > count_ge[j + 1]
        j = next(b for b in range(N_BUCKETS - 1, -1, -1) if index.count_ge[b] >= k)
        need = k - index.count_ge[j + 1]
        pos = (index.bucket == j).nonzero().squeeze(1)
        mag = flat[pos].abs().float()
    thr = torch.kthvalue(mag, mag.numel() - need + 1).values
    short = need - int((mag > thr).sum())  # tied entries still to take
    tied = (mag == thr).nonzero().squeeze(1)[:short]
    return Cut(float(thr), tied if pos is None else pos[tied])


def keep_top(x: torch.Tensor, k: int, out: torch.Tensor, index: MagnitudeIndex | None = None) -> torch.Tensor:
    """out = x on its k largest-magnitude entries, 0 elsewhere (one fused pass plus the tie fix-up)."""
    cut = magnitude_cut(x, k, index)
    torch.ops.aten.hardshrink.out(x, cut.threshold, out=out)  # keeps |x| > threshold
    if cut.ties.numel():
        out.view(-1)[cut.ties] = x.reshape(-1)[cut.ties]
    return out


def drop_top(x: torch.Tensor, k: int, out: torch.Tensor, scratch: torch.Tensor, index: MagnitudeIndex | None = None) -> torch.Tensor:
    """out = out with x's k largest-magnitude entries zeroed (out must be x or a sparsified x)."""
    if k <= 0:
        return out
    cut = magnitude_cut(x, k, index)
    torch.ops.aten.hardshrink.out(out, cut.threshold, out=scratch)
    out.sub_(scratch)
    if cut.ties.numel():
        out.view(-1)[cut.ties] = 0
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
