"""Merge maths on small tensors, against values derived by hand from mergekit 0.1.5's definitions."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from evomerge.merge import fused
from evomerge.merge.methods import IMPLEMENTATIONS, Workspace, merge_tensors, tensor_function
from evomerge.merge.sparsify import (
    KEEP_EVERY,
    SortedMagnitudes,
    apply_rank_range,
    bernoulli_into,
    bernoulli_tensor,
    hash_lanes,
    keep_threshold,
    kth_largest_by_topk,
    radix_cut,
    rank_range,
    ranks_as_float,
    row_ranks,
)
from evomerge.merge.specs import METHODS, TENSOR

B = torch.tensor([1.0, 1.0, 1.0, 1.0])
X = B + torch.tensor([1.0, -2.0, 3.0, 0.0])
Y = B + torch.tensor([-1.0, -1.0, 1.0, 2.0])


def close(a, b):
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-6)


def test_linear_normalizes_by_the_weight_sum():
    a, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert close(merge_tensors("linear", [a, c], weight=[1, 3]), [2.5, -1.0])
    assert close(merge_tensors("linear", [a, c], weight=[1, 3], normalize=False), [10.0, -4.0])
    with pytest.raises(ValueError, match="sum to 0"):
        merge_tensors("linear", [a, c], weight=[1, -1])


def test_task_arithmetic_adds_scaled_task_vectors():
    # 0.5 * (0.5 * [1,-2,3,0] + 1.5 * [-1,-1,1,2]) = [-0.5, -1.25, 1.5, 1.5]
    out = merge_tensors("task_arithmetic", [X, Y], base=B, weight=[0.5, 1.5], **{"lambda": 0.5})
    assert close(out, B + torch.tensor([-0.5, -1.25, 1.5, 1.5]))


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries():
    # density 0.5 keeps 2 of 4: X -> [0,-2,3,0]; Y -> [-1,0,0,2] (|-1| ties with three others: lowest index wins)
    # weighted: [0,-1,1.5,0] and [-1.5,0,0,3]; signs of the sum: [-,-,+,+]
    # agreeing sums / agreeing weights: [-1.5/1.5, -1/0.5, 1.5/0.5, 3/1.5] = [-1,-2,3,2]
    out = merge_tensors("ties", [X, Y], base=B, weight=[0.5, 1.5], density=[0.5, 0.5])
    assert close(out, B + torch.tensor([-1.0, -2.0, 3.0, 2.0]))
    out = merge_tensors("ties", [X, Y], base=B, weight=[0.5, 1.5], density=[0.5, 0.5], normalize=False, **{"lambda": 2.0})
    assert close(out, B + 2 * torch.tensor([-1.5, -1.0, 1.5, 3.0]))


def test_ties_sign_election_counts_a_zero_sum_as_positive():
    b = torch.zeros(1)
    out = merge_tensors("ties", [torch.tensor([1.0]), torch.tensor([-1.0])], base=b, weight=[1, 1], density=[1, 1])
    assert close(out, [1.0])


def test_ties_keeps_at_least_one_entry_and_zero_density_keeps_none():
    b = torch.zeros(4)
    d = torch.tensor([0.1, -0.4, 0.2, 0.3])
    assert close(merge_tensors("ties", [d], base=b, weight=[1], density=[0.1]), [0, -0.4, 0, 0])  # int(0.4) = 0 -> 1
    assert close(merge_tensors("ties", [d], base=b, weight=[1], density=[0.0]), [0, 0, 0, 0])


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    d = torch.tensor([10.0, -9, 8, -7, 6, -5, 4, -3, 2, -1])
    out = merge_tensors("breadcrumbs", [d], base=torch.zeros(10), weight=[1], density=[0.5], gamma=[0.1])
    assert close(out, [0, -9, 8, -7, 6, 0, 0, 0, 0, 0][:5] + [-5, 0, 0, 0, 0])
    # gamma too large to keep `density` of the rest: fewer outliers are dropped (the smallest 5 stay)
    out = merge_tensors("breadcrumbs", [d], base=torch.zeros(10), weight=[1], density=[0.5], gamma=[0.8])
    assert close(out, [0, 0, 0, 0, 0, -5, 4, -3, 2, -1])


def test_slerp_follows_the_arc_and_falls_back_to_lerp_when_colinear():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    s = math.sin(math.pi / 4)
    assert close(merge_tensors("slerp", [v0, v1], base=v0, t=0.5), [s, s])
    assert close(merge_tensors("slerp", [v0, v1], base=v0, t=0.0), [1.0, 0.0])
    w0, w1 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])
    assert close(merge_tensors("slerp", [w0, w1], base=w0, t=0.25), [1.25, 1.25])


def test_model_stock_moves_toward_the_average_by_the_cosine_rule():
    b = torch.tensor([0.5, -0.5])
    a, c = b + torch.tensor([1.0, 0.0]), b + torch.tensor([1.0, 1.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert close(merge_tensors("model_stock", [a, c], base=b), b + t * torch.tensor([1.0, 0.5]))
    orthogonal = merge_tensors("model_stock", [b + torch.tensor([1.0, 0]), b + torch.tensor([0, 1.0])], base=b)
    assert close(orthogonal, b)  # cos 0 -> t 0: keep the base


def _brute_rank_range(x, upto, skip):
    order = sorted(range(x.numel()), key=lambda i: (-abs(x[i].item()), i))  # ties: lowest index first
    out = torch.zeros_like(x)
    out[order[skip:upto]] = x[order[skip:upto]]
    return out


@pytest.mark.parametrize("n,levels", [(257, 1000), (3000, 7), (70_000, 13)])
def test_exact_rank_ranges_with_and_without_sorted_magnitudes_match_a_stable_sort(n, levels):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randint(-levels, levels + 1, (n,), generator=gen) / levels).float()  # many ties
    sm = SortedMagnitudes(x)
    for upto, skip in [(0, 0), (1, 0), (n // 7, 0), (n // 2, n // 9), (n - 1, 1), (n, 0), (n, n // 3), (5, 5)]:
        fast = apply_rank_range(x, rank_range(x, upto, skip, sm), torch.empty_like(x), torch.empty_like(x))
        ref = apply_rank_range(x, rank_range(x, upto, skip), torch.empty_like(x), torch.empty_like(x))
        assert torch.equal(fast, ref), (upto, skip)
        if n < 10_000:
            assert torch.equal(fast, _brute_rank_range(x, upto, skip)), (upto, skip)


def test_a_cut_among_zeros_needs_no_position_lists_and_keeps_the_same_values():
    """Frozen weights have all-zero task vectors (and partly frozen ones many zeros): a cut that falls among
    the zeros keeps the same values whichever zeros it counts, so it is exact (no nonzero(), no scatter)."""
    x = torch.zeros(50_000)
    x[:100] = torch.linspace(0.01, 1, 100) * torch.tensor([1.0, -1.0]).repeat(50)  # 100 distinct magnitudes
    sm = SortedMagnitudes(x)
    for upto, skip in [(25_000, 0), (25_000, 50), (1000, 500), (50_000, 0)]:
        r = rank_range(x, upto, skip, sm)
        assert r.exact, (upto, skip)
        for rr in (r, rank_range(x, upto, skip)):  # with sorted magnitudes, and the reference selection
            kept = apply_rank_range(x, rr, torch.empty_like(x), torch.empty_like(x))
            assert torch.equal(kept, _brute_rank_range(x, upto, skip)), (upto, skip)
        assert rank_range(x, upto, 0).add is None  # the reference's cut among zeros lists no positions either
    assert rank_range(torch.zeros(10), 5, 0, SortedMagnitudes(torch.zeros(10))).exact


def test_distinct_magnitudes_give_an_exact_cut_with_no_position_lists():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    r = rank_range(x, 3000, 100, SortedMagnitudes(x))
    assert r.exact
    kept = apply_rank_range(x, r, torch.empty_like(x), torch.empty_like(x))
    assert int((kept != 0).sum()) == 2900


METHOD_CASES = [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": [0.3, 0.6, 1.0]}),
    ("ties", {"density": [0.5, 0.5, 0.2], "rescale": True, "normalize": False}),
    ("dare_linear", {"density": [0.4, 0.5, 0.9]}),
    ("dare_ties", {"density": [0.4, 0.5, 0.9], "normalize": True}),
    ("breadcrumbs", {"density": [0.5, 0.6, 0.7], "gamma": [0.05, 0.1, 0.0]}),
    ("breadcrumbs_ties", {"density": [0.5, 0.6, 0.7], "gamma": [0.05, 0.1, 0.0]}),
    ("della", {"density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.1, 0.2]}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,params", METHOD_CASES)
def test_fused_kernel_equals_the_eager_kernel(method, params):
    """The compiled combine (one pass over memory) computes what the eager ops compute."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(96, 40, generator=gen)
    deltas = [torch.randn(96, 40, generator=gen) * 0.1 for _ in range(3)]
    deltas[1][:10, :10] = 0.05  # tied magnitudes across a cut
    spec = METHODS[method]
    kw = spec.arguments({**params, "weight": [0.5, -0.2, 0.9]})
    if spec.uses_magnitude:
        kw["magnitudes"] = [SortedMagnitudes(d) for d in deltas]
    results = []
    for compiled in (False, True):
        if spec.random:
            kw["seed"] = 9
        results.append(tensor_function(method)(base, list(deltas), ws=Workspace(fused=compiled), **kw))
    assert torch.allclose(results[0], results[1], atol=1e-6, rtol=1e-6)
    if method != "task_arithmetic":  # a plain weighted sum stays in eager ops (methods._combine)
        assert "combine" in fused._compiled and not fused._broken  # compiled, not the eager fallback



@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_fused_rescale_factors_left_as_tensors_give_the_bits_of_host_floats(method, monkeypatch):
    """A fused combine keeps rescale's norms and factors as float64 scalars where they were summed (no host
    sync on a GPU): the same double operations as Python floats, so the same merged bits."""
    from evomerge.merge import methods

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 4100 // 64 + 1, generator=gen)  # more than one L1 chunk, the last one short
    deltas = [torch.randn(*base.shape, generator=gen) * 0.01 * (i + 1) for i in range(3)]
    spec = METHODS[method]
    kw = spec.arguments({"weight": [0.5, 0.3, 0.4], "density": [0.4, 0.6, 0.3], "rescale": True})
    if spec.random:
        kw["seed"] = 7
    factors: dict[str, list] = {"device": [], "host": []}
    rescale = methods.l1_rescale

    def recorded(where):
        def factor(delta, delta_l1, kept):
            factors[where].append(rescale(delta, delta_l1, float(kept) if where == "host" else kept))
            return factors[where][-1]
        return factor

    monkeypatch.setattr(methods, "l1_rescale", recorded("device"))
    on_device = tensor_function(method)(base, list(deltas), ws=Workspace(fused=True), **kw)
    monkeypatch.setattr(methods, "l1_rescale", recorded("host"))  # the factors from Python floats, as eager's
    on_host = tensor_function(method)(base, list(deltas), ws=Workspace(fused=True), **kw)
    assert all(isinstance(f, torch.Tensor) and f.dtype == torch.float64 for f in factors["device"])
    assert len(factors["host"]) == 3 and all(isinstance(f, float) and f > 1 for f in factors["host"])
    assert [f.item() for f in factors["device"]] == factors["host"]  # every double bit: a true division
    assert torch.equal(on_device, on_host)
    # and for many norms, ~0 included (factor 1): a reciprocal and a product would differ in ~1 of 4 here
    kept = torch.cat([torch.rand(2000, generator=gen, dtype=torch.float64) * 5, torch.tensor([0.0, 5e-8])])
    assert [rescale(None, 0.37, k).item() for k in kept] == [rescale(None, 0.37, k.item()) for k in kept]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_reproducible_from_the_seed(method):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen)
    models = [base + torch.randn(64, 32, generator=gen) * 0.1 for _ in range(2)]
    kw = {"weight": [0.6, 0.4], "density": [0.5, 0.4]}
    run = lambda seed: merge_tensors(method, models, base=base, seed=seed, **kw)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def _sparsified(method, delta, seed, rescale=True, density=0.3, **extra):
    base = torch.zeros_like(delta)
    return merge_tensors(method, [base + delta], base=base, weight=[1.0], density=[density], rescale=rescale,
                         seed=seed, **extra)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescaling_preserves_the_expectation(method):
    """Averaged over seeds, DARE's rescaled output is the task vector; unrescaled, ~density times it."""
    delta = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    slope = lambda avg: float((avg * delta).sum() / (delta * delta).sum())
    mean = lambda rescale: torch.stack([_sparsified(method, delta, s, rescale) for s in range(300)]).mean(0)
    assert slope(mean(True)) == pytest.approx(1.0, abs=0.02)
    assert slope(mean(False)) == pytest.approx(0.3, abs=0.02)


def test_della_rescales_to_the_l1_norm_and_keeps_large_entries_more_often():
    """mergekit's DELLA rescale restores the task vector's L1 norm (not 1/p per entry); the keep
    probability rises with magnitude (density - epsilon for the smallest, + epsilon for the largest)."""
    delta = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    order = delta.abs().argsort(dim=1)
    small, large = order[:, :64], order[:, -64:]
    kept_small = kept_large = 0.0
    for s in range(50):
        out = _sparsified("della_linear", delta, s, epsilon=[0.2], density=0.5)
        assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
        kept = (out != 0).float()
        kept_small += float(kept.gather(1, small).mean()) / 50
        kept_large += float(kept.gather(1, large).mean()) / 50
    # p = 0.3 + 0.4 * rank / 255: mean over ranks 0..63 is 0.349, over ranks 192..255 is 0.651
    assert kept_small == pytest.approx(0.3 + 0.4 * 31.5 / 255, abs=0.02)
    assert kept_large == pytest.approx(0.3 + 0.4 * 223.5 / 255, abs=0.02)


def test_della_refuses_probabilities_outside_zero_one():
    base = torch.zeros(8)
    with pytest.raises(ValueError, match="density - epsilon"):
        merge_tensors("della", [base + 1], base=base, weight=[1], density=[0.1], epsilon=[0.15])


def test_registry_suggests_the_nearest_name():
    with pytest.raises(KeyError, match="did you mean 'ties'"):
        METHODS["tie"]
    with pytest.raises(KeyError, match="did you mean 'ties'"):
        tensor_function("tie")


# what a tensor function may take besides the spec's parameters, and the spec flag that makes callers pass it
RUNTIME_ARGS = {"out": None, "ws": None, "seed": "random", "magnitudes": "uses_magnitude", "ranks": "uses_ranks",
                "l1": "rescale", "relative": "base_optional", "piece": "piecewise"}


def test_every_tensor_method_has_one_function_taking_exactly_its_spec_parameters():
    """The catalogue (specs.py) is the single source of methods and parameters: each tensor-kind spec has a
    function, each function a spec, and a function's keywords are the spec's parameters (all required, so a
    default stated twice cannot drift) plus the runtime arguments its spec flags announce."""
    tensor = {n for n in METHODS.names() if METHODS[n].kind == TENSOR}
    assert set(IMPLEMENTATIONS) == tensor and "dataflow" in METHODS.names() and "dataflow" not in tensor
    for name in tensor:
        spec, sig = METHODS[name], inspect.signature(IMPLEMENTATIONS[name])
        keywords = {k: p for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        params = {p.arg for p in spec.params}
        assert {k for k in keywords if k not in RUNTIME_ARGS} == params, name
        assert all(keywords[k].default is inspect.Parameter.empty for k in params), name
        for arg, flag in RUNTIME_ARGS.items():
            if flag is None:
                continue
            announced = spec.param(flag) is not None if flag == "rescale" else getattr(spec, flag)
            assert (arg in keywords) == announced, (name, arg)


def test_omitted_parameters_take_the_spec_default():
    a, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    explicit = merge_tensors("ties", [a, c], base=a, weight=[1, 1], density=[1.0, 1.0], normalize=True, rescale=False,
                             int8_mask=False, **{"lambda": 1.0})
    assert torch.equal(merge_tensors("ties", [a, c], base=a, weight=[1, 1]), explicit)
    assert METHODS["ties"].arguments({"weight": [1]}) == {"weight": [1], "density": 1.0, "lam": 1.0, "normalize": True,
                                                         "rescale": False, "int8_mask": False}


@pytest.mark.parametrize("n", [1, 1000, (1 << 16) + 7])  # across a chunk boundary of the eager draws
def test_eager_draws_equal_the_hash_the_fused_kernel_computes(n):
    """bernoulli_into computes hash_lanes in place, chunk by chunk; both must give the same masks."""
    lanes = hash_lanes(torch.arange(n), 12345)
    for p in (0.0, 0.3, 1.0):
        mask = torch.empty(n)
        bernoulli_into(mask, keep_threshold(p), 12345)
        assert torch.equal(mask, (lanes < keep_threshold(p)).float())
    assert keep_threshold(1.0) == KEEP_EVERY and int(lanes.max()) < KEEP_EVERY


@pytest.mark.parametrize("n", [1, 1000, 3 * (1 << 16) + 7])  # across chunk boundaries of the eager draws
def test_per_entry_probabilities_keep_an_entry_when_its_lane_is_below_its_threshold(n):
    """bernoulli_tensor (DELLA) keeps entry i exactly when hash_lanes(offset + i) < round(p_i x 2^16): the same
    rule as one probability's keep_threshold, with probabilities outside [0, 1] clamped."""
    p = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 1.4 - 0.2
    p[: min(n, 3)] = torch.tensor([0.0, 1.0, 0.3])[: min(n, 3)]
    lanes = hash_lanes(torch.arange(n) + 4096, 99)
    thresholds = torch.tensor([keep_threshold(float(x)) for x in p])
    assert torch.equal(bernoulli_tensor(p, 99, offset=4096), (lanes < thresholds).float())


def test_the_topk_cut_is_kthvalues_at_every_rank_ties_included():
    """Accelerators find the exact TIES cut with topk (CUDA's kthvalue is far slower): from either end it must
    pick kthvalue's value, among heavily tied magnitudes too."""
    mag = (torch.randn(1001, generator=torch.Generator().manual_seed(3)) * 4).round().abs()  # ~12 distinct values
    n = mag.numel()
    for k in [1, 2, 100, 500, 501, 502, 900, n - 1, n]:
        assert kth_largest_by_topk(mag, k) == torch.kthvalue(mag, n - k + 1).values, k


@pytest.mark.parametrize("kind", ["distinct", "tied", "zeros", "subnormal", "inf", "bf16 steps"])
def test_the_radix_cut_is_kthvalues_at_every_rank(kind):
    """CPU finds the exact cut of a large tensor by a radix select over the float bits: it must pick kthvalue's
    value at every rank, among ties, zeros, subnormals and infinities too."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3001, generator=gen)
    x = {"distinct": x, "tied": (x * 4).round(), "zeros": torch.where(x > 0.3, x, 0.0), "subnormal": x * 1e-40,
         "inf": torch.where(x > 2, float("inf"), x), "bf16 steps": (x * 0.01).bfloat16().float()}[kind]
    mag, n = x.abs(), x.numel()
    for k in [1, 2, 3, 100, 1500, 1501, 2999, n - 1, n]:
        t, greater, tied = radix_cut(mag, k)
        assert torch.equal(t, torch.kthvalue(mag, n - k + 1).values), k
        assert (greater, tied) == (int((mag > t).sum()), int((mag == t).sum())), k


def test_a_cut_after_a_whole_run_of_ties_keeps_the_run_without_tie_lookups():
    """Where every entry equal to the cut's value is kept, the CPU cut is a plain threshold (no tie positions,
    no cumulative count), and keeps what a stable sort keeps."""
    x = (torch.randn(1 << 17, generator=torch.Generator().manual_seed(6)) * 9).round()
    mag = x.abs()
    for v in [9.0, 3.0, 1.0]:
        k = int((mag >= v).sum())  # the top k end exactly where the run of |x| == v ends
        r = rank_range(x, k)
        assert r.exact and mag[mag < v].max() <= r.lo < v, v  # a threshold just below v, no tie lookup
        kept = apply_rank_range(x, r, torch.empty_like(x))
        assert torch.equal(kept, torch.where(mag >= v, x, 0.0)), v
        partial = rank_range(x, k - 1)  # one tied entry fewer: the ties at the cut are looked up
        assert not partial.exact


@pytest.mark.parametrize("shape,levels", [((40, 300), None), ((5000,), None), ((30, 500), 7), ((2, 70000), 50)])
def test_row_ranks_are_each_rows_magnitude_order_inverted(shape, levels):
    """Rank r: the entry is the (r+1)-th smallest |x| of its row (ties by position, as a stable sort puts them);
    rows longer than 2^16 are stored in int32, shorter ones in int16 offset by -2^15."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if levels:
        x = (x * levels).round()  # many ties
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    ranks = row_ranks(x)
    assert ranks.dtype == (torch.int32 if rows.shape[1] > 1 << 16 else torch.int16)
    expected = rows.abs().argsort(dim=1, stable=True).argsort(dim=1)
    assert torch.equal(ranks_as_float(ranks).long(), expected)
