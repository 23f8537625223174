"""`evomerge export`: finished candidates -> Hugging Face checkpoints that score as the search scored them.

Real tiny searches (in-process pool, real lm-eval, real calibration), exported, loaded back with plain
transformers and scored again: their anchor answers must equal the ledger's, exactly (float32).
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.search.ledger import Record, candidate_key
from evomerge.search.rundir import RunDir
from evomerge.search.session import create_run, drive, status
from evomerge.testing.workspace import make_search_workspace
from evomerge.worker.local_pool import LocalPool

SPACES = {"dfs_paths": {"preset": "dfs_paths"}, "hybrid": {"preset": "hybrid"}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny models, two tiny tasks, a calibration; a PS run config (4 x 2) and data-flow / hybrid ones."""
    root = make_search_workspace(tmp_path_factory.mktemp("export"), algorithm={"pop_size": 4, "generations": 2})
    config = yaml.safe_load((root / "run.yaml").read_text())
    for name, space in SPACES.items():
        doc = {**config, "search_space": space,
               "objectives": [{"task": "t_add"}, {"task": "t_more"}, {"cost": "path_length"}]}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return root


def _search(workspace, config: str, name: str):
    run, prepared = create_run(workspace / config, workspace / "runs" / name)
    drive(run, prepared, LocalPool(prepared))
    return run, prepared


@pytest.fixture(scope="module")
def ps_run(workspace):
    return _search(workspace, "run.yaml", "ps")


def _records(run) -> dict[str, Record]:
    with run.open_ledger() as ledger:
        return {r.key: r for r in ledger.all("ok")}


def _one_line_error(capsys, *words):
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith(("exporting ", "export: "))]  # the per-model lines, the count with its ETA
    assert len(err) == 1 and err[0].startswith("evomerge: error:"), err
    assert all(w in err[0] for w in words), err[0]
    return err[0]


def _anchor_answers(model_dir, rec: Record, task_dir) -> dict[str, dict[str, int]]:
    """Score a checkpoint loaded with plain transformers on the items the search scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.lmeval import Scorer

    model = AutoModelForCausalLM.from_pretrained(model_dir)  # no trust_remote_code: a standard checkpoint
    scorer = Scorer(list(rec.responses), [task_dir], tokenizer=AutoTokenizer.from_pretrained(model_dir))
    scores = scorer.score(model, {t: [int(i) for i in items] for t, items in rec.responses.items()})
    return {t: {str(i): int(c) for i, c in zip(s.item_ids.tolist(), s.correct.tolist())} for t, s in scores.items()}


@pytest.mark.slow
def test_export_front_writes_checkpoints_that_score_as_the_search_did(workspace, ps_run, capsys):
    run, prepared = ps_run
    out = workspace / "exports" / "ps"
    assert main(["export", str(run.path), "--out", str(out), "--verify", "--shard-size", "100KB"]) == 0
    front = [f["id"] for f in status(run, prepared)["front"]]
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("exporting")] == [
        f"exporting {k} ({i}/{len(front)}) and verifying it on the full tasks" for i, k in enumerate(front, 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(front)  # nothing else: no staging left behind
    records = _records(run)
    for key in front:
        rec, d = records[key], out / key
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json",
                "README.md", "mergekit_config.yml", "verify.json"} <= names, names
        assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded at 100KB
        # loaded back with plain transformers, its anchor answers are the ledger's
        assert _anchor_answers(d, rec, workspace / "tasks") == rec.responses
        verify = json.loads((d / "verify.json").read_text())
        assert verify["anchors"] == {"checked": 12, "matched": True, "mismatches": []}
        assert {t: s["items"] for t, s in verify["tasks"].items()} == {"t_add": 30, "t_more": 30}
        mergekit = yaml.safe_load((d / "mergekit_config.yml").read_text())
        assert mergekit["merge_method"] == rec.recipe["merge_method"] == "task_arithmetic"
        card = (d / "README.md").read_text()
        assert "## Recipe" in card and "merge_method: task_arithmetic" in card and f"--seed {rec.seed}" in card
        assert f"| t_add | {sum(rec.responses['t_add'].values())}/6 | " in card  # the ledger's estimates
        assert f"{rec.estimates['t_add']['pirt']:.4f}" in card and "| population size | 4 |" in card
        assert f"{verify['tasks']['t_more']['accuracy']:.4f}" in card and "equal the ones recorded" in card
    assert "Full-task scores of the exported checkpoints" in captured.out


@pytest.mark.slow
def test_export_equals_evomerge_merge_of_its_mergekit_yaml(workspace, ps_run):
    """The card says `evomerge merge mergekit_config.yml --seed S` rebuilds it: it does, bit for bit."""
    run, _ = ps_run
    rec = next(iter(_records(run).values()))
    out = workspace / "exports" / "one"
    assert main(["export", str(run.path), "--out", str(out), "--ids", rec.key]) == 0
    assert not (out / rec.key / "verify.json").exists() and "## Verification" not in (out / rec.key / "README.md").read_text()
    again = workspace / "exports" / "again"
    assert main(["merge", str(out / rec.key / "mergekit_config.yml"), "--out", str(again), "--seed", str(rec.seed)]) == 0
    a, b = load_file(out / rec.key / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("space", list(SPACES))
def test_dataflow_and_hybrid_candidates_export_as_standard_checkpoints(workspace, space):
    run, prepared = _search(workspace, f"{space}.yaml", space)
    records = _records(run)
    front = [f["id"] for f in status(run, prepared)["front"]]
    # the front, plus the path that mixes most: through a second source (or the merge), with scales, long
    def mixing(r):
        path = r.recipe["path"]
        return len({step[0] for step in path}) > 1, any(len(step) == 3 for step in path), len(path)

    longest = max(records.values(), key=mixing)
    assert mixing(longest)[0] and (space == "hybrid" or mixing(longest)[1]), longest.recipe["path"]
    ids = list(dict.fromkeys([*front, longest.key]))
    out = workspace / "exports" / space
    assert main(["export", str(run.path), "--out", str(out), "--ids", ",".join(k[:10] for k in ids), "--verify"]) == 0
    for key in ids:
        d = out / key
        recipe = yaml.safe_load((d / "evomerge_recipe.yml").read_text())
        assert recipe["merge_method"] == "dataflow" and len(recipe["path"]) == len(records[key].recipe["path"])
        assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == len(recipe["path"])
        assert json.loads((d / "verify.json").read_text())["anchors"]["matched"] is True
        assert not (d / "mergekit_config.yml").exists()
        assert "evomerge_recipe.yml" in (d / "README.md").read_text()
    assert _anchor_answers(out / longest.key, longest, workspace / "tasks") == longest.responses
    if space == "hybrid":
        assert "A hybrid merge" in (out / longest.key / "README.md").read_text()


@pytest.mark.slow
def test_verify_reports_a_mismatch_and_exits_1(workspace, ps_run, capsys):
    run, prepared = ps_run
    copy = workspace / "runs" / "tampered"
    shutil.copytree(run.path, copy)
    key = status(run, prepared)["front"][0]["id"]
    rec = _records(run)[key]
    item = next(iter(rec.responses["t_add"]))
    responses = {**rec.responses, "t_add": {**rec.responses["t_add"], item: 1 - rec.responses["t_add"][item]}}
    with sqlite3.connect(copy / "ledger.sqlite") as db:  # behind the append-only API's back
        db.execute("UPDATE evaluations SET responses=? WHERE key=?", (json.dumps(responses), key))
    out = workspace / "exports" / "tampered"
    assert main(["export", str(copy), "--out", str(out), "--ids", key, "--verify"]) == 1
    assert f"anchor answers of {key} differ from the ledger" in capsys.readouterr().err
    verify = json.loads((out / key / "verify.json").read_text())
    assert verify["anchors"]["matched"] is False
    assert verify["anchors"]["mismatches"] == [{"task": "t_add", "item": int(item), "ledger": responses["t_add"][item],
                                                "exported": rec.responses["t_add"][item]}]
    assert "differ from the ones recorded" in (out / key / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def recorded_run(workspace, tmp_path):
    """A run whose ledger holds two ok candidates and a failed one (written directly: no search needed)."""
    run, _ = create_run(workspace / "run.yaml", tmp_path / "recorded")
    recipe = {"merge_method": "linear", "models": [{"model": str(workspace / "models" / "source_0"),
                                                    "parameters": {"weight": 1.0}}]}
    rows = [("ok", [0.1]), ("ok", [0.2]), ("failed", [0.3])]
    with run.open_ledger() as ledger:
        for i, (state, genome) in enumerate(rows):
            ledger.record(Record(key=candidate_key(0, i, genome), generation=0, index=i, genome=tuple(genome),
                                 status=state, seed=1, recipe=recipe, error="ValueError: boom" if state == "failed" else None,
                                 objectives={"t_add": -0.5 + i / 10, "t_more": -0.5 - i / 10}))
    return run


def test_nothing_finished_to_export(workspace, tmp_path, capsys):
    run, _ = create_run(workspace / "run.yaml", tmp_path / "fresh")
    assert main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(run.path), "no finished evaluations", "evomerge resume")
    assert not (tmp_path / "out").exists()


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(tmp_path))


@pytest.mark.parametrize("ids, words", [
    ("g0009-0000-000000000000", ["g0009-0000-000000000000", "no candidate", "evomerge status"]),
    ("g0000-000", ["matches 3 candidates", "give more of the id"]),
    ("g0000-0002", ["failed", "ValueError: boom", "only candidates evaluated ok"]),
    (",", ["--ids is empty"]),
])
def test_bad_ids(recorded_run, tmp_path, capsys, ids, words):
    assert main(["export", str(recorded_run.path), "--out", str(tmp_path / "out"), "--ids", ids]) == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused_and_left_alone(recorded_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "g0000-0000-x").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(recorded_run.path), "--out", str(out)]) == 2
    _one_line_error(capsys, str(out), "not empty", "--force")
    assert sorted(p.name for p in out.rglob("*")) == ["g0000-0000-x", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_only_the_exported_candidates(recorded_run, tmp_path):
    out = tmp_path / "out"
    key = candidate_key(0, 0, [0.1])
    (out / key).mkdir(parents=True)
    (out / key / "stale.txt").write_text("old export")
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(recorded_run.path), "--out", str(out), "--ids", "g0000-0000", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([key, "notes.txt"])
    assert not (out / key / "stale.txt").exists() and (out / key / "model.safetensors").is_file()
    card = (out / key / "README.md").read_text()
    assert "merge_method: linear" in card and "| t_add | 0.5000 |" in card


def test_an_error_midway_leaves_no_partial_model(recorded_run, tmp_path, capsys):
    """A recipe that cannot be built fails the export; the model before it stays, nothing half-written."""
    run = RunDir.open(recorded_run.path)
    genome = [0.4]
    with run.open_ledger() as ledger:
        ledger.record(Record(key=candidate_key(1, 0, genome), generation=1, index=0, genome=tuple(genome), status="ok",
                             seed=1, recipe={"merge_method": "linear", "models": [{"model": "/nowhere/model",
                                                                          "parameters": {"weight": 1.0}}]},
                             objectives={"t_add": -0.1, "t_more": -0.1}))
    out = tmp_path / "out"
    first = candidate_key(0, 0, [0.1])
    assert main(["export", str(run.path), "--out", str(out), "--ids", f"{first},g0001-0000"]) == 2
    _one_line_error(capsys, "/nowhere/model")
    assert [p.name for p in out.iterdir()] == [first]


@pytest.mark.slow
def test_front_clones_are_listed_once_and_exported_once_unless_all_ties(workspace, tmp_path, capsys):
    """Anchor means over 6 anchors take few values, so candidates tie: the front shows one per score vector,
    with its tie count; export writes one each, and --all-ties every clone."""
    from evomerge.search.ledger import pareto_front

    config = yaml.safe_load((workspace / "run.yaml").read_text())
    config["fitness"]["estimator"] = "anchor_mean"
    config["algorithm"] = {"pop_size": 8, "generations": 3}
    (workspace / "ties.yaml").write_text(yaml.safe_dump(config))
    run, prepared = _search(workspace, "ties.yaml", "ties")
    front = status(run, prepared)["front"]
    full = pareto_front(_records(run).values(), {"t_add": "min", "t_more": "min"})
    assert sum(f["ties"] for f in front) == len(full) > len(front)  # there are clones, and none is lost
    assert len({tuple(f["objectives"].values()) for f in front}) == len(front)
    tied = next(f for f in front if f["ties"] > 1)
    records = _records(run)
    assert all(records[k].objectives == records[tied["id"]].objectives for k in tied["tied_ids"])
    assert all((records[tied["id"]].generation, records[tied["id"]].index) < (records[k].generation, records[k].index)
               for k in tied["tied_ids"])  # the earliest stands for its clones

    assert main(["export", str(run.path), "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(f["id"] for f in front)
    assert main(["export", str(run.path), "--out", str(tmp_path / "all"), "--all-ties"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(r.key for r in full)
    capsys.readouterr()
    assert main(["export", str(run.path), "--out", str(tmp_path / "x"), "--all-ties", "--ids", tied["id"]]) == 2
    assert "--all-ties applies to the front" in capsys.readouterr().err
