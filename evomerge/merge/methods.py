"""The tensor functions of the parameter-space merge methods, attached by name to the catalogue in
evomerge.merge.specs (which states each method's parameters and their defaults: the functions take
every parameter as a required keyword; `MethodSpec.arguments` or `Recipe.resolve` fill the omitted ones).

Every method sees one tensor at a time in the same form: `base` (the reference model's tensor,
float32) and `deltas`, one per merged model, each `model - base` (None for the base itself: a zero
task vector). Parameters arrive already resolved for this tensor; per-model ones as sequences.
Semantics follow mergekit 0.1.5 (see docs/merge_methods.md there) for the same parameters.

The `out` and `ws` arguments exist for speed only: with them, results land in preallocated memory
and every intermediate lives in reusable scratch (on CPU, allocating a 64 MB tensor costs twice the
arithmetic done in it). Without them, methods allocate and behave the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evomerge.merge.fused import fused_combine, fused_kept_partials
from evomerge.merge.sparsify import (
    RankRange,
    SortedMagnitudes,
    apply_rank_range,
    bernoulli_into,
    bernoulli_tensor,
    keep_fraction_count,
    keep_threshold,
    l1_norm,
    l1_partials,
    l1_sum,
    model_seed,
    rank_range,
    ranks_as_float,
    row_ranks,
    select_ranks_into,
)
from evomerge.merge.specs import METHODS, TENSOR

TensorFunction = Callable[..., Tensor]
# method name -> its tensor function; every spec of kind tensor has one (tests/test_methods.py checks)
IMPLEMENTATIONS: dict[str, TensorFunction] = {}


def implements(*names: str) -> Callable[[TensorFunction], TensorFunction]:
    """Attach the decorated tensor function to the catalogue's methods `names`."""

    def attach(fn: TensorFunction) -> TensorFunction:
        for name in names:
            if METHODS[name].kind != TENSOR:
                raise ValueError(f"merge method {name!r} is not a tensor method: it has no tensor function")
            if name in IMPLEMENTATIONS:
                raise ValueError(f"merge method {name!r} is implemented twice")
            IMPLEMENTATIONS[name] = fn
        return fn

    return attach


def tensor_function(method: str) -> TensorFunction:
    """The tensor function of a parameter-space method (unknown names: UnknownNameError with suggestions)."""
    if METHODS[method].kind != TENSOR:
        raise ValueError(f"merge method {method!r} is a {METHODS[method].kind} recipe, not a per-tensor merge")
    return IMPLEMENTATIONS[method]


class Workspace:
    """Scratch buffers, one per named slot, grown to the largest request seen; and the choice of
    kernels (fused: compiled, one pass over memory, for callers that merge many times)."""

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused
        self._bufs: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get_flat(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (slot, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def get(self, slot: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Scratch shaped like `like` (contents undefined)."""
        return self.get_flat(slot, like.numel(), dtype or like.dtype, like.device).view(like.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _ws(ws: Workspace | None) -> Workspace:
    return ws if ws is not None else Workspace()


def _out(out: Tensor | None, base: Tensor) -> Tensor:
    return out if out is not None else torch.empty_like(base)


# ------------------------------------------------------------------------------------------------
# Sparsifiers. Each returns (src, keep, draw): the model's contribution is src where `keep` (an exact
# magnitude rank range) and `draw` (a random mask not yet drawn, or None) say so. Magnitude methods
# and DARE return the task vector itself, so the combine step can apply cut and draw in the same pass;
# DELLA, whose probabilities vary per entry, writes the masked task vector into `buf`.
# ------------------------------------------------------------------------------------------------


def sparsify_magnitude(delta: Tensor, density: float, buf: Tensor, sm: SortedMagnitudes | None = None, n: int | None = None):
    """TIES: keep the max(1, int(density * n)) largest-magnitude entries (n: the whole tensor's entries, where
    delta is a piece of it; the selection then comes from the whole tensor's sorted magnitudes)."""
    if density >= 1:
        return delta, KEEP_ALL, None
    if density <= 0:
        return delta, KEEP_NONE, None
    n = delta.numel() if n is None else n
    k = max(1, keep_fraction_count(density, n))
    if sm is None:  # no cached magnitudes: select exactly now
        assert n == delta.numel(), "selecting without sorted magnitudes needs the whole tensor"
        if delta.device.type == "cpu":  # reading the cut costs no sync here: thresholds, as from the cache
            return delta, rank_range(delta, k, 0), None
        return select_ranks_into(delta, k, 0, buf), KEEP_ALL, None  # device ops only: the kept entries in buf
    return delta, rank_range(delta, k, 0, sm), None


def sparsify_outliers(delta: Tensor, density: float, gamma: float, buf: Tensor, sm: SortedMagnitudes | None = None,
                      n: int | None = None):
    """Breadcrumbs: drop the gamma fraction of largest magnitudes, keep the next `density` fraction."""
    if density >= 1:
        return delta, KEEP_ALL, None
    n = delta.numel() if n is None else n
    keep = keep_fraction_count(density, n)
    top = min(int(gamma * n), n - keep)  # too few small entries left: drop fewer of the large ones
    if sm is None:
        assert n == delta.numel(), "selecting without sorted magnitudes needs the whole tensor"
        if delta.device.type == "cpu":
            return delta, rank_range(delta, keep + top, top), None
        return select_ranks_into(delta, keep + top, top, buf), KEEP_ALL, None
    return delta, rank_range(delta, keep + top, top, sm), None


def sparsify_random(delta: Tensor, density: float, seed: int):
    """DARE: keep each entry with probability density (resolution 2^-16), drawn from `seed`."""
    if density >= 1:
        return delta, KEEP_ALL, None
    return delta, KEEP_ALL, Draw(seed, keep_threshold(density))


def sparsify_della(delta: Tensor, density: float, epsilon: float, buf: Tensor, seed: int, ranks: Tensor | None = None,
                   offset: int = 0):
    """DELLA MagPrune: along each row the keep probability rises linearly with magnitude rank,
    from density - epsilon (smallest) to density + epsilon (largest). A piece of a tensor (entries from
    `offset`) holds whole rows; `ranks` are the whole tensor's (cached; wherever they are held)."""
    if density >= 1:
        return delta, KEEP_ALL, None
    if density <= 0:
        return delta, KEEP_NONE, None
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    m = rows.shape[1]
    if ranks is not None:
        ranks = ranks.reshape(-1)[offset : offset + delta.numel()].to(delta.device, non_blocking=True)
    # the keep probabilities, in place in buf (fresh whole-tensor temporaries cost more than the arithmetic)
    p = buf.view(rows.shape)
    ranks_as_float(ranks if ranks is not None else row_ranks(delta), out=p)  # 0 = smallest in its row
    p.div_(m - 1) if m > 1 else p.fill_(0.5)  # the rank's place in its row, 0..1
    mask = bernoulli_tensor(p.mul_(2 * epsilon).add_(density - epsilon), seed, offset)
    torch.mul(rows, mask, out=p)
    return buf, KEEP_ALL, None


KEEP_ALL = RankRange(-1.0, math.inf)
KEEP_NONE = RankRange(math.inf, math.inf)


@dataclass(frozen=True)
class Draw:
    """A random keep mask not yet drawn: entry i kept when hash_lanes(offset + i, seed) < threshold."""

    seed: int
    threshold: int
    offset: int = 0  # where the entries start in the tensor they are a piece of


@dataclass
class Piece:
    """Entries [start, start + its size) of a tensor of `numel` entries, merged apart from the rest. A
    tensor's pieces are merged in order, through one Piece: selections are the whole tensor's (from sorted
    magnitudes, ranks, seeds), `seen` carries per model the tied entries earlier pieces kept at each cut,
    and rescale takes the whole tensor's kept L1 norms, found by a first pass over the pieces (`measure`:
    nothing is written, the chunk sums of what each model keeps collect in `partials`)."""

    numel: int
    start: int = 0
    measure: bool = False
    seen: dict[int, dict] = field(default_factory=dict)
    partials: dict[int, list[Tensor]] = field(default_factory=dict)
    kept_l1: dict[int, Tensor] | None = None

    def begin(self, measure: bool) -> None:
        """Back to the first piece, for the measuring or the writing pass."""
        if not measure and self.partials:
            self.kept_l1 = {i: l1_sum(p) for i, p in self.partials.items()}
        self.start, self.measure, self.seen, self.partials = 0, measure, {}, {}


@dataclass
class Part:
    """One model's contribution to a task-arithmetic merge: coef * (src where `keep` and `draw`)."""

    src: Tensor
    keep: RankRange
    draw: Draw | None
    weight: float  # the model's weight (what the consensus divisor counts)
    coef: float | Tensor  # weight times the rescale factor (a device scalar where the combine is fused)


# ------------------------------------------------------------------------------------------------
# The task-arithmetic family: base + lambda * combine(weight_i * sparsify(delta_i))
# ------------------------------------------------------------------------------------------------


def _combine(
    base: Tensor,
    deltas: Sequence[Tensor | None],
    weight: Sequence[float],
    sparsify: Callable[[int, Tensor, Tensor], tuple[Tensor, RankRange, Draw | None]] | None,  # (i, delta_i, buf)
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    rescale: bool = False,
    l1: Sequence[float | None] | None = None,
    out: Tensor | None,
    ws: Workspace | None,
    piece: Piece | None = None,
) -> Tensor:
    ws = _ws(ws)
    out = _out(out, base)
    start = piece.start if piece is not None else 0
    # The base model's own (zero) task vector contributes nothing; mergekit leaves it out entirely.
    l1 = list(l1) if l1 is not None else [None] * len(deltas)
    items = [(w, d, n1) for w, d, n1 in zip(weight, deltas, l1) if d is not None]
    if not items:
        return out.copy_(base)

    parts, rescaled = [], []
    for i, (w, d, d_l1) in enumerate(items):
        buf = ws.get(f"part{i}", base)
        src, keep, draw = sparsify(i, d, buf) if sparsify else (d, KEEP_ALL, None)
        # The fused kernel applies exact cuts and random draws itself; otherwise they are applied here.
        if draw is not None:
            draw = Draw(draw.seed, draw.threshold, start)
        if draw is not None and not ws.fused:
            bernoulli_into(buf, draw.threshold, draw.seed, start)
            src, draw = buf.mul_(src), None
        if not keep.exact or (not ws.fused and rescale and keep != KEEP_ALL):
            seen = piece.seen.setdefault(i, {}) if piece is not None else None
            src, keep = apply_rank_range(src, keep, buf, ws.get("cut", base), seen), KEEP_ALL
        part = Part(src, keep, draw, w, w)
        if rescale and (src is not d or keep != KEEP_ALL or draw is not None):
            rescaled.append((i, d, d_l1, part))
        parts.append(part)
    # The compiled kernel wins where there is work to fuse (sign election, cuts, draws); a plain weighted
    # sum is already one streaming pass per task vector in eager ops.
    fuse = ws.fused and (consensus or any(p.keep != KEEP_ALL or p.draw is not None for p in parts))
    if rescaled:
        # a piece's writing pass takes the kept norms its measuring pass summed over the whole tensor
        known = piece is not None and not piece.measure
        sums = [None] * len(rescaled) if known else kept_partials([r[3] for r in rescaled])
        if piece is not None and piece.measure:
            for (i, *_), chunk_sums in zip(rescaled, sums):
                piece.partials.setdefault(i, []).append(chunk_sums)
            return out
        # The fused kernel reads its coefficients from a device tensor, so the norms and factors stay where
        # they were summed: reading them would stall a GPU's queue once per model and tensor.
        for (i, d, d_l1, part), chunk_sums in zip(rescaled, sums):
            kept = piece.kept_l1[i] if known else l1_sum([chunk_sums])
            part.coef *= l1_rescale(d, d_l1, kept if fuse else float(kept))
    if piece is not None and piece.measure:
        return out

    if not consensus:
        divisor = sum(p.weight for p in parts) if normalize else 1.0
        if abs(divisor) < 1e-8:
            divisor = 1.0
        for p in parts:
            p.coef *= lam / divisor
    (fused_combine if fuse else _combine_eager)(out, base, parts, lam=lam, consensus=consensus, normalize=normalize, ws=ws)
    return out


def _combine_eager(out: Tensor, base: Tensor, parts: list[Part], *, lam: float, consensus: bool, normalize: bool, ws: Workspace) -> None:
    """The combine step in plain torch ops, every intermediate in reusable scratch."""
    if not consensus:
        out.copy_(base)
        for p in parts:
            out.add_(_kept(p, ws, "kept"), alpha=p.coef)
        return

    # TIES sign consensus: elect the sign of the weighted sum per entry; average the entries that agree.
    weighted = []
    for i, p in enumerate(parts):
        wd = torch.mul(_kept(p, ws, "kept"), p.coef, out=ws.get(f"weighted{i}", base))  # one kept buffer, used at once
        weighted.append(wd)
    sign = ws.get("sign", base)
    sign.copy_(weighted[0])
    for wd in weighted[1:]:
        sign.add_(wd)
    torch.copysign(torch.ones((), device=base.device), sign, out=sign)  # +1 where the sum is >= 0
    agreeing = ws.get("agreeing", base).zero_()  # sum of |weighted| over agreeing models, in the elected direction
    divisor = ws.get("divisor", base).zero_()
    tmp = ws.get("tmp", base)
    for p, wd in zip(parts, weighted):
        torch.mul(wd, sign, out=tmp)
        tmp.clamp_min_(0)
        agreeing.add_(tmp)
        if normalize:
            torch.sign(tmp, out=tmp)  # 1 where this model agrees (and is non-zero)
            divisor.add_(tmp, alpha=p.weight)
    agreeing.mul_(sign)
    if normalize:
        torch.eq(divisor, 0, out=tmp)
        divisor.add_(tmp)  # nothing agreed: divide by 1, as mergekit does
        agreeing.div_(divisor)
    torch.add(base, agreeing, alpha=lam, out=out)


def _kept(p: Part, ws: Workspace, slot: str) -> Tensor:
    if p.keep == KEEP_ALL:
        return p.src
    return apply_rank_range(p.src, p.keep, ws.get(slot, p.src), ws.get("cut", p.src))


def kept_partials(parts: Sequence[Part]) -> list[Tensor]:
    """Chunk sums (sparsify.l1_partials) of what each part keeps: those whose cut or draw is still to apply
    (the fused kernel's) in one compiled call."""
    sums: list[Tensor | None] = [None if p.keep != KEEP_ALL or p.draw is not None else l1_partials(p.src) for p in parts]
    pending = [i for i, s in enumerate(sums) if s is None]
    if pending:
        for i, s in zip(pending, fused_kept_partials([parts[i] for i in pending])):
            sums[i] = s
    return sums


def l1_rescale(delta: Tensor, delta_l1: float | None, kept_l1: float | Tensor) -> float | Tensor:
    """Factor restoring the L1 norm the sparsifier removed (mergekit's `rescale`), 1 when either is ~0.
    delta_l1: the task vector's norm where known (cached); kept_l1: the norm of what the part keeps (a piece
    of a tensor takes the whole tensor's). A float64 scalar tensor kept_l1 gives the factor as one, computed
    where it is (the same IEEE double operations as on the host, so the same bits)."""
    before = delta_l1 if delta_l1 is not None else l1_norm(delta)
    if isinstance(kept_l1, Tensor):
        if before < 1e-7:
            return 1.0
        # a true division (float / tensor would be a reciprocal and a product: two roundings); x / x == 1
        # exactly, so the factor is 1 where kept_l1 is ~0 (cheaper than a where() with a scalar)
        return torch.full_like(kept_l1, before).div_(kept_l1.masked_fill(kept_l1 < 1e-7, before))
    return before / kept_l1 if before >= 1e-7 and kept_l1 >= 1e-7 else 1.0


# What each method does, its parameters and their defaults: specs.METHODS[name]. Besides the parameters,
# functions take `out` and `ws` (speed only), `seed` (random methods), `magnitudes` / `ranks` (data derived
# from the task vectors, cached by the materializer; computed here when absent) and `l1` (task-vector L1
# norms, for rescale).


@dataclass(frozen=True)
class WeightedSum:
    """merged = base x scale + sum_i coefs_i x delta_i, entry by entry: what linear and task arithmetic compute.
    Being entry-wise, it gives the same bits applied block by block as applied to a whole tensor (what CPU
    workers do to keep their float32 scratch in the cache)."""

    scale: float
    coefs: tuple[float, ...]  # one per delta; a None delta (the base's own) adds nothing

    def apply(self, base: Tensor, deltas: Iterable[Tensor | None], out: Tensor) -> Tensor:
        """deltas may be lazy: each is read before the next is asked for (so all may share one buffer)."""
        first = base
        if self.scale != 1.0:  # x * 1.0 == x exactly: one pass fewer
            first = torch.mul(base, self.scale, out=out)
        added = False
        for c, d in zip(self.coefs, deltas):
            if d is None:
                continue
            if added:
                out.add_(d, alpha=c)
            else:  # == out = first; out += c * d (one fused multiply-add per entry)
                torch.add(first, d, alpha=c, out=out)
                added = True
        return out if added or first is out else out.copy_(base)


def linear_sum(present: Sequence[bool], *, weight, normalize, **_) -> WeightedSum:
    """linear's terms: sum_i w_i (base + delta_i) / divisor = base * total / divisor + sum_i (w_i / divisor) delta_i."""
    total = sum(weight)
    if normalize and total == 0:
        raise ValueError("linear weights sum to 0, so they cannot be normalized: change a weight or set normalize: false")
    divisor = total if normalize else 1.0
    return WeightedSum(total / divisor, tuple(w / divisor for w in weight))


def task_arithmetic_sum(present: Sequence[bool], *, weight, lam, normalize, **_) -> WeightedSum:
    """task arithmetic's terms: base + sum_i w_i * lam / divisor * delta_i; the divisor (normalize) sums the
    weights of the models that have a task vector (the base's own zero one is left out, as mergekit does)."""
    divisor = sum(w for w, p in zip(weight, present) if p) if normalize else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    return WeightedSum(1.0, tuple(w * (lam / divisor) for w in weight))


# method -> its terms, for callers that merge entry-wise methods block by block
WEIGHTED_SUMS = {"linear": linear_sum, "task_arithmetic": task_arithmetic_sum}


@implements("linear")
def linear(base, deltas, *, weight, normalize, out=None, ws=None):
    terms = linear_sum([d is not None for d in deltas], weight=weight, normalize=normalize)
    return terms.apply(base, deltas, _out(out, base))


@implements("task_arithmetic")
def task_arithmetic(base, deltas, *, weight, lam, normalize, int8_mask, out=None, ws=None):
    terms = task_arithmetic_sum([d is not None for d in deltas], weight=weight, lam=lam, normalize=normalize)
    return terms.apply(base, deltas, _out(out, base))


# `piece`: base and deltas are one piece of a tensor (see Piece); selections then come from the whole
# tensor's cached magnitudes or ranks, and its size.
def _size(base: Tensor, piece: Piece | None) -> int:
    return piece.numel if piece is not None else base.numel()


def _start(piece: Piece | None) -> int:
    return piece.start if piece is not None else 0


@implements("ties")
def ties(base, deltas, *, weight, density, lam, normalize, rescale, int8_mask, out=None, ws=None, magnitudes=None, l1=None,
         piece=None):
    sm, dens, n = _present(deltas, magnitudes), _present(deltas, density), _size(base, piece)
    sp = lambda i, d, buf: sparsify_magnitude(d, dens[i], buf, sm[i], n)
    return _combine(base, deltas, weight, sp, consensus=True, normalize=normalize, lam=lam, rescale=rescale, l1=l1, out=out,
                    ws=ws, piece=piece)


def _dare(consensus: bool):
    def dare(base, deltas, *, weight, density, lam, normalize, rescale, int8_mask, seed, out=None, ws=None, l1=None, piece=None):
        dens = _present(deltas, density)
        sp = lambda i, d, buf: sparsify_random(d, dens[i], model_seed(seed, i))
        return _combine(base, deltas, weight, sp, consensus=consensus, normalize=normalize, lam=lam, rescale=rescale, l1=l1,
                        out=out, ws=ws, piece=piece)

    return dare


def _breadcrumbs(consensus: bool):
    def breadcrumbs(base, deltas, *, weight, density, gamma, lam, normalize, rescale, int8_mask, out=None, ws=None,
                    magnitudes=None, l1=None, piece=None):
        sm, dens, gam = _present(deltas, magnitudes), _present(deltas, density), _present(deltas, gamma)
        n = _size(base, piece)
        sp = lambda i, d, buf: sparsify_outliers(d, dens[i], gam[i], buf, sm[i], n)
        return _combine(base, deltas, weight, sp, consensus=consensus, normalize=normalize, lam=lam, rescale=rescale, l1=l1,
                        out=out, ws=ws, piece=piece)

    return breadcrumbs


def _della(consensus: bool):
    def della(base, deltas, *, weight, density, epsilon, lam, normalize, rescale, int8_mask, seed, out=None, ws=None,
              ranks=None, l1=None, piece=None):
        dens, eps, rk = _present(deltas, density), _present(deltas, epsilon), _present(deltas, ranks)
        for d_, e_ in zip(dens, eps):
            if d_ < 1 and not (d_ - e_ > 0 and d_ + e_ < 1):
                raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1 (density {d_}, epsilon {e_})")
        sp = lambda i, d, buf: sparsify_della(d, dens[i], eps[i], buf, model_seed(seed, i), rk[i], _start(piece))
        return _combine(base, deltas, weight, sp, consensus=consensus, normalize=normalize, lam=lam, rescale=rescale, l1=l1,
                        out=out, ws=ws, piece=piece)

    return della


implements("dare_linear")(_dare(False))
implements("dare_ties")(_dare(True))
implements("breadcrumbs")(_breadcrumbs(False))
implements("breadcrumbs_ties")(_breadcrumbs(True))
implements("della")(_della(True))
implements("della_linear")(_della(False))

SLERP_COLINEAR = 0.9995  # |cos| above it: plain interpolation (the arc formula divides by sin(theta) ~ 0)
SLERP_EPS = 1e-8  # norms below it count as 1 in the cosine (a zero tensor)


@implements("slerp")
def slerp(base, deltas, *, t, out=None, ws=None):
    out = _out(out, base)
    d = next((d for d in deltas if d is not None), None)
    if d is None:
        return out.copy_(base)
    other = torch.add(base, d, out=_ws(ws).get("other", base))
    n0, n1 = base.norm().item(), other.norm().item()
    dot = torch.dot(base.reshape(-1), other.reshape(-1)).item()
    dot /= (n0 if n0 > SLERP_EPS else 1.0) * (n1 if n1 > SLERP_EPS else 1.0)
    dot = min(max(dot, -1.0), 1.0)
    if abs(dot) > SLERP_COLINEAR:  # nearly colinear: plain interpolation is accurate and stable
        s0, s1 = 1 - t, t
    else:
        theta = math.acos(dot)
        s0 = math.sin(theta * (1 - t)) / math.sin(theta)
        s1 = math.sin(theta * t) / math.sin(theta)
    torch.mul(base, s0, out=out)
    out.add_(other, alpha=s1)
    return out


@implements("model_stock")
def model_stock(base, deltas, *, filter_wise, out=None, ws=None):
    """The cosine (the mean over pairs of task vectors) is taken per tensor, or per row if filter_wise."""
    out = _out(out, base)
    ds = [d for d in deltas if d is not None]
    if len(ds) < 2:
        return out.copy_(base)
    width = base.shape[-1] if filter_wise and base.dim() > 0 else base.numel()
    rows = [d.reshape(-1, width) for d in ds]  # (R, width); R = 1 unless filter_wise
    cosines = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i], rows[j]
            norms = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-6)
            cosines.append(((a * b).sum(dim=1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)  # (R,)
    n = len(ds)
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / den)  # (R,)
    mean_delta = sum(rows) / n  # t * mean(models) + (1 - t) * base = base + t * mean(deltas)
    out.copy_((base.reshape(-1, width) + t.unsqueeze(1) * mean_delta).view(base.shape))
    return out


def _present(deltas: Sequence[Tensor | None], values) -> list:
    """Per-model values aligned with the models whose delta is present (the base's is dropped)."""
    if values is None or not isinstance(values, (list, tuple)):
        return [values] * len(deltas)
    return [v for v, d in zip(values, deltas) if d is not None]


def merge_tensors(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    seed: int = 0,
    **params,
) -> Tensor:
    """Reference entry point on raw tensors: merge `tensors` (the base may be one of them, by identity);
    `params` as in YAML (`lambda` included), omitted ones at the method's defaults. Methods whose base is
    optional in mergekit (nuslerp, multislerp) run their baseless form when `base` is None."""
    fn, spec = tensor_function(method), METHODS[method]
    ref = base if base is not None else tensors[0]
    ref32 = ref.float()
    deltas = [None if t is ref else t.float() - ref32 for t in tensors]
    kwargs = spec.arguments(params)
    if spec.random:
        kwargs["seed"] = seed
    if spec.base_optional:  # no base given: the method's baseless form, on the tensors themselves
        kwargs["relative"] = base is not None
    return fn(ref32, deltas, **kwargs)


# The methods added with mergekit 0.1.5 live in their own modules (this one would pass ~500 lines); importing
# them here registers their functions wherever IMPLEMENTATIONS is read. At the bottom: they import `implements`.
from evomerge.merge import methods_geometric, methods_masked  # noqa: F401
