"""The demo search's stages end to end on a tiny demo kit (the real demo trains for minutes; this one for
seconds): calibration, NSGA-II, hand recipes scored like candidates, export, the held-out table."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.demo import search_demo as demo
from evomerge.demo.hand import hand_recipes
from evomerge.demo.kit import KitConfig, build_demo_kit

TINY = KitConfig(hidden=32, layers=2, heads=2, intermediate=64, block=32, batch=4, base_steps=6,
                 specialist_steps=4, warmup=2, log_every=3)


def test_hand_recipes_are_a_grid_of_valid_mergekit_recipes():
    from evomerge.merge.recipe import Recipe

    recipes = hand_recipes({"adder": "/m/adder", "translator": "/m/translator"}, "/m/base")
    assert len(recipes) == 16 + 12
    ta = recipes["task_arithmetic adder=1 translator=0.75"]
    assert [m["parameters"]["weight"] for m in ta["models"]] == [1.0, 0.75] and ta["base_model"] == "/m/base"
    ties = recipes["ties adder=0.5 translator=1 density 0.3"]
    assert {m["parameters"]["density"] for m in ties["models"]} == {0.3}
    for name, doc in recipes.items():
        Recipe.from_mergekit(doc, name)  # every one parses as a merge recipe


def test_best_hand_is_chosen_by_mean_estimate_per_method():
    scored = {"task_arithmetic a=1 b=1": {"x": 0.6, "y": 0.6}, "task_arithmetic a=1 b=0.5": {"x": 0.9, "y": 0.4},
              "ties a=1 b=1 density 0.3": {"x": 0.2, "y": 0.9}, "ties a=1 b=1 density 0.6": {"x": 0.5, "y": 0.7}}
    assert demo.best_hand(scored, "task_arithmetic") == "task_arithmetic a=1 b=0.5"  # 0.65 > 0.6
    assert demo.best_hand(scored, "ties") == "ties a=1 b=1 density 0.6"


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    """A tiny kit, and the demo's calibration and run configs pointed at it (as runs/demo*.yaml point at
    .cache/demo/kit)."""
    root = tmp_path_factory.mktemp("demo")
    kit = build_demo_kit(root / "cache", config=TINY)
    models = {"adder": str(kit.specialists["adder"]), "translator": str(kit.specialists["translator"])}
    calibrate = yaml.safe_load(demo.CALIBRATE_CONFIG.read_text())
    calibrate.update(models=models, base_model=str(kit.base), task_paths=[str(kit.tasks_dir)], reference_merges=3,
                     anchors=20, out=str(root / "cache" / "kit" / "calibration.json"))
    (root / "calibrate.yaml").write_text(yaml.safe_dump(calibrate))
    run = yaml.safe_load(demo.DEMO_CONFIG.read_text())
    run.update(sources={"models": models, "base_model": str(kit.base)}, algorithm={"pop_size": 6, "generations": 2})
    run["fitness"].update(calibration=calibrate["out"], task_paths=[str(kit.tasks_dir)])
    (root / "demo.yaml").write_text(yaml.safe_dump(run))
    return root, kit


@pytest.mark.slow
def test_demo_stages_end_to_end(demo_workspace):
    from evomerge.export import export_run
    from evomerge.search.session import drive, status
    from evomerge.worker.local_pool import LocalPool

    root, kit = demo_workspace
    log: list[str] = []
    calibration = demo.ensure_calibration(log.append, lambda *a: None, root / "calibrate.yaml")
    assert calibration.is_file() and calibration.resolve().parent == kit.root.resolve()  # beside its kit
    assert demo.ensure_calibration(log.append, lambda *a: None, root / "calibrate.yaml") == calibration
    assert log[-1].startswith("calibration: cached")

    run_dir = root / "run"
    run, prepared = demo.open_demo_run(run_dir, root / "demo.yaml")
    pool = LocalPool(prepared)
    drive(run, prepared, pool)
    hand = demo.score_hand_recipes(prepared, pool, run.path, log.append)
    assert len(hand) == 28 and all(set(v) == set(demo.SEARCHED) for v in hand.values())
    assert json.loads((run.path / demo.HAND_FILE).read_text()) == hand  # kept: a rerun scores nothing
    assert demo.score_hand_recipes(prepared, None, run.path, log.append) == hand

    front = status(run, prepared)["front"]
    exported = export_run(run.path, run.path / "front", ids=[f["id"] for f in front], force=True)
    paths = {e.key: e.path for e in exported}
    counted = []
    rows = demo.held_out_table(prepared, run.path, hand, front, paths, log.append, tasks_dir=kit.tasks_dir,
                               progress=lambda *a: counted.append(a))
    total = 5 + len(front)
    names = ["base", "adder", "translator", rows[3].name, rows[4].name, *(f["id"] for f in front)]
    assert counted == [(i, total, name) for i, name in enumerate(names)] + [(total, total, "")]
    kinds = [r.kind for r in rows]
    assert kinds == ["base"] + ["specialist"] * 2 + ["hand"] * 2 + ["front"] * len(front)
    assert [r.name for r in rows[:3]] == ["base", "adder", "translator"]
    assert all(set(r.test) == set(demo.TEST_TASKS) and all(0 <= v <= 1 for v in r.test.values()) for r in rows)
    estimates = [r.estimated_mean for r in rows if r.kind == "front"]
    assert estimates == sorted(estimates, reverse=True)
    # hand recipes and front re-scored on every search item; the specialists were never estimated
    assert all(set(r.rescored) == set(demo.SEARCHED) for r in rows[3:]) and rows[0].rescored == rows[1].rescored == {}
    lines = demo.summary(rows)
    best = max(rows[5:], key=lambda r: r.rescored_mean)  # chosen on the whole split, not on the estimate
    assert lines[0].startswith(f"best front model on the whole search split: {best.name} (front; whole search split "
                               f"{100 * best.rescored_mean:.1f}%, anchor estimate {100 * best.estimated_mean:.1f}%)")
    assert lines[1].startswith(f"  winner's curse: the top estimate, {rows[5].name}, re-scores at ")

    # the same run, reopened: the same table (seeded, and every stage read back from disk)
    table = (run.path / demo.TABLE_FILE).read_text()
    run, prepared = demo.open_demo_run(run_dir, root / "demo.yaml")
    again = demo.held_out_table(prepared, run.path, hand, front, paths, log.append, tasks_dir=kit.tasks_dir)
    assert again == rows and (run.path / demo.TABLE_FILE).read_text() == table
    # what a finished demo prints from: the table kept for this front, and none for another front
    assert demo.cached_table(run.path, front) == rows
    assert demo.cached_table(run.path, front[1:] + [{"id": "g9999-0000-x"}]) is None
    # a table from before the whole-split re-scoring is scored again, not shown with estimates alone
    old = [{k: v for k, v in row.items() if k != "rescored"} for row in json.loads(table)]
    (run.path / demo.TABLE_FILE).write_text(json.dumps(old))
    assert demo.cached_table(run.path, front) is None
    # and one from before the base was scored
    (run.path / demo.TABLE_FILE).write_text(json.dumps(json.loads(table)[1:]))
    assert demo.cached_table(run.path, front) is None


@pytest.mark.slow
def test_run_demo_runs_the_stages_not_done_yet(demo_workspace):
    """The sequence `evomerge demo` runs: everything the first time (one pool for both searches, a plot of the
    front), then, once finished, only reads back: no pool, nothing scored, the same table."""
    from contextlib import nullcontext

    from evomerge.demo.pipeline import DemoInputs, DemoUI, run_demo
    from evomerge.worker.local_pool import LocalPool

    root, kit = demo_workspace
    inputs = DemoInputs(cache_dir=root / "cache", kit=TINY, run_config=root / "demo.yaml",
                        calibrate_config=root / "calibrate.yaml", tasks_dir=kit.tasks_dir,
                        hybrid=demo.HybridStage(pop_size=4, generations=1))

    class Recorder(DemoUI):
        def __init__(self):
            self.lines, self.waits, self.generations = [], [], []

        def log(self, message):
            self.lines.append(message)

        def waiting(self, message):
            self.waits.append(message)
            return nullcontext()

        def searching(self, generations, pop_size):
            return nullcontext((self.generations.append, lambda record: None))

    pools = []
    ui = Recorder()
    result = run_demo(root / "pipeline", lambda prepared: pools.append(LocalPool(prepared)) or pools[-1], ui, inputs)
    assert len(pools) == 1 and len(ui.generations) == 2 + 1 and len(ui.waits) == 2  # the hybrid: same workers
    assert (result.run_dir / "front.png").is_file() and (result.run_dir / demo.HAND_FILE).is_file()
    kinds = [r.kind for r in result.rows]
    assert kinds[:5] == ["base"] + ["specialist"] * 2 + ["hand"] * 2 and set(kinds[5:]) <= {"front", "hybrid"}
    assert all((result.front_dir / r.name).is_dir() for r in result.rows if r.kind == "front")
    assert result.summary == demo.summary(result.rows, hybrid_searched=True)

    again = Recorder()
    assert run_demo(root / "pipeline", lambda prepared: pytest.fail("a finished demo starts no pool"), again,
                    inputs) == result
    assert "search and hand recipes: finished, read from the run directory" in again.lines and again.waits == []


@pytest.mark.parametrize("name", ["demo-calibrate.yaml", "demo.yaml", "demo-dfs.yaml"])
def test_example_configs_in_runs_are_valid(name):
    from evomerge.config import CalibrationConfig, RunConfig, load_config
    from evomerge.genome import SearchSpace

    path = demo.REPO / "runs" / name
    if name.endswith("calibrate.yaml"):
        assert load_config(path, CalibrationConfig).task_names == list(demo.SEARCHED)
        return
    config = load_config(path, RunConfig)
    space = SearchSpace.load(config.search_space, sources=config.sources.models, base_model=config.sources.base_model)
    assert space.dim({n: 4 for n in config.sources.models}) > 0
    assert {o.task for o in config.objectives if o.task} == set(demo.SEARCHED)
