"""Compiled kernels (torch.compile): the task-arithmetic combine step, and the weighted sum of linear and task
arithmetic (one pass over the sources as stored, with the eager ops' bits).

In plain torch ops a TIES combine of N task vectors makes ~6N+10 passes over memory; compiled, it
reads each task vector and the base once and writes the result once, which is what the memory-
bandwidth bound allows. Compiling takes seconds once per process and number of models (shapes are
dynamic, coefficients are tensors, so new recipes do not recompile), which pays off only when many
recipes are merged: the materializer uses it when asked (`fused=True`), one-shot merges do not.
If compilation is unavailable (no C++ compiler, say), the eager kernel runs instead, with a warning; an
out-of-memory error is raised as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.sparsify import KEEP_EVERY, L1_CHUNK, hash_lanes

log = logging.getLogger(__name__)

_compiled: dict[str, object] = {}
RECOMPILES = 64  # graphs dynamo may compile per kernel (see _run)
_broken = False


def _keep(s: Tensor, lo: Tensor, hi: Tensor, seed: Tensor, threshold: Tensor, offset: Tensor, random: bool) -> Tensor:
    """Bool mask of the entries kept: lo < |s| <= hi, and (if random) a hash draw below threshold (positions
    start at `offset`: s may be a piece of a tensor)."""
    a = s.abs()
    keep = (a > lo) & (a <= hi)
    if random:
        keep = keep & (hash_lanes(torch.arange(s.shape[0], device=s.device) + offset, seed) < threshold)
    return keep


def _kernel(
    out: Tensor,  # (n,)
    base: Tensor,  # (n,)
    srcs: list[Tensor],  # N x (n,)
    floats: Tensor,  # (4N+1,) float32: lo, hi, coef, weight (N each), then lambda (fused_combine packs them)
    ints: Tensor,  # (2N+1,) int64: seeds, thresholds (N each), then the offset
    consensus: bool,
    normalize: bool,
    random: bool,
) -> None:
    # entry i of src kept where lo < |src| <= hi, and (where random) hash_lanes(position, seed) < threshold
    # (2^16 keeps everything); offset: the position of out's first entry in the tensor it is a piece of;
    # coef multiplies the kept entries, weight is what the consensus divisor counts
    n = len(srcs)
    lo, hi, coef, weight, lam = floats[:n], floats[n:2 * n], floats[2 * n:3 * n], floats[3 * n:4 * n], floats[4 * n]
    seeds, thresholds, offset = ints[:n], ints[n:2 * n], ints[2 * n]
    kept = []
    for i, s in enumerate(srcs):
        keep = _keep(s, lo[i], hi[i], seeds[i], thresholds[i], offset, random)
        kept.append(torch.where(keep, s * coef[i], 0.0))
    if not consensus:  # coef already carries lambda and the normalization
        total = base
        for k in kept:
            total = total + k
        out.view(-1).copy_(total)
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
    out.view(-1).copy_(base + lam * agreeing)


def _kept_l1(srcs: list[Tensor], floats: Tensor, ints: Tensor, random: bool) -> Tensor:
    """(N, chunks): chunk sums of each kept |src| (see sparsify.l1_partials); each src holds whole chunks of
    L1_CHUNK entries. floats: lo, hi (N each); ints: seeds, thresholds (N each), offset (see _keep)."""
    n = len(srcs)
    sums = []
    for i, s in enumerate(srcs):
        keep = _keep(s, floats[i], floats[n + i], ints[i], ints[n + i], ints[2 * n], random)
        sums.append(torch.where(keep, s.abs(), 0.0).view(-1, L1_CHUNK).sum(1))
    return torch.stack(sums)


def out_of_memory(e: BaseException) -> bool:
    """An allocation failure, however torch or its compiler wrapped it (the compiler re-raises errors
    from inside a kernel's run as its own exception types)."""
    while e is not None:
        text = str(e).lower()
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _weighted_sum(out: Tensor, base: Tensor, sources: list[Tensor], coef: Tensor) -> None:
    """out = base + sum_i coef_i (source_i - base), each task vector formed in float32 from the sources as
    stored: one pass that reads the sources and writes out, where the eager ops make 3K + 2."""
    b = base.float()
    total = b
    for i, s in enumerate(sources):
        total = total + (s.float() - b) * coef[i]
    out.view(-1).copy_(total)


# Eager CPU add-with-alpha is one fused multiply-add per entry; letting the C++ compiler contract
# `total + delta * c` makes the compiled weighted sum that same instruction, so its bits are eager's
# (tests/test_source_storage.py). The kernel multiplies nothing else, so there is no other product to contract.
_OPTIONS = {"weighted_sum": {"cpp.enable_floating_point_contract_flag": "fast"}}


def _run(name: str, fn, *args, fallback=None):
    """fn compiled (once per process and argument structure), or as plain ops (`fallback`, else fn itself)
    if compilation fails. Running out of memory is not a compilation failure: it is raised, never hidden
    behind the fallback (the eager ops would need more memory still)."""
    global _broken
    if not _broken:
        try:
            if name not in _compiled:
                # one graph per number of models, dtype and flag combination (the combine kernel has 24 for
                # K <= 3): dynamo's default limit of 8 per function would end the compiled kernels mid-search
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)
                _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True, options=_OPTIONS.get(name))
            return _compiled[name](*args)
        except Exception as e:  # compilation needs a working compiler toolchain; degrade, don't fail
            if out_of_memory(e):
                raise
            _broken = True
            log.warning("fused merge kernels unavailable (%s: %s); using eager ops", type(e).__name__, e)
    return (fallback or fn)(*args)


def _on(device: torch.device, values, dtype: torch.dtype = torch.float32) -> Tensor:
    """A kernel's small argument tensor on `device`, without a host sync: a plain copy to a GPU from pageable
    memory waits for the stream to drain, which per tensor would stall the pipelined merge. Kernels take their
    scalars packed in one or two such tensors: each costs a pinned allocation and a copy per call."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t if device.type == "cpu" else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it until copied


def _packed(device: torch.device, values: list) -> Tensor:
    """_on for float32 values of which some may be scalar tensors already on the device (rescale's coefficients):
    those are copied into place there, one small kernel each, instead of read back to the host."""
    there = {i: v for i, v in enumerate(values) if isinstance(v, Tensor)}
    packed = _on(device, [0.0 if i in there else v for i, v in enumerate(values)])
    for i, v in there.items():
        packed[i] = v
    return packed


def fused_weighted_sum(out: Tensor, base: Tensor, sources: Sequence[Tensor], coefs: Sequence[float]) -> bool:
    """out = base + sum_i coefs_i (sources_i - base) in float32, written in out's dtype: the bits of
    WeightedSum.apply with scale 1 on float32 task vectors, in one pass over the sources as they are stored.
    False where the compiled kernels are unavailable: nothing is written, the caller merges in eager ops."""
    if _broken:
        return False
    coef = _on(base.device, coefs)
    _run("weighted_sum", _weighted_sum, out, base.reshape(-1), [s.reshape(-1) for s in sources], coef,
         fallback=lambda *_: None)
    return not _broken


def _draw(part) -> tuple[int, int, int]:
    return (part.draw.seed, part.draw.threshold, part.draw.offset) if part.draw is not None else (0, KEEP_EVERY, 0)


def _selection(parts: Sequence) -> tuple[list[float], list[int]]:
    """What the kernels need to tell each part's kept entries: the floats lo, hi (N each) and the ints seeds,
    thresholds (N each), offset: the head of both packed argument tensors (see _kernel)."""
    draws = [_draw(p) for p in parts]
    offset = max(d[2] for d in draws)  # where a piece starts: the same for every part that draws
    return ([p.keep.lo for p in parts] + [p.keep.hi for p in parts],
            [d[0] for d in draws] + [d[1] for d in draws] + [offset])


def fused_combine(out: Tensor, base: Tensor, parts: Sequence, *, lam: float, consensus: bool, normalize: bool, ws=None) -> None:
    """Same result as the eager combine (up to float rounding), in one pass over memory."""
    floats, ints = _selection(parts)
    _run(
        "combine", _kernel,
        out, base.reshape(-1), [p.src.reshape(-1) for p in parts],
        _packed(base.device, floats + [p.coef for p in parts] + [p.weight for p in parts] + [lam]),
        _on(base.device, ints, torch.int64),
        consensus, normalize, any(p.draw is not None for p in parts),
    )


def fused_kept_partials(parts: Sequence) -> list[Tensor]:
    """Chunk sums (sparsify.l1_partials) of what each part keeps (its cut and draw applied), without writing the
    kept tensors: one compiled call for all the parts of a tensor (a compiled call's fixed cost, guards and
    argument copies, is what a GPU candidate spends most on)."""
    srcs = [p.src.reshape(-1) for p in parts]
    dev, n = srcs[0].device, len(parts)
    full = srcs[0].numel() // L1_CHUNK * L1_CHUNK
    selection, ints = _selection(parts)
    floats = _on(dev, selection)
    ints = _on(dev, ints + [ints[-1] + full], torch.int64)  # then where the last, shorter chunk starts
    random = any(p.draw is not None for p in parts)
    sums = list(_run("kept_l1", _kept_l1, [s[:full] for s in srcs], floats, ints, random)) if full else [None] * n
    if full == srcs[0].numel():
        return sums
    for i, s in enumerate(srcs):  # the last, shorter chunk
        tail = s[full:]
        kept = _keep(tail, floats[i], floats[n + i], ints[i], ints[n + i], ints[2 * n + 1], random)
        last = torch.where(kept, tail.abs(), 0.0).sum().reshape(1)
        sums[i] = last if sums[i] is None else torch.cat([sums[i], last])
    return sums
