"""Search spaces and genome decoding (pure: no models, no torch in evomerge.genome)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from evomerge.errors import GenomeError, RecipeError, SearchSpaceError
from evomerge.genes import Gene
from evomerge.genome import PRESETS, SearchSpace
from evomerge.merge.dataflow_recipe import parse_dataflow
from evomerge.merge.recipe import Recipe, layer_position

SOURCES = {"math": "./m/math", "code": "./m/code"}
BASE = "./m/base"
COUNTS = {"math": 4, "code": 4}


def load(spec, **kw) -> SearchSpace:
    kw.setdefault("sources", SOURCES)
    kw.setdefault("base_model", BASE)
    return SearchSpace.load(spec, **kw)


def parse(space: SearchSpace, doc: dict, counts=COUNTS):
    """The decoded dict through the real parser (and through YAML, as the ledger stores it)."""
    doc = yaml.safe_load(yaml.safe_dump(doc))
    if space.kind == "ps":
        return Recipe.from_mergekit(doc, "decoded")
    pool = {**counts, space.merge_name: next(iter(counts.values()))}
    return parse_dataflow(doc, "decoded", lambda s: pool[s.name])


def ps_space(**ps) -> SearchSpace:
    return SearchSpace.model_validate({"kind": "ps", "sources": SOURCES, "base_model": BASE, "ps": ps})


def dfs_space(**dfs) -> SearchSpace:
    return SearchSpace.model_validate({"kind": "dfs", "sources": SOURCES, "dfs": dfs})


# -- presets ---------------------------------------------------------------------------------------------
def test_every_preset_loads_and_random_genomes_decode_to_valid_recipes():
    assert set(PRESETS.names()) >= {"ps_task_arithmetic", "ps_ties_dare", "dfs_paths", "hybrid"}
    rng = np.random.default_rng(0)
    for name in PRESETS.names():
        space = load(name)
        n = space.dim(COUNTS)
        assert len(space.names(COUNTS)) == n == len(set(space.names(COUNTS)))
        decoded = 0
        for _ in range(30):
            try:
                doc = space.decode(rng.random(n), COUNTS)
            except GenomeError:  # e.g. a path over max_layers: allowed, never anything else
                continue
            parse(space, doc)
            decoded += 1
        assert decoded > 0, name
        for x in space.initial(COUNTS):
            parse(space, space.decode(x, COUNTS))


def test_decoding_is_deterministic_and_pure():
    space = load("hybrid")
    x = np.random.default_rng(1).random(space.dim(COUNTS))
    before = x.copy()
    assert space.decode(x, COUNTS) == space.decode(list(x), COUNTS) == load("hybrid").decode(x, COUNTS)
    assert np.array_equal(x, before)


def test_run_config_overrides_a_preset_key_by_key():
    space = load({"preset": "ps_ties_dare", "ps": {"layer_groups": 2, "params": {"lambda": [0.8, 1.2]}}})
    assert space.ps.layer_groups == 2 and space.ps.params == {"lambda": (0.8, 1.2)}
    assert space.ps.methods == ["ties", "dare_ties"]  # untouched keys come from the preset
    assert space.sources == SOURCES
    named = load({"preset": "dfs_paths"}, sources=["./x/a", "./y/b"])
    assert named.sources == {"a": "./x/a", "b": "./y/b"}


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(SearchSpaceError, match="did you mean 'dfs_paths'"):
        load("dfs_path")


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(SearchSpaceError, match=r"ps\.methods: unknown merge method 'tiess': did you mean 'ties'"):
        load({"preset": "ps_ties_dare", "ps": {"methods": ["tiess"]}})


def test_validation_errors_name_the_field():
    cases = {
        "ps.layer_groups": {"preset": "ps_ties_dare", "ps": {"layer_groups": 0}},
        "ps.density": {"preset": "ps_ties_dare", "ps": {"density": [0.2, 1.5]}},
        "ps.methods": {"preset": "ps_ties_dare", "ps": {"methods": ["tie"]}},
        "ps.typo": {"preset": "ps_ties_dare", "ps": {"typo": 1}},
        "dfs.scales.range": {"preset": "dfs_paths", "dfs": {"scales": {"range": [0.0, 1.0]}}},
        "dfs.repeats": {"preset": "dfs_paths", "dfs": {"repeats": 0}},
        "merge_name": {"preset": "hybrid", "merge_name": "math"},
    }
    for field, doc in cases.items():
        with pytest.raises(SearchSpaceError, match=field.replace(".", r"\.")):
            load(doc)
    with pytest.raises(SearchSpaceError, match="params.gamma"):
        load({"preset": "ps_ties_dare", "ps": {"params": {"gamma": [0.0, 0.1]}}})
    with pytest.raises(SearchSpaceError, match="base_model"):
        SearchSpace.load("ps_ties_dare", sources=SOURCES)


def test_ps_methods_lists_parameter_space_methods_only():
    # the method catalogue (evomerge.merge.specs) holds dataflow too; a data-flow search is chosen by kind
    with pytest.raises(SearchSpaceError, match=r"ps\.methods: 'dataflow' is not a parameter-space method.*kind: dfs"):
        load({"preset": "ps_ties_dare", "ps": {"methods": ["ties", "dataflow"]}})


def test_importing_the_genome_does_not_import_torch():
    code = ("import sys, evomerge.genome, evomerge.genes, evomerge.merge.recipe, evomerge.merge.specs; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_layout_names_decodes_and_seeds_from_the_same_genes():
    space = load("hybrid")
    layout = space.layout(COUNTS)
    assert layout.names() == space.names(COUNTS) and len(layout) == space.dim(COUNTS)
    assert space.layout(COUNTS) is layout  # built once per space and layer counts
    at = layout.index(Gene("weight", source="code", group=1, kind="all"))
    assert layout.genes[at].name == "weight/code/g1/all" and at < layout.block("ps").stop
    x = space.initial(COUNTS)[0]
    x[at] = 0.0  # the gene found by its fields is the one the decoder reads
    assert space.decode(x, COUNTS)["sources"][-1]["merge"]["models"][1]["parameters"]["weight"] == [0.5] * 2 + [0.0] * 2


# -- parameter space -------------------------------------------------------------------------------------
def test_range_genes_map_the_ends_of_the_range():
    space = ps_space(methods=["ties"], weight=[0.2, 1.4], density=[0.1, 0.9], module_filters={},
                     params={"lambda": [0.5, 1.5]})
    assert space.names() == ["weight/math/g0/all", "weight/code/g0/all", "density/math/g0/all",
                             "density/code/g0/all", "param/lambda"]
    doc = space.decode([0.0, 1.0, 1.0, 0.0, 0.5])
    assert doc["models"] == [{"model": "./m/math", "parameters": {"weight": 0.2, "density": 0.9}},
                             {"model": "./m/code", "parameters": {"weight": 1.4, "density": 0.1}}]
    assert doc["parameters"] == {"lambda": 1.0} and doc["base_model"] == BASE
    parse(space, doc)


def test_method_is_the_argmax_first_on_ties_and_unread_genes_are_ignored():
    space = ps_space(methods=["task_arithmetic", "ties"], module_filters={}, density=[0.0, 1.0])
    n = space.dim()
    assert space.names()[:2] == ["method=task_arithmetic", "method=ties"]
    x = np.full(n, 0.3)
    assert space.decode(x)["merge_method"] == "task_arithmetic"  # a tie: the first listed
    x[1] = 0.31
    ties = space.decode(x)
    assert ties["merge_method"] == "ties" and ties["models"][0]["parameters"]["density"] == pytest.approx(0.3)
    x[0] = 0.9
    ta = space.decode(x)
    assert ta["merge_method"] == "task_arithmetic" and "density" not in ta["models"][0]["parameters"]
    parse(space, ta), parse(space, ties)


def test_linear_takes_no_base_model():
    space = ps_space(methods=["linear", "ties"], module_filters={})
    x = np.full(space.dim(), 0.5)
    x[:2] = [1.0, 0.0]
    doc = space.decode(x)
    assert doc["merge_method"] == "linear" and "base_model" not in doc
    assert len(parse(space, doc).inputs()) == 2


def test_step_groups_give_each_layer_group_its_own_value():
    # 3 groups over 8 layers: group of layer i is i * 3 // 8 -> layers 0-2, 3-5, 6-7
    space = ps_space(methods=["task_arithmetic"], layer_groups=3, module_filters={"attention": "self_attn"})
    names = space.names()
    x = np.zeros(space.dim())
    for g, w in enumerate((0.1, 0.5, 0.9)):
        x[names.index(f"weight/math/g{g}/attention")] = w
        x[names.index(f"weight/math/g{g}/other")] = 1.0 - w
    recipe = parse(space, space.decode(x, {"math": 8, "code": 8}), {"math": 8, "code": 8})
    attn = [recipe.resolve(f"model.layers.{i}.self_attn.q_proj.weight", layer_position(f"model.layers.{i}.", 8))["weight"][0]
            for i in range(8)]
    mlp = [recipe.resolve(f"model.layers.{i}.mlp.up_proj.weight", layer_position(f"model.layers.{i}.", 8))["weight"][0]
           for i in range(8)]
    assert attn == pytest.approx([0.1] * 3 + [0.5] * 3 + [0.9] * 2)
    assert mlp == pytest.approx([0.9] * 3 + [0.5] * 3 + [0.1] * 2)
    # tensors outside the layers take t = 0, i.e. group 0's 'other' value
    assert recipe.resolve("model.embed_tokens.weight", 0.0)["weight"][0] == pytest.approx(0.9)


def test_linear_groups_are_gradient_control_points():
    space = ps_space(methods=["task_arithmetic"], layer_groups=2, group_form="linear", module_filters={})
    doc = space.decode([0.0, 0.0, 1.0, 0.0])  # no layer counts needed
    assert doc["models"][0]["parameters"]["weight"] == [0.0, 1.0]
    recipe = parse(space, doc)
    ws = [recipe.resolve(f"model.layers.{i}.mlp.w", layer_position(f"model.layers.{i}.", 5))["weight"][0] for i in range(5)]
    assert ws == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # interpolated between the groups


def test_step_groups_need_layer_counts():
    space = ps_space(layer_groups=2)
    with pytest.raises(SearchSpaceError, match="layer counts"):
        space.decode(np.full(space.dim(), 0.5))
    with pytest.raises(SearchSpaceError, match="more than the 1 layers"):
        space.decode(np.full(space.dim(), 0.5), {"math": 1, "code": 1})


def test_initial_ps_genomes_are_uniform_recipes():
    space = load("ps_ties_dare")
    seeds = space.initial(COUNTS)
    assert seeds.shape == (4, space.dim(COUNTS))  # each method mid-range, then each source alone
    docs = [space.decode(x, COUNTS) for x in seeds]
    assert [d["merge_method"] for d in docs] == ["ties", "dare_ties", "ties", "ties"]
    for m in docs[0]["models"]:
        assert m["parameters"] == {"weight": 0.5, "density": pytest.approx(0.55)}
    assert docs[0]["parameters"] == {"lambda": 1.0}
    assert [m["parameters"]["weight"] for m in docs[2]["models"]] == [1.0, 0.0]
    assert [m["parameters"]["weight"] for m in docs[3]["models"]] == [0.0, 1.0]


def test_fixed_parameters_only_where_the_method_reads_them():
    space = ps_space(methods=["ties", "task_arithmetic"], module_filters={}, fixed={"rescale": True})
    x = np.full(space.dim(), 0.5)
    x[:2] = [1.0, 0.0]
    assert space.decode(x)["parameters"] == {"rescale": True}
    x[:2] = [0.0, 1.0]
    assert "parameters" not in space.decode(x)  # task_arithmetic has no rescale


# -- data flow -------------------------------------------------------------------------------------------
def test_slot_threshold_is_strictly_above_one_half():
    space = dfs_space(repeats=1, pin_ends=False, scales={"form": "none"})
    assert space.names(COUNTS)[:2] == ["slot0/math.0/r0", "slot1/math.1/r0"]
    x = np.zeros(8)
    x[[0, 5]] = [0.5000001, 1.0]
    x[3] = 0.5  # exactly 0.5: off
    assert space.decode(x, COUNTS)["path"] == [["math", 0], ["code", 1]]


def test_dfs_repeats_pins_and_per_layer_scales():
    space = dfs_space(repeats=2, pin_ends=True, scales={"form": "per_layer", "range": [0.5, 1.5]})
    assert space.dim(COUNTS) == 16 + 8
    x = np.zeros(24)
    x[[5, 9]] = 1.0  # code.1 (repeat 0), math.1 (repeat 1)
    x[16:] = np.linspace(0.0, 1.0, 8)  # scales 0.5 .. 1.5 by pool layer
    doc = space.decode(x, COUNTS)
    scales = 0.5 + np.linspace(0.0, 1.0, 8)
    assert doc["path"] == [["math", 0], ["code", 1, pytest.approx(scales[5])], ["math", 1, pytest.approx(scales[1])],
                           ["math", 3, pytest.approx(scales[3])]]
    steps = parse(space, doc).path
    assert [(s.source, s.layer) for s in steps] == [("math", 0), ("code", 1), ("math", 1), ("math", 3)]


def test_matrix_scales_index_from_and_to():
    space = dfs_space(repeats=1, pin_ends=False, scales={"form": "matrix", "range": [0.0001, 2.0001]})
    m = 8
    assert space.dim(COUNTS) == m + m * m
    assert space.names(COUNTS)[m + 1 * m + 6] == "scale/math.1>code.2"
    x = np.zeros(m + m * m)
    x[[1, 6]] = 1.0
    x[m + 1 * m + 6] = 0.25
    assert space.decode(x, COUNTS)["path"] == [["math", 1], ["code", 2, pytest.approx(0.5001)]]


def test_initial_dfs_genome_is_model_as_identity_path():
    for pin in (True, False):
        space = dfs_space(repeats=2, pin_ends=pin, scales={"form": "per_layer", "range": [0.5, 2.5]})
        seeds = space.initial(COUNTS)
        assert seeds.shape == (1, space.dim(COUNTS))
        assert space.decode(seeds[0], COUNTS)["path"] == [["math", i] for i in range(4)]  # scale 1: omitted


def test_hybrid_merge_joins_the_pool():
    space = load("hybrid")
    seeds = space.initial(COUNTS)
    paths = [space.decode(x, COUNTS)["path"] for x in seeds]
    assert [["math", 0], ["ps_merge", 1], ["ps_merge", 2], ["math", 3]] in paths
    assert [["math", i] for i in range(4)] in paths
    recipe = parse(space, space.decode(seeds[1], COUNTS))
    assert recipe.sources[-1].name == "ps_merge" and recipe.sources[-1].merge.method == "ties"
    names = space.names(COUNTS)
    assert names.index("slot0/math.0/r0") == space.layout(COUNTS).block("ps").stop  # ps genes first, then dfs
    assert "slot8/ps_merge.0/r0" in names


def test_a_ps_genome_seeds_a_hybrid_as_that_merge_alone():
    ps = load({"preset": "hybrid"}).ps
    ps_only = SearchSpace.model_validate({"kind": "ps", "sources": SOURCES, "base_model": BASE,
                                          "ps": ps.model_dump()})
    x_ps = np.random.default_rng(3).random(ps_only.dim(COUNTS))
    hybrid = load({"preset": "hybrid", "dfs": {"pin_ends": False}, "seeds": [x_ps.tolist()]})
    seeds = hybrid.initial(COUNTS)
    assert len(seeds) == 1 + len(load("hybrid").initial(COUNTS))  # the given seed first, then the space's own
    doc = hybrid.decode(seeds[0], COUNTS)
    assert doc["path"] == [["ps_merge", i] for i in range(4)]  # the merge's own layers, scale 1
    assert doc["sources"][-1] == {"name": "ps_merge", "merge": ps_only.decode(x_ps, COUNTS)}  # the same merge
    whole = seeds[0].tolist()
    assert np.array_equal(load({"preset": "hybrid", "seeds": [whole]}).initial(COUNTS)[0], whole)  # kept as given


def test_seeds_of_the_wrong_size_or_range_are_refused_naming_the_seed():
    with pytest.raises(SearchSpaceError, match=r"search_space.seeds\[1\] has 3 genes, this space has \d+ \(or \d+, a "
                       r"parameter-space genome\)"):
        load({"preset": "hybrid", "seeds": [load("hybrid").initial(COUNTS)[0].tolist(), [0.5] * 3]}).initial(COUNTS)
    with pytest.raises(SearchSpaceError, match=r"seeds.*seeds\[0\]: genome values lie in \[0, 1\]; gene 1 is 1.5"):
        load({"preset": "dfs_paths", "seeds": [[0.5, 1.5]]})


def test_invalid_genomes_raise_genome_error():
    space = dfs_space(repeats=1, pin_ends=False, scales={"form": "none"}, max_layers=3)
    good = np.zeros(8)
    good[0] = 1.0
    assert space.decode(good, COUNTS)["path"] == [["math", 0]]
    bad = {
        "shape": np.zeros(7), "2-d": np.zeros((1, 8)), "above 1": np.r_[good[:7], 1.2],
        "below 0": np.r_[good[:7], -0.1], "NaN": np.r_[good[:7], np.nan], "not numbers": ["a"] * 8,
        "empty path": np.zeros(8), "over max_layers": np.ones(8),
    }
    for why, x in bad.items():
        with pytest.raises(GenomeError):
            space.decode(x, COUNTS)
            pytest.fail(why)
    assert issubclass(GenomeError, Exception) and not issubclass(GenomeError, (RecipeError, SearchSpaceError))


def test_dfs_needs_layer_counts_of_every_source():
    space = load("dfs_paths")
    with pytest.raises(SearchSpaceError, match="layer count"):
        space.dim()
    with pytest.raises(SearchSpaceError, match="code"):
        space.decode(np.zeros(10), {"math": 4})


def test_source_alone_seeds_use_a_method_that_reads_weights():
    space = ps_space(methods=["model_stock", "task_arithmetic"], module_filters={})
    docs = [space.decode(x) for x in space.initial()]
    assert [d["merge_method"] for d in docs] == ["model_stock", "task_arithmetic", "task_arithmetic", "task_arithmetic"]
    assert [m["parameters"]["weight"] for m in docs[2]["models"]] == [1.0, 0.0]
