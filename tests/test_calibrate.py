"""`evomerge calibrate`: reference models scored for real (Materializer + lm-eval), IRT fitted, anchors saved."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.config import CalibrationConfig, ConfigError, load_config
from evomerge.fitness.calibration import Calibration
from evomerge.fitness.responses import read_responses
from evomerge.fitness.self_calibration import reference_models
from evomerge.testing.tasks import write_choice_tasks
from evomerge.testing.tiny import TinySpec, make_family


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    make_family(root / "models", TinySpec(arch="llama"), n_sources=2, seed=3, task_scale=0.05)
    write_choice_tasks(root / "tasks", {"t_add": 40, "t_pairs": 30}, n_choices=4)
    config = {"models": {"a": "models/source_0", "b": "models/source_1"}, "base_model": "models/base",
              "tasks": ["t_add", "t_pairs"], "task_paths": ["tasks"], "reference_merges": 6, "anchors": 8,
              "seed": 5, "out": "out/calibration.json"}
    return root, config


def _write(root, config, name="calibrate.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_reference_models_are_seeded_and_cover_sources_and_base():
    refs = reference_models(["a", "b"], "base", 3, seed=1)
    assert [r.name for r in refs] == ["a", "b", "base", "merge_0", "merge_1", "merge_2"]
    assert refs[0].recipe.resolve("model.layers.0.mlp.down_proj.weight", 0.0)["weight"] == [1.0, 0.0]
    assert refs[2].recipe.resolve("x", 0.0)["weight"] == [0.0, 0.0]
    again, other = reference_models(["a", "b"], "base", 3, seed=1), reference_models(["a", "b"], "base", 3, seed=2)
    assert [r.recipe for r in again] == [r.recipe for r in refs]
    assert [r.recipe for r in other][3:] != [r.recipe for r in refs][3:]


@pytest.mark.slow
def test_calibrate_scores_fits_and_is_reproducible(setup, capsys):
    root, config = setup
    path = _write(root, config)
    assert main(["calibrate", str(path)]) == 0
    out = root / "out" / "calibration.json"
    calibration = Calibration.load(out)
    for task, n_items in (("t_add", 40), ("t_pairs", 30)):
        anchors = calibration.anchors(task)
        assert len(anchors) == 8 and set(anchors) <= {str(i) for i in range(n_items)}
        assert set(calibration.task(task).sources) == {"a", "b"}
        assert calibration.task(task).scoring == {"metric": "acc", "filter": "none"}  # what a search must score
        responses = read_responses(root / "out" / "calibration.responses" / f"{task}.csv")
        assert responses.models == ["a", "b", "base"] + [f"merge_{i}" for i in range(6)]
        assert responses.values.shape == (9, n_items) and not np.isnan(responses.values).any()
        assert len({tuple(r) for r in responses.values}) > 1  # the merges answer differently
    def content():
        doc = json.loads(out.read_text())
        for t in doc["tasks"].values():
            t["diagnostics"].pop("seconds")
        return doc, [p.read_bytes() for p in sorted((root / "out" / "calibration.responses").iterdir())]

    first = content()
    assert main(["calibrate", str(path)]) == 2  # finished work is not replaced by accident
    assert "--force" in capsys.readouterr().err
    assert main(["calibrate", str(path), "--force"]) == 0
    assert content() == first  # same seed, same models: the same responses and fit (timings aside)


@pytest.mark.slow
def test_calibrate_imports_a_responses_matrix(tmp_path):
    rng = np.random.default_rng(0)
    ability, difficulty = rng.normal(size=12), rng.normal(size=50)
    y = (rng.random((12, 50)) < 1 / (1 + np.exp(difficulty[None] - ability[:, None]))).astype(int)
    csv = tmp_path / "r.csv"
    csv.write_text("model," + ",".join(f"q{j}" for j in range(50)) + "\n"
                   + "".join(f"m{i}," + ",".join(map(str, row)) + "\n" for i, row in enumerate(y)))
    cfg = {"models": {"m0": "unused", "m1": "unused"}, "tasks": ["imported"], "responses": {"imported": str(csv)},
           "anchors": 10, "out": str(tmp_path / "c.json")}
    assert main(["calibrate", str(_write(tmp_path, cfg))]) == 0
    assert len(Calibration.load(tmp_path / "c.json").anchors("imported")) == 10


BAD = {
    "unknown field": ({"anchor": 3}, "unknown field 'anchor'"),
    "wrong type": ({"anchors": "many"}, "field 'anchors'"),
    "negative merges": ({"reference_merges": -1}, "field 'reference_merges'"),
    "no tasks": ({"tasks": []}, "field 'tasks'"),
    "task twice": ({"tasks": ["t_add", "t_add"]}, "listed twice"),
    "unknown task": ({"tasks": ["t_addd"]}, "t_addd"),
    "missing model": ({"models": {"a": "models/nope", "b": "models/source_1"}}, "models.a"),
    "too many anchors": ({"anchors": 500}, "anchor"),
    "no base": ({"base_model": None}, "base_model"),
    "unknown filter": ({"tasks": [{"task": "t_add", "filter": "flexible-extract"}, "t_pairs"]},
                       "task 't_add' has no filter 'flexible-extract': its filters are none"),
    "unknown metric": ({"tasks": [{"task": "t_add", "metric": "exact_match"}, "t_pairs"]},
                       "task 't_add' has no metric 'exact_match': its metrics are acc"),
    "generation on a choice task": ({"tasks": [{"task": "t_add", "max_gen_toks": 64}]},
                                    "task 't_add' is a multiple_choice task: max_gen_toks"),
    "batch size": ({"batch_size": "max"}, "field 'batch_size': a batch size is a positive integer or auto"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_configs_fail_in_one_line(setup, case, capsys):
    root, config = setup
    change, message = BAD[case]
    cfg = {**config, **change, "out": f"bad/{case}.json"}
    if cfg.get("base_model") is None:
        cfg.pop("base_model")
    assert main(["calibrate", str(_write(root, cfg, f"bad-{case}.yaml"))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:") and message in lines[0], lines
    assert not (root / "bad").exists()


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: {a: x}\ntasks: [t]\n")
    with pytest.raises(ConfigError, match="field 'out' is missing"):
        load_config(path, CalibrationConfig)
    path.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path, CalibrationConfig)
