"""Run configs: every invalid config is one ConfigError line that names the field."""

from __future__ import annotations

import pytest
import yaml

from evomerge.config import ConfigError, RunConfig, load_config

VALID = {
    "name": "demo",
    "sources": {"models": {"adder": "m/adder", "translator": "m/translator"}, "base_model": "m/base"},
    "search_space": "ps_task_arithmetic",
    "fitness": {"calibration": "calibration.json", "tasks": ["demo_add", "demo_words"]},
    "objectives": [{"task": "demo_add"}, {"task": "demo_words"}],
    "algorithm": {"name": "nsga2", "pop_size": 8, "generations": 3},
    "seed": 1,
    "workers": {"count": 2},
}


def _load(tmp_path, doc):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path, RunConfig)


def _with(**changes):
    doc = yaml.safe_load(yaml.safe_dump(VALID))  # deep copy
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = doc
        for p in parents:
            node = node[p]
        if value is _DROP:
            node.pop(key)
        else:
            node[key] = value
    return doc


_DROP = object()

BAD = {
    "unknown top-level key": (_with(seeds=3), "unknown field 'seeds'"),
    "unknown nested key": (_with(algorithm__popsize=8), "unknown field 'algorithm.popsize'"),
    "missing name": (_with(name=_DROP), "field 'name' is missing"),
    "missing sources": (_with(sources=_DROP), "field 'sources' is missing"),
    "no models": (_with(sources__models={}), "field 'sources.models'"),
    "missing calibration": (_with(fitness__calibration=_DROP), "field 'fitness.calibration' is missing"),
    "empty task list": (_with(fitness__tasks=[]), "field 'fitness.tasks'"),
    "objectives empty": (_with(objectives=[]), "field 'objectives'"),
    "objective with both kinds": (_with(objectives=[{"task": "demo_add", "cost": "params"}]), "objectives.0"),
    "objective of neither kind": (_with(objectives=[{}]), "either {task: NAME}"),
    "unknown cost": (_with(objectives=[{"task": "demo_add"}, {"cost": "flops"}]), "objectives.1.cost"),
    "objective task not scored": (_with(objectives=[{"task": "demo_math"}]), "'demo_math' is not among fitness.tasks"),
    "costs only": (_with(objectives=[{"cost": "params"}]), "at least one objective must be a task"),
    "objective twice": (_with(objectives=[{"task": "demo_add"}, {"task": "demo_add"}]), "listed twice"),
    "unknown algorithm": (_with(algorithm__name="cmaes"), "field 'algorithm.name'"),
    "algorithm typo": (_with(algorithm__name="nsga22"), "did you mean 'nsga2'"),
    "estimator typo": (_with(fitness__estimator="gpirtt"), "field 'fitness.estimator': unknown estimator 'gpirtt': "
                       "did you mean 'gpirt'"),
    "ga with two objectives": (_with(algorithm__name="ga"), "ga optimizes one objective"),
    "moead with a constraint": (_with(algorithm__name="moead", max_path_length=8), "moead does not take constraints"),
    "population of one": (_with(algorithm__pop_size=1), "field 'algorithm.pop_size'"),
    "generations a string": (_with(algorithm__generations="ten"), "field 'algorithm.generations'"),
    "negative seed": (_with(seed=-1), "field 'seed'"),
    "zero workers": (_with(workers__count=0), "field 'workers.count'"),
    "negative gpus": (_with(workers__gpus_per_worker=-1), "field 'workers.gpus_per_worker'"),
    "path limit zero": (_with(max_path_length=0), "field 'max_path_length'"),
    "search space a number": (_with(search_space=3), "field 'search_space': Input should be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_run_configs_name_the_field(tmp_path, case):
    doc, message = BAD[case]
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, doc)
    text = str(err.value)
    assert "\n" not in text and message in text, text
    assert str(tmp_path / "run.yaml") in text


def test_valid_config_loads_with_defaults(tmp_path):
    config = _load(tmp_path, VALID)
    assert [o.name for o in config.objectives] == ["demo_add", "demo_words"]
    assert config.workers.cpus_per_worker == 1.0 and config.fitness.estimator == "gpirt"
    config = _load(tmp_path, _with(objectives=[{"task": "demo_add"}, {"cost": "path_length"}]))
    assert config.objectives[1].name == "cost:path_length"


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        _load(tmp_path, ["name", "demo"])
