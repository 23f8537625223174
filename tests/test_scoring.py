"""In-memory lm-eval scoring on item subsets: real lm-eval, real tiny models, local JSONL tasks in tmp dirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import FitnessError
from evomerge.fitness.lmeval import Scorer, binarize, mean_keeping_threshold
from evomerge.testing.tasks import WHOLE_OR_FIRST_CHAR_FILTERS
from evomerge.testing.tiny import TinySpec, make_family

# Task layout (relative data paths are resolved against the YAML that sets them, wherever the tests run):
#   tasks/data/add.jsonl           arithmetic items: question, 3 choices, label, answer
#   tasks/mc/t_mc.yaml             multiple_choice, acc + acc_norm, data ../data/add.jsonl, Jinja choice/target
#   tasks/mc/t_fs.yaml             t_mc with 2 random few-shot examples
#   tasks/gen/t_gen.yaml           generate_until, exact_match, data gen.jsonl (targets: the model's own outputs)
#   tasks/prob/deep/t_prob.yaml    includes ../../mc/t_mc.yaml (its data path stays relative to mc/);
#                                  continuous metric from utils.py beside it (softmax probability of the gold)

MC_YAML = """\
task: t_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: ../data/add.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """\
task: t_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: target
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# two filters of one generation: the whole output, or its first non-space character; targets make them disagree
FILTERS_YAML = (GEN_YAML.replace("task: t_gen", "task: t_filters").replace("gen.jsonl", "filters.jsonl")
                + WHOLE_OR_FIRST_CHAR_FILTERS)

PROB_YAML = """\
include: ../../mc/t_mc.yaml
task: t_prob
process_results: !function utils.gold_prob
metric_list:
  - metric: gold_prob
    aggregation: mean
    higher_is_better: true
"""

FEWSHOT_YAML = """\
include: t_mc.yaml
task: t_fs
num_fewshot: 2
fewshot_split: test
"""

PROB_UTILS = """\
import numpy as np


def gold_prob(doc, results):
    lls = np.array([ll for ll, _ in results])
    p = np.exp(lls - lls.max())
    return {"gold_prob": float(p[int(doc["label"])] / p.sum())}
"""

N_ITEMS = 30
N_GEN = 8
GEN_STOP = "."


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _arith_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        choices = [str(a + b), str(a + b + 1), str(a + b + 10)]
        rng.shuffle(choices)
        rows.append({"q": f"{a} plus {b} is", "choices": [" " + c for c in choices],
                     "label": choices.index(str(a + b)), "answer": f" {a + b}"})
    return rows


@torch.no_grad()
def _greedy_reference(model, tok, prompt: str, max_new_tokens: int = 4) -> str:
    """What lm-eval's generate_until should return for `prompt` (HF generate, no padding, cut at the stop)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(GEN_STOP)[0]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("scoring_family"), TinySpec(arch="llama"), n_sources=1, seed=0)


@pytest.fixture(scope="module")
def tok(family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family.base)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def base_model(family):
    return _load(family.base)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, base_model, tok) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    rows = _arith_rows(N_ITEMS)
    _write(root / "data" / "add.jsonl", "\n".join(json.dumps(r) for r in rows))
    _write(root / "mc" / "t_mc.yaml", MC_YAML)
    _write(root / "mc" / "t_fs.yaml", FEWSHOT_YAML)
    # generation targets: the base model's own greedy output on even items, something else on odd ones
    gen = []
    for i, r in enumerate(rows[:N_GEN]):
        out = _greedy_reference(base_model, tok, r["q"])
        gen.append({"q": r["q"], "target": out if i % 2 == 0 else out + "#"})
    _write(root / "gen" / "gen.jsonl", "\n".join(json.dumps(r) for r in gen))
    _write(root / "gen" / "t_gen.yaml", GEN_YAML)
    # t_filters: the whole output is the target on even items, its first character on odd ones; `one` is the
    # output of a 1-token budget
    rows_f = []
    for i, r in enumerate(rows[:N_GEN]):
        out = _greedy_reference(base_model, tok, r["q"])
        rows_f.append({"q": r["q"], "target": out if i % 2 == 0 else out.strip()[:1],
                       "one": _greedy_reference(base_model, tok, r["q"], max_new_tokens=1)})
    _write(root / "gen" / "filters.jsonl", "\n".join(json.dumps(r) for r in rows_f))
    _write(root / "gen" / "t_filters.yaml", FILTERS_YAML)
    _write(root / "gen" / "t_short.yaml", FILTERS_YAML.replace("task: t_filters", "task: t_short")
           .replace("doc_to_target: target", "doc_to_target: one"))
    _write(root / "prob" / "deep" / "t_prob.yaml", PROB_YAML)
    _write(root / "prob" / "deep" / "utils.py", PROB_UTILS)
    return root


@pytest.fixture(scope="module")
def scorer(tasks_dir, tok):
    return Scorer(["t_mc", "t_gen", "t_prob"], [tasks_dir], tokenizer=tok, batch_size=8)


class Routed(torch.nn.Module):
    """A module that only behaves like a causal LM (forward -> .logits, .config, .device; no generate)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


# ---------------------------------------------------------------- the binarization rule


def test_mean_keeping_threshold_keeps_the_mean_best_among_all_thresholds():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.beta(0.5, 0.5, size=rng.integers(1, 40))
        c = mean_keeping_threshold(y)
        gap = abs(binarize(y, c).mean() - y.mean())
        grid = np.concatenate([[-1.0], np.linspace(0, 1, 2001), y])  # (g,)
        assert gap <= np.abs((y[None, :] > grid[:, None]).mean(axis=1) - y.mean()).min() + 1e-12


def test_mean_keeping_threshold_examples():
    assert mean_keeping_threshold(np.array([0.1, 0.2, 0.8, 0.9])) == 0.2  # 2 of 4 above, mean 0.5
    assert binarize(np.array([0.1, 0.2, 0.8, 0.9]), 0.2).tolist() == [0, 0, 1, 1]
    assert mean_keeping_threshold(np.array([0.0, 1.0, 1.0, 0.0])) == 0.0  # 0/1 scores stay as they are
    y = np.array([0.9, 0.95])  # mean 0.925: everything above the threshold is closest
    assert binarize(y, mean_keeping_threshold(y)).tolist() == [1, 1]


# ---------------------------------------------------------------- scoring


@pytest.mark.slow
def test_subset_results_equal_the_full_run_and_lm_eval_own_evaluate(scorer, tasks_dir, base_model, tok):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from evomerge.fitness.tasks import TaskLoader

    full = scorer.score(base_model)
    assert {t: len(r.item_ids) for t, r in full.items()} == {"t_mc": N_ITEMS, "t_gen": N_GEN, "t_prob": N_ITEMS}
    assert full["t_mc"].metric == "acc" and 0 < full["t_mc"].value < 1

    # lm-eval's own loop over fresh task objects: same per-item values
    loader = TaskLoader([tasks_dir])
    tasks = {t: loader.load(t) for t in ("t_mc", "t_gen")}
    lm = HFLM(pretrained=base_model, tokenizer=tok, device="cpu", batch_size=4)
    ref = evaluate(lm, {"tasks": tasks}, log_samples=True, bootstrap_iters=0)
    for t, metric in (("t_mc", "acc"), ("t_gen", "exact_match")):
        per_item = {s["doc_id"]: s[metric] for s in ref["samples"][t]}
        assert full[t].raw.tolist() == [per_item[i] for i in range(len(per_item))], t
        assert full[t].value == pytest.approx(ref["results"][t][f"{metric},none"])

    # a subset, unsorted with a repeat: the same values, in the order asked for
    ids = [17, 3, 29, 3, 0]
    sub = scorer.score(base_model, {"t_mc": ids, "t_prob": ids})
    assert set(sub) == {"t_mc", "t_prob"}
    for t in sub:
        assert sub[t].item_ids.tolist() == ids
        np.testing.assert_array_equal(sub[t].raw, full[t].raw[ids])
    np.testing.assert_array_equal(sub["t_mc"].correct, full["t_mc"].correct[ids])
    assert sub["t_mc"].value == pytest.approx(full["t_mc"].raw[ids].mean())

    empty = scorer.score(base_model, {"t_mc": []})["t_mc"]
    assert empty.item_ids.size == 0 and np.isnan(empty.value)


@pytest.mark.slow
def test_generate_until_task_scores_exact_match_per_item(scorer, base_model):
    r = scorer.score(base_model, {"t_gen": list(range(N_GEN))})["t_gen"]
    assert r.metric == "exact_match" and r.threshold is None
    assert r.correct.tolist() == [1.0 - i % 2 for i in range(N_GEN)]  # targets: own output on even items


@pytest.mark.slow
def test_the_chosen_filter_is_the_one_scored_as_lm_eval_scores_it(tasks_dir, tok, base_model):
    """Once only a task's first filter was scored (mgsm_direct_ja by remove_whitespace, not flexible-extract)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from evomerge.fitness.tasks import TaskLoader

    ids = list(range(N_GEN))
    by_filter = {}
    for name in ("whole", "first_char"):
        scorer = Scorer(["t_filters"], [tasks_dir], tokenizer=tok, batch_size=4,
                        scoring={"t_filters": {"filter": name}})
        r = scorer.score(base_model, {"t_filters": ids})["t_filters"]
        assert r.filter == name and scorer.settings("t_filters") == {"metric": "exact_match", "filter": name}
        by_filter[name] = r.raw.tolist()
    default = Scorer(["t_filters"], [tasks_dir], tokenizer=tok, batch_size=4)
    assert default.settings("t_filters")["filter"] == "whole"  # the task's first, as lm-eval reports first
    assert by_filter["whole"] != by_filter["first_char"]  # the filters disagree on these items
    assert by_filter["first_char"][1::2] == [1.0] * (N_GEN // 2)  # odd targets: the first character

    lm = HFLM(pretrained=base_model, tokenizer=tok, device="cpu", batch_size=4)
    ref = evaluate(lm, {"tasks": {"t_filters": TaskLoader([tasks_dir]).load("t_filters")}}, log_samples=True,
                   bootstrap_iters=0)
    for name, values in by_filter.items():
        per_item = {s["doc_id"]: s["exact_match"] for s in ref["samples"]["t_filters"] if s["filter"] == name}
        assert values == [per_item[i] for i in ids], name


@pytest.mark.slow
def test_max_gen_toks_is_the_budget_generated(tasks_dir, tok, base_model):
    """t_short's targets are each item's 1-token greedy output: right with max_gen_toks 1, not with the task's 4."""
    ids = list(range(N_GEN))
    one = Scorer(["t_short"], [tasks_dir], tokenizer=tok, batch_size=4, scoring={"t_short": {"max_gen_toks": 1}})
    four = Scorer(["t_short"], [tasks_dir], tokenizer=tok, batch_size=4)
    assert one.score(base_model, {"t_short": ids})["t_short"].raw.tolist() == [1.0] * N_GEN
    assert four.score(base_model, {"t_short": ids})["t_short"].raw.mean() < 1
    assert one.settings("t_short") == {"metric": "exact_match", "filter": "whole", "max_gen_toks": 1}
    kwargs = Scorer(["t_short"], [tasks_dir], tokenizer=tok, batch_size=4,
                    scoring={"t_short": {"generation_kwargs": {"max_gen_toks": 1}}})
    assert kwargs.score(base_model, {"t_short": ids})["t_short"].raw.tolist() == [1.0] * N_GEN


def test_unknown_filters_and_misplaced_generation_settings_are_named(tasks_dir, tok):
    with pytest.raises(FitnessError, match="task 't_filters' has no filter 'first_chr': did you mean 'first_char'\\? "
                                           "its filters are whole, first_char"):
        Scorer(["t_filters"], [tasks_dir], tokenizer=tok, scoring={"t_filters": {"filter": "first_chr"}})
    with pytest.raises(FitnessError, match="task 't_mc' is a multiple_choice task: max_gen_toks and generation_kwargs "
                                           "apply to generate_until tasks only"):
        Scorer(["t_mc"], [tasks_dir], tokenizer=tok, scoring={"t_mc": {"max_gen_toks": 8}})
    with pytest.raises(FitnessError, match="unknown scoring setting 'metrc'"):
        Scorer(["t_mc"], [tasks_dir], tokenizer=tok, scoring={"t_mc": {"metrc": "acc"}})
    assert Scorer(["t_mc"], [tasks_dir], tokenizer=tok, scoring={"t_mc": {"filter": "none"}}).settings("t_mc") == {
        "metric": "acc", "filter": "none"}


@pytest.mark.slow
def test_batch_size_auto_scores_as_a_fixed_batch_and_prints_nothing(scorer, tasks_dir, tok, base_model, capfd):
    auto = Scorer(["t_mc", "t_gen"], [tasks_dir], tokenizer=tok, batch_size="auto")
    capfd.readouterr()
    got = auto.score(base_model, {"t_mc": list(range(N_ITEMS)), "t_gen": list(range(N_GEN))})
    want = scorer.score(base_model, {"t_mc": list(range(N_ITEMS)), "t_gen": list(range(N_GEN))})
    for t in got:
        np.testing.assert_array_equal(got[t].raw, want[t].raw)
    assert capfd.readouterr().out == ""


@pytest.mark.slow
def test_continuous_metric_is_binarized_by_the_mean_keeping_rule(scorer, tasks_dir, base_model, tok):
    r = scorer.score(base_model, {"t_prob": list(range(N_ITEMS))})["t_prob"]
    assert r.metric == "gold_prob"
    assert ((r.raw > 0) & (r.raw < 1)).all() and len(np.unique(r.raw)) > 2
    assert r.threshold == mean_keeping_threshold(r.raw)
    np.testing.assert_array_equal(r.correct, r.raw > r.threshold)
    assert r.value == pytest.approx(r.raw.mean())

    fixed = Scorer(["t_prob"], [tasks_dir], tokenizer=tok, thresholds={"t_prob": 0.3}).score(base_model)["t_prob"]
    assert fixed.threshold == 0.3
    np.testing.assert_array_equal(fixed.correct, r.raw > 0.3)


@pytest.mark.slow
def test_weights_changed_in_place_and_swapped_models_are_seen(scorer, family):
    model = _load(family.base)
    items = {"t_prob": list(range(N_ITEMS)), "t_gen": list(range(N_GEN))}
    before = scorer.score(model, items)

    source = _load(family.sources[0])
    with torch.no_grad():  # what the Materializer does: write new weights into the same live model
        for name, p in model.named_parameters():
            p.copy_(source.get_parameter(name))
    after = scorer.score(model, items)
    assert not np.array_equal(after["t_prob"].raw, before["t_prob"].raw)

    swapped = scorer.score(source, items)  # another model object with the same weights: same results
    routed = scorer.score(Routed(source), items)  # a module with no generate(): greedy fallback
    for t in items:
        np.testing.assert_allclose(swapped[t].raw, after[t].raw, rtol=1e-5)
        np.testing.assert_allclose(routed[t].raw, after[t].raw, rtol=1e-5)

    back = scorer.score(_load(family.base), items)
    for t in items:
        np.testing.assert_allclose(back[t].raw, before[t].raw, rtol=1e-5)


@pytest.mark.slow
def test_relative_data_paths_do_not_depend_on_the_working_directory(tasks_dir, tok, base_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Scorer(["t_prob", "t_mc"], [tasks_dir], tokenizer=tok)
    assert s.num_items("t_prob") == s.num_items("t_mc") == N_ITEMS
    assert s.score(base_model, {"t_mc": [1, 2]})["t_mc"].item_ids.tolist() == [1, 2]


@pytest.mark.slow
def test_scoring_prints_nothing(scorer, base_model, capfd):
    scorer.score(base_model, {"t_mc": [0, 1], "t_gen": [0]})
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------- bad input


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_task_name_suggests_the_nearest(tasks_dir, tok):
    with pytest.raises(FitnessError) as e:
        Scorer(["t_mcc"], [tasks_dir], tokenizer=tok)
    msg = _one_line(e)
    assert "unknown task 't_mcc'" in msg and "did you mean 't_mc'" in msg and "t_prob" in msg


def test_item_ids_out_of_range_name_the_task_and_range(scorer, base_model):
    for bad in ([0, N_ITEMS], [-1]):
        with pytest.raises(FitnessError) as e:
            scorer.score(base_model, {"t_mc": bad})
        msg = _one_line(e)
        assert "'t_mc'" in msg and f"ids 0..{N_ITEMS - 1}" in msg
    with pytest.raises(FitnessError, match="did you mean 't_mc'"):
        scorer.score(base_model, {"t_mx": [0]})


def test_missing_data_file_names_the_yaml_and_the_path(tmp_path, tok):
    yaml = _write(tmp_path / "tasks" / "broken.yaml", MC_YAML.replace("t_mc", "t_broken"))
    with pytest.raises(FitnessError) as e:
        Scorer(["t_broken"], [tmp_path / "tasks"], tokenizer=tok)
    msg = _one_line(e)
    assert str(yaml) in msg and "../data/add.jsonl" in msg and str(tmp_path / "data" / "add.jsonl") in msg


def test_tags_and_unknown_metrics_are_refused(tasks_dir, tmp_path, tok):
    _write(tmp_path / "t" / "tagged.yaml", MC_YAML.replace("task: t_mc", "task: t_tagged\ntag: arith")
           .replace("../data/add.jsonl", str(tasks_dir / "data" / "add.jsonl")))
    with pytest.raises(FitnessError, match="'arith' is an lm-eval tag.*t_tagged"):
        Scorer(["arith"], [tmp_path / "t"], tokenizer=tok)
    with pytest.raises(FitnessError, match="has no metric 'f1': its metrics are acc, acc_norm"):
        Scorer(["t_mc"], [tasks_dir], tokenizer=tok, scoring={"t_mc": {"metric": "f1"}})


def test_a_model_on_another_device_is_refused(tasks_dir, tok, base_model):
    with pytest.raises(FitnessError, match="the model is on cpu but this scorer was built for device cuda"):
        Scorer(["t_mc"], [tasks_dir], tokenizer=tok, device="cuda").score(base_model, {"t_mc": [0]})


@pytest.mark.slow
def test_few_shot_items_score_as_in_a_full_lm_eval_run_whatever_the_subset(tasks_dir, tok, base_model, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    s = Scorer(["t_fs"], [tasks_dir], tokenizer=tok)
    full = s.score(base_model)["t_fs"]
    ids = [25, 4, 11]
    np.testing.assert_array_equal(s.score(base_model, {"t_fs": ids})["t_fs"].raw, full.raw[ids])

    monkeypatch.chdir(tasks_dir / "mc")  # plain lm-eval reads relative data paths against the working directory
    lm = HFLM(pretrained=base_model, tokenizer=tok, device="cpu", batch_size=4)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    ref = lm_eval.simple_evaluate(model=lm, tasks=["t_fs"], task_manager=manager, log_samples=True, bootstrap_iters=0)
    per_item = {x["doc_id"]: x["acc"] for x in ref["samples"]["t_fs"]}
    assert ref["samples"]["t_fs"][0]["arguments"][0][0].count("plus") == 3  # two shots, then the question
    assert full.raw.tolist() == [per_item[i] for i in range(N_ITEMS)]
