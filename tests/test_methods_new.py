"""The methods added with mergekit 0.1.5 (nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram,
ramplus_tl): behaviour derived by hand from mergekit 0.1.5's definitions (bench/check_against_mergekit.py
compares whole merges with mergekit itself); their search-space genes; the `evomerge methods` listing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli.merge import methods_listing
from evomerge.errors import SearchSpaceError
from evomerge.genome import SearchSpace
from evomerge.merge.methods import merge_tensors
from evomerge.merge.methods_masked import QUANTILE_SAMPLE, outlier_threshold
from evomerge.merge.recipe import Recipe
from evomerge.merge.specs import METHODS

NEW = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
S = math.sqrt(0.5)


def close(a, b, atol=1e-6):
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- nuslerp -----------------------------------------------------------------------------------------------


def test_nuslerp_weights_pick_the_endpoints_and_the_arc_between():
    b = torch.tensor([0.5, -1.0])
    x, y = b + torch.tensor([1.0, 0.0]), b + torch.tensor([0.0, 1.0])
    assert close(merge_tensors("nuslerp", [x, y], base=b, weight=[1.0, 0.0]), x)  # t = 0: the first model
    assert close(merge_tensors("nuslerp", [x, y], base=b, weight=[0.0, 2.0]), y)  # t = 1: the second
    # t = w2 / (w1 + w2) = 0.5 on the quarter circle: the task vector keeps norm 1 (a lerp would give 0.71)
    assert close(merge_tensors("nuslerp", [x, y], base=b, weight=[3.0, 3.0]), b + torch.tensor([S, S]))
    third = merge_tensors("nuslerp", [x, y], base=b, weight=[2.0, 1.0]) - b  # t = 1/3: 30 degrees from x's
    assert close(third, [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    # weights summing to ~0: t = 0.5
    assert close(merge_tensors("nuslerp", [x, y], base=b, weight=[1.0, -1.0]), b + torch.tensor([S, S]))


def test_nuslerp_preserves_the_norm_of_equal_norm_task_vectors():
    b = randn(6, 5, seed=1)
    d0, d1 = randn(6, 5, seed=2), randn(6, 5, seed=3)
    d1 = d1 * d0.norm() / d1.norm()  # equal norms as whole tensors
    for t in (0.2, 0.5, 0.9):
        merged = merge_tensors("nuslerp", [b + d0, b + d1], base=b, weight=[1 - t, t]) - b
        assert float(merged.norm()) == pytest.approx(float(d0.norm()), rel=1e-5)
        assert float((merged - ((1 - t) * d0 + t * d1)).norm()) > 1e-3  # not the linear interpolation


def test_nuslerp_without_flatten_interpolates_each_row_or_each_column():
    b = torch.zeros(2, 2)
    d0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    d1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # row 0: a right angle; row 1: the same vector
    rows = merge_tensors("nuslerp", [d0, d1], base=b, weight=[1, 1], nuslerp_flatten=False)
    assert close(rows, [[S, S], [2.0, 0.0]])
    whole = merge_tensors("nuslerp", [d0, d1], base=b, weight=[1, 1])  # one vector: another arc
    assert not close(whole, rows, atol=1e-3)
    # row_wise: vectors along dim 0 (columns), i.e. rows of the transposed tensors
    cols = merge_tensors("nuslerp", [d0, d1], base=b, weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert close(cols, merge_tensors("nuslerp", [d0.T, d1.T], base=b, weight=[1, 1], nuslerp_flatten=False).T)
    assert not close(cols, rows, atol=1e-3)


def test_nuslerp_without_a_base_interpolates_the_weights_themselves():
    x, y = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    assert close(merge_tensors("nuslerp", [x, y], weight=[1, 1]), [2 * S, 2 * S])
    # the same models against a base: their task vectors [1, -1] and [-1, 1] are antipodal, where the arc is
    # undefined and mergekit interpolates linearly: the midpoint of the task vectors, 0
    b = torch.tensor([1.0, 1.0])
    assert close(merge_tensors("nuslerp", [x, y], base=b, weight=[1, 1]), b)


def test_nuslerp_needs_exactly_two_models():
    b = torch.zeros(3)
    with pytest.raises(ValueError, match="exactly 2"):
        merge_tensors("nuslerp", [b + 1, b + 2, b - 1], base=b, weight=[1, 1, 1])


# -- multislerp --------------------------------------------------------------------------------------------


def test_multislerp_with_equal_weights_of_two_equal_norm_vectors_is_the_arc_midpoint():
    b = randn(40, seed=4)
    d0, d1 = randn(40, seed=5), randn(40, seed=6)
    d1 = d1 * d0.norm() / d1.norm()
    multi = merge_tensors("multislerp", [b + d0, b + d1], base=b, weight=[0.3, 0.3])
    assert close(multi, merge_tensors("nuslerp", [b + d0, b + d1], base=b, weight=[1, 1]), atol=1e-5)


def test_multislerp_scales_the_direction_by_the_weighted_mean_norm():
    b = torch.zeros(3)
    d = torch.tensor([1.0, 2.0, 2.0])  # norm 3; the same direction at norms 3 and 6
    assert close(merge_tensors("multislerp", [d, 2 * d], base=b, weight=[1, 1]), 1.5 * d, atol=1e-5)
    assert close(merge_tensors("multislerp", [d, 2 * d], base=b, weight=[1, 1], normalize_weights=False), 3 * d,
                 atol=1e-5)
    three = merge_tensors("multislerp", [d, 2 * d, 4 * d], base=b, weight=[2, 1, 1])
    assert close(three, (2 * 1 + 1 * 2 + 1 * 4) / 4 * d, atol=1e-5)


def test_multislerp_of_one_model_is_that_model_and_cancelling_directions_fall_back_or_fail():
    b = torch.tensor([1.0, 1.0])
    x = b + torch.tensor([3.0, -1.0])
    assert close(merge_tensors("multislerp", [x], base=b, weight=[0.2]), x)
    d = torch.tensor([1.0, 0.0])
    assert close(merge_tensors("multislerp", [b + d, b - d], base=b, weight=[1, 1]), b)  # two: linear
    with pytest.raises(ValueError, match="cancel out"):
        merge_tensors("multislerp", [b + d, b - d, b + d, b - d], base=b, weight=[1, 1, 1, 1])


# -- karcher -----------------------------------------------------------------------------------------------


def test_karcher_of_identical_tensors_is_that_tensor():
    x = randn(7, 3, seed=7)
    assert close(merge_tensors("karcher", [x, x.clone(), x.clone()]), x, atol=1e-6)


def test_karcher_is_the_arc_midpoint_at_the_mean_norm():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert close(merge_tensors("karcher", [e0, e1]), [2 * S, 2 * S], atol=1e-5)  # mean norm (1 + 3) / 2
    assert close(merge_tensors("karcher", [e0, 3 * e0]), 2 * e0)


def test_karcher_reaches_the_point_where_the_mean_of_the_log_maps_vanishes():
    xs = [randn(6, seed=s) for s in (8, 9, 10)]
    out = merge_tensors("karcher", xs, max_iter=200, tol=1e-7)
    assert float(_log_map_sum(xs, out).norm()) < 1e-4
    assert float(out.norm()) == pytest.approx(sum(float(x.norm()) for x in xs) / 3, rel=1e-5)
    start = merge_tensors("karcher", xs, max_iter=0)  # no step: the normalized mean of the directions
    assert float(_log_map_sum(xs, start).norm()) > 1e-3


def _log_map_sum(xs, out):
    """sum_i log_m(x_i / |x_i|) at m = out / |out|: zero at the Karcher mean."""
    m = out / out.norm()
    total = torch.zeros_like(m)
    for x in xs:
        u = x / x.norm()
        cos = torch.clamp(m @ u, -1, 1)
        theta = torch.arccos(cos)
        total += theta / torch.sin(theta) * (u - cos * m)
    return total


def test_karcher_counts_the_base_as_an_input_and_refuses_fractional_iterations():
    b, x = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(merge_tensors("karcher", [b, x], base=b), [S, S], atol=1e-5)
    assert close(merge_tensors("karcher", [torch.zeros(2), torch.zeros(2)]), [0.0, 0.0])
    with pytest.raises(ValueError, match="max_iter"):
        merge_tensors("karcher", [b, x], max_iter=2.5)


# -- sce ---------------------------------------------------------------------------------------------------


def test_sce_weights_by_mean_square_and_erases_minority_signs():
    b = torch.zeros(4)
    d1, d2 = torch.tensor([2.0, -2.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, -2.0, 0.0])
    # mean squares 3 and 1.5: weights 2/3, 1/3; signs of the sum [+, -, -, +]; zeros agree with no sign
    # entry 0: (2/3 * 2 + 1/3 * 1) / (2/3 + 1/3); entry 1: d1 alone; entry 2: d2 alone; entry 3: d1 alone
    assert close(merge_tensors("sce", [d1, d2], base=b), [5 / 3, -2.0, -2.0, 2.0])


def test_sce_selects_the_entries_that_vary_most_across_models():
    b = torch.ones(4)
    d1, d2, d3 = torch.tensor([1.0, 0, 5, 2]), torch.tensor([1.0, 0, -5, 1]), torch.tensor([1.0, 0, 0, 0])
    models = [b + d for d in (d1, d2, d3)]
    # variances [0, 0, 16.7, 0.67]: 2 entries vary, int(2 * 0.5) = 1 is kept; entry 0, the same change in
    # every model, is dropped with the rest. Entry 2: [5, -5, 0] sums to 0, elected +: d1 alone
    assert close(merge_tensors("sce", models, base=b, select_topk=0.5), b + torch.tensor([0.0, 0, 5, 0]))
    # all kept: mean squares 7.5, 6.75, 0.25; entry 3 ([2, 1, 0]) is the weighted mean of the two non-zero
    kept = merge_tensors("sce", models, base=b, select_topk=1.0) - b
    assert close(kept[0], 1.0) and close(kept[3], (7.5 * 2 + 6.75 * 1) / (7.5 + 6.75), atol=1e-5)
    assert close(merge_tensors("sce", models, base=b, select_topk=0.0), b)


# -- nearswap ----------------------------------------------------------------------------------------------


def test_nearswap_takes_close_entries_and_moves_far_ones_by_t():
    b = torch.tensor([0.0, 0.0, 1.0, 2.0])
    other = b + torch.tensor([0.05, -0.2, 1.0, 0.0])
    assert close(merge_tensors("nearswap", [other], base=b, t=0.1), b + torch.tensor([0.05, -0.1, 0.1, 0.0]))
    assert close(merge_tensors("nearswap", [other], base=b, t=0.0), b)
    assert close(merge_tensors("nearswap", [other], base=b, t=5.0), other)


# -- arcee_fusion ------------------------------------------------------------------------------------------


def test_arcee_fusion_takes_the_changes_that_are_outliers():
    # one row (a 1-D tensor): one KL factor, so the changes above median + 1.5 IQR of |change| are taken
    b = randn(101, seed=11)
    d = 0.01 * torch.arange(101.0) * (-1) ** torch.arange(101)
    d[0], d[1] = 3.0, -2.0  # sorted |d|: quartiles 0.27, 0.52, 0.77 -> threshold 1.27
    out = merge_tensors("arcee_fusion", [b + d], base=b, seed=0)
    assert torch.equal(out[:2], (b + d)[:2]) and torch.equal(out[2:], b[2:])
    assert torch.equal(out, merge_tensors("arcee_fusion", [b + d], base=b, seed=1))  # small: no sampling


def test_arcee_fusion_never_takes_a_row_whose_softmax_does_not_move():
    b = torch.zeros(8, 16)
    model = b + 1e-3 * randn(8, 16, seed=13)
    model[0] = 0.0
    model[0, 3] = 4.0  # a spike: the row's softmax moves, its KL weights the change
    model[1] = 4.0  # the largest changes, but a shift of the whole row: softmax and KL unchanged (exactly)
    out = merge_tensors("arcee_fusion", [model], base=b, seed=0)
    assert out[0, 3] == 4.0 and torch.equal(out[1], b[1])


def test_outlier_threshold_is_median_plus_one_and_a_half_iqr_of_the_sorted_scores():
    scores = torch.arange(101.0)  # quartiles at floor(q * 100): 25, 50, 75
    assert float(outlier_threshold(scores, seed=0)) == 50 + 1.5 * 50
    big = torch.rand(QUANTILE_SAMPLE + 1000, generator=torch.Generator().manual_seed(0))  # sampled quartiles
    t0, t1 = outlier_threshold(big, seed=0), outlier_threshold(big, seed=1)
    assert torch.equal(t0, outlier_threshold(big, seed=0)) and not torch.equal(t0, t1)
    assert float(t0) == pytest.approx(0.5 + 1.5 * 0.5, abs=0.01)


# -- ram, ramplus_tl ---------------------------------------------------------------------------------------


def test_ram_averages_shared_changes_and_keeps_unique_ones():
    b = torch.zeros(4)
    d1, d2 = torch.tensor([0.5, 0.0, 0.3, 1e-6]), torch.tensor([0.5, 0.2, -0.1, 0.0])
    # changed (|x| > 1e-5) by [2, 1, 2, 0] models: shared entries averaged; 1e-6 counts as unchanged
    assert close(merge_tensors("ram", [d1, d2], base=b), [0.5, 0.2, 0.1, 0.0], atol=1e-7)
    assert close(merge_tensors("ram", [d1, d2], base=b, epsilon=0.25), [0.5, 0.0, 0.3, 0.0], atol=1e-7)


def test_ramplus_tl_scales_each_models_unique_entries_by_its_share_ratio():
    b = torch.zeros(4)
    d1, d2 = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    # d1: 1 shared / 2 unique = 0.5 -> 1 + 0.5 * 0.5; d2: 1 / 1 -> 1 + 0.5 * 1; the shared entry is averaged
    out = merge_tensors("ramplus_tl", [d1, d2], base=b, r=0.5, alpha=1.0)
    assert close(out, [1.0, 1.25, 1.25, 1.5])
    capped = merge_tensors("ramplus_tl", [d1, d2], base=b, r=0.5, alpha=0.2)  # rho clamped at alpha
    assert close(capped, [1.0, 1.1, 1.1, 1.1])
    assert torch.equal(merge_tensors("ramplus_tl", [d1, d2], base=b, r=0.0), merge_tensors("ram", [d1, d2], base=b))


NEW_CASES = {  # method -> (number of models besides the base, parameters)
    "nuslerp": (2, {"weight": [0.3, 0.6]}), "multislerp": (3, {"weight": [0.3, 0.6, 0.1]}), "karcher": (3, {}),
    "sce": (3, {"select_topk": 0.5}), "nearswap": (1, {"t": 0.05}), "arcee_fusion": (1, {}), "ram": (3, {"epsilon": 0.05}),
    "ramplus_tl": (3, {"epsilon": 0.05}),
}


@pytest.mark.parametrize("method", NEW)
def test_the_materializer_convention_results_in_out_and_inputs_untouched(method):
    """As the materializer calls them: float32 base and task vectors (which may be its scratch or the sources
    themselves, so they must not change), `out` receiving the result, a Workspace; the same as without them."""
    from evomerge.merge.methods import Workspace, tensor_function

    n, params = NEW_CASES[method]
    base = randn(12, 10, seed=20)
    deltas = [0.1 * randn(12, 10, seed=21 + i) for i in range(n)]
    kept = [base.clone(), *(d.clone() for d in deltas)]
    spec = METHODS[method]
    kw = spec.arguments(params) | ({"seed": 3} if spec.random else {})
    alone = tensor_function(method)(base, deltas, **kw)
    out = torch.full_like(base, float("nan"))
    result = tensor_function(method)(base, deltas, out=out, ws=Workspace(), **kw)
    assert result is out and torch.equal(out, alone)
    assert all(torch.equal(a, b) for a, b in zip(kept, [base, *deltas]))
    assert not torch.equal(alone, base)  # the case merges something


# -- the recipe and search-space side ----------------------------------------------------------------------

SOURCES = {"math": "./m/math", "code": "./m/code"}


def _space(sources, **ps):
    return SearchSpace.model_validate({"kind": "ps", "sources": sources, "base_model": "./m/base", "ps": ps})


@pytest.mark.parametrize("sources,methods,params", [
    (SOURCES, ["ties", "nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl"],
     {"select_topk": [0.2, 0.8], "r": [0.0, 0.5], "alpha": [0.1, 0.3], "tol": [1e-6, 1e-4]}),
    ({"math": "./m/math"}, ["nearswap", "arcee_fusion", "slerp"], {"t": [0.0, 0.02]}),
])
def test_a_method_gene_decodes_to_a_valid_recipe_of_each_new_method(sources, methods, params):
    space = _space(sources, methods=methods, params=params, module_filters={})
    names = space.names()
    for i, method in enumerate(methods):
        x = np.full(space.dim(), 0.25)
        x[names.index(f"method={method}")] = 1.0
        doc = space.decode(x)
        assert doc["merge_method"] == method
        recipe = Recipe.from_mergekit(yaml.safe_load(yaml.safe_dump(doc)), "decoded")
        spec = METHODS[method]
        for name, (lo, hi) in params.items():  # merge-wide genes land where the method reads them
            if spec.param(name) is not None:
                assert doc["parameters"][name] == pytest.approx(lo + 0.25 * (hi - lo))
            else:
                assert name not in doc.get("parameters", {})
        if spec.param("weight") is not None:
            assert all("weight" in m["parameters"] for m in doc["models"])
        assert ("base_model" in doc) == spec.needs_base and len(recipe.inputs()) == len(sources)


def test_whole_number_and_bounded_parameters_are_refused_as_range_genes():
    with pytest.raises(SearchSpaceError, match=r"params\.max_iter.*whole number"):
        SearchSpace.load({"kind": "ps", "sources": SOURCES, "ps": {"methods": ["karcher"], "params": {"max_iter": [5, 20]}}})
    with pytest.raises(SearchSpaceError, match=r"params\.select_topk"):
        SearchSpace.load({"kind": "ps", "sources": SOURCES, "base_model": "./b",
                          "ps": {"methods": ["sce"], "params": {"select_topk": [0.5, 1.5]}}})
    fixed = SearchSpace.load({"kind": "ps", "sources": SOURCES, "ps": {"methods": ["karcher"], "fixed": {"max_iter": 20}}})
    assert fixed.decode(np.zeros(fixed.dim()))["parameters"] == {"max_iter": 20}


@pytest.mark.parametrize("doc,field", [
    ({"merge_method": "nearswap", "models": ["x"], "parameters": {"t": -0.1}}, r"parameters\.t: -0\.1 is outside \[0, inf\]"),
    ({"merge_method": "sce", "models": ["x", "y"], "parameters": {"select_topk": 1.5}}, r"parameters\.select_topk"),
    ({"merge_method": "ramplus_tl", "models": ["x"], "parameters": {"alpha": -1}}, r"parameters\.alpha"),
    ({"merge_method": "nuslerp", "models": [{"model": "x", "parameters": {"weight": 1}}, "y"]}, r"model y has no 'weight'"),
    ({"merge_method": "arcee_fusion", "models": ["x", "y"]}, r"arcee_fusion merges exactly 1 model"),
    ({"merge_method": "multislerp", "models": ["x"], "parameters": {"eps": True}}, r"parameters\.eps: expected a number"),
])
def test_bad_parameters_of_the_new_methods_are_one_line_errors_naming_the_field(doc, field):
    from evomerge.errors import RecipeError

    with pytest.raises(RecipeError, match=field) as e:
        Recipe.from_mergekit({"base_model": "b", **doc})
    assert "\n" not in str(e.value)


# -- `evomerge methods` ------------------------------------------------------------------------------------


def test_method_descriptions_are_distinct_complete_single_lines():
    descriptions = [METHODS[n].description for n in METHODS.names()]
    assert len(set(descriptions)) == len(descriptions)
    for name, d in zip(METHODS.names(), descriptions):
        assert "\n" not in d and d.endswith(".") and d[0].isupper(), name
    assert set(NEW) <= set(METHODS.names())


@pytest.mark.parametrize("width", [80, 100])
def test_methods_listing_wraps_every_description_whole_within_the_width(width):
    lines = methods_listing(width)
    assert all(len(line) <= width for line in lines)
    indent = max(map(len, METHODS.names())) + 2
    entries: dict[str, list[str]] = {}
    for line in lines:
        if line[:indent].strip():
            entries[line[:indent].strip()] = []
        entries[list(entries)[-1]].append(line[indent:])
    assert list(entries) == METHODS.names()
    for name, body in entries.items():
        text = " ".join(body)
        assert text.startswith(METHODS[name].description), name  # whole, then the parameters
        for p in METHODS[name].params:
            assert p.name in text, (name, p.name)


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_a_recipe_without_a_base_interpolates_the_models_weights(llama, method):
    """mergekit runs nuslerp and multislerp without a base: the recipe is valid, and the Materializer (whose base is
    only the reference its task vectors are taken against) gives the baseless form on the raw tensors."""
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.worker.materializer import Materializer

    a, b = (str(p) for p in llama.sources[:2])
    recipe = Recipe.build(method, {a: {"weight": 0.3}, b: {"weight": 0.7}})
    assert recipe.baseless and [e.model for e in recipe.inputs()] == [a, b]
    merged = Materializer({a: a, b: b}, a).merged_state_dict(recipe)
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    for name in list(merged)[:6]:
        expect = merge_tensors(method, [ca.load(name), cb.load(name)], weight=[0.3, 0.7])
        assert torch.allclose(merged[name], expect, atol=1e-6), name
    with_base = Recipe.build(method, {a: {"weight": 0.3}, b: {"weight": 0.7}}, base_model=str(llama.base))
    assert not with_base.baseless


def test_model_count_problem_says_what_the_method_needs():
    from evomerge.merge.specs import TENSOR, MethodSpec

    one, some, few = (MethodSpec("m", TENSOR, "d", min_models=1, max_models=1), MethodSpec("m", TENSOR, "d", min_models=2),
                      MethodSpec("m", TENSOR, "d", min_models=2, max_models=3))
    assert one.model_count_problem(1) is None and one.model_count_problem(2) == "exactly 1"
    assert some.model_count_problem(5) is None and some.model_count_problem(1) == "at least 2"
    assert few.model_count_problem(1) == "at least 2" and few.model_count_problem(4) == "at most 3"
    assert few.model_count_problem(3) is None
