"""`evomerge demo`: the product end to end on a fresh clone, offline, on CPU.

    kit (built once, cached)  ->  calibration (once per kit)  ->  NSGA-II search (runs/demo.yaml)
    ->  hand recipes scored like candidates  ->  front exported  ->  one table on the held-out test splits

Every stage is kept on disk (the kit and its calibration under the cache, the search, hand-recipe scores
and exports in the run directory), so an interrupted demo resumes where it stopped and a finished one
prints the same table again from disk, in seconds (no Ray, no scoring). Everything is seeded: the same
command prints the same table.

pipeline.py calls these stages in order; the CLI (evomerge/cli/demo.py) supplies the progress display
and the worker pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evomerge.errors import EvomergeError

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "runs" / "demo.yaml"
CALIBRATE_CONFIG = REPO / "runs" / "demo-calibrate.yaml"
TASKS_DIR = REPO / "fitness" / "demo"
DEFAULT_CACHE = REPO / ".cache" / "demo"  # what runs/demo*.yaml name (through the cache's `kit` link)
DEFAULT_RUN_DIR = REPO / "runs" / "demo"
SEARCHED = ("demo_add", "demo_words")  # the objectives; demo_cross (never trained) is only reported
TEST_TASKS = {"demo_add": "demo_add_test", "demo_words": "demo_words_test", "demo_cross": "demo_cross_test"}
HAND_FILE = "hand_recipes.json"
TABLE_FILE = "demo_table.json"

Log = Callable[[str], None]


def check_checkout() -> None:
    missing = [p for p in (DEMO_CONFIG, CALIBRATE_CONFIG, TASKS_DIR) if not p.exists()]
    if missing:
        raise EvomergeError(f"the demo needs the repository checkout: {missing[0]} is missing (install evomerge "
                            "with `pip install -e .` from a clone and run the demo from there)")


def ensure_calibration(log: Log, progress: Callable[[int, int, str], None], config_path: Path = CALIBRATE_CONFIG,
                       ) -> Path:
    """The kit's calibration (runs/demo-calibrate.yaml), computed on first use and kept beside the kit."""
    from evomerge.config import CalibrationConfig, load_config
    from evomerge.fitness.self_calibration import calibrate, calibration_outputs, write_outputs

    config = load_config(config_path, CalibrationConfig)
    out, responses_dir = calibration_outputs(config, config_path, force=True)
    if out.is_file():
        log(f"calibration: cached in {out}")
        return out
    calibration, responses = calibrate(config, config_path, progress=progress)
    write_outputs(calibration, responses, out, responses_dir)  # the calibration file last, atomically
    log(f"calibration: {len(responses)} tasks, {config.anchors} anchors each, written to {out}")
    return out


def open_demo_run(run_dir: Path, config_path: Path = DEMO_CONFIG):
    """(run, prepared): the existing demo run (finished or not), else a new one from runs/demo.yaml."""
    from evomerge.search.session import create_run, open_run

    if (run_dir / "config.yaml").is_file():
        return open_run(run_dir)
    return create_run(config_path, run_dir)


HYBRID_DIR, HYBRID_CONFIG = "hybrid", "hybrid.yaml"  # the hybrid search's run and its config, in the demo run


@dataclass(frozen=True)
class HybridStage:
    """The demo's second search: the parameter-space front joins a layer pool with both specialists, and
    NSGA-II searches paths through it (which layer of which model runs, in what order, scaled how), starting
    from the front merges themselves (each as its own layers in order), as evolutionary model merging does
    data-flow search on top of a parameter-space merge."""

    pop_size: int  # raised to the front's size where that is larger
    generations: int
    scales: tuple[float, float] = (0.5, 1.5)


def open_hybrid_run(ps_run_dir: Path, prepared, front: list[dict], stage: HybridStage):
    """(run, prepared) of the hybrid search in PS_RUN/hybrid/, created once from the ps run's config with its
    front's genomes as the first seeds (kept in the hybrid run's config, so a resumed run replays the same
    search whatever the ps run holds later)."""
    import yaml

    from evomerge.search.rundir import write_atomic
    from evomerge.search.session import create_run, open_run

    run_dir = ps_run_dir / HYBRID_DIR
    if (run_dir / "config.yaml").is_file():
        return open_run(run_dir)
    doc = prepared.config.model_dump(mode="json")  # a run snapshot: every path already absolute
    doc.update(name=f"{doc['name']}-hybrid", run_dir=None,
               # the whole front seeds the first generation
               algorithm={**doc["algorithm"], "pop_size": max(stage.pop_size, len(front)),
                          "generations": stage.generations},
               search_space={"preset": "hybrid", "ps": prepared.space.ps.model_dump(mode="json"),
                             "seeds": _genomes(ps_run_dir, [f["id"] for f in front]),
                             # no pinned ends: a seed's path is the front merge's own layers, the merge alone
                             "dfs": {"repeats": 1, "pin_ends": False,
                                     "scales": {"form": "per_layer", "range": list(stage.scales)}}})
    config_path = ps_run_dir / HYBRID_CONFIG
    write_atomic(config_path, yaml.safe_dump(doc, sort_keys=False).encode())
    return create_run(config_path, run_dir)


def new_front(run, prepared, front: list[dict]) -> list[dict]:
    """The hybrid front members that are not one of its given seeds (those are the ps front's own merges)."""
    space = prepared.space
    seeds = {tuple(x) for x in space.initial(prepared.layer_counts)[:len(space.seeds)].tolist()}
    genomes = _genomes(run.path, [f["id"] for f in front])
    return [f for f, x in zip(front, genomes) if tuple(x) not in seeds]


class SeedsScored:
    """The hybrid search's pool: a seed (a ps front merge, run as a path through its own layers) takes the result
    the ps search recorded for that merge instead of being scored again, where the merge is deterministic (a
    random method draws from the candidate's seed, which differs between the runs); the rest go to `pool`.
    tests/test_demo_smollm2.py scores the seeds for real and checks they equal what is copied."""

    def __init__(self, pool, run_dir: Path, prepared, front: list[dict]) -> None:
        from evomerge.merge.recipe import Recipe
        from evomerge.search.rundir import RunDir

        self.pool = pool
        with RunDir.open(run_dir).open_ledger() as ledger:
            records = {tuple(r.genome): r for r in (ledger.get(f["id"]) for f in front)}
        seeds = prepared.space.initial(prepared.layer_counts)[:len(prepared.space.seeds)]
        self.known = {tuple(full): records[tuple(given)] for full, given in zip(seeds.tolist(), prepared.space.seeds)
                      if tuple(given) in records and not Recipe.from_mergekit(records[tuple(given)].recipe).spec.random}

    def evaluate(self, candidates):
        from evomerge.search.candidates import OK, EvalResult

        todo = []
        for c in candidates:
            rec = self.known.get(tuple(c.genome))
            if rec is None:
                todo.append(c)
                continue
            costs = {"params": rec.extra["params"], "path_length": float(len(c.recipe["path"]))}
            yield EvalResult(c.key, OK, rec.responses, rec.estimates, costs, None, f"copied from {rec.key}",
                             rec.node or "", {"total": 0.0})
        yield from self.pool.evaluate(todo)


def _genomes(run_dir: Path, ids: list[str]) -> list[list[float]]:
    from evomerge.search.rundir import RunDir

    with RunDir.open(run_dir).open_ledger() as ledger:
        return [list(ledger.get(key).genome) for key in ids]


@dataclass(frozen=True)
class Scored:
    """A model of the table: its search-split estimates (as the search sees it) and held-out test accuracy."""

    name: str
    kind: str  # base, specialist, hand, front, hybrid
    estimated: dict[str, float]  # objective task -> IRT estimate on the search split (empty for specialists)
    test: dict[str, float]  # task -> accuracy on the full test split
    # objective task -> accuracy on every item of the search split, not only the anchors the estimate was read
    # from: a model picked for its estimate is picked partly for its luck on those anchors (the winner's curse),
    # so the best one is chosen on this (hand recipes and front; empty for specialists)
    rescored: dict[str, float] = field(default_factory=dict)

    @property
    def estimated_mean(self) -> float | None:
        return sum(self.estimated.values()) / len(self.estimated) if self.estimated else None

    @property
    def rescored_mean(self) -> float | None:
        return sum(self.rescored.values()) / len(self.rescored) if self.rescored else None

    @property
    def search_mean(self) -> float | None:
        """What the best model is chosen on: the whole search split where re-scored, else the estimate."""
        return self.rescored_mean if self.rescored else self.estimated_mean

    @property
    def test_mean(self) -> float:
        return sum(self.test[t] for t in SEARCHED) / len(SEARCHED)


def score_hand_recipes(prepared, pool, run_dir: Path, log: Log) -> dict[str, dict[str, float]]:
    """name -> {task: estimate} of every hand recipe, scored by the pool like a candidate (kept in the run)."""
    from evomerge.demo.hand import hand_recipes
    from evomerge.search.candidates import Candidate
    from evomerge.search.rundir import write_atomic

    path = run_dir / HAND_FILE
    if path.is_file():
        return json.loads(path.read_text())
    config = prepared.config
    recipes = hand_recipes(config.sources.models, config.sources.base_model)
    candidates = [Candidate(f"hand-{i:02d}", 0, i, [], doc, config.seed) for i, doc in enumerate(recipes.values())]
    names = {c.key: name for c, name in zip(candidates, recipes)}
    scored: dict[str, dict[str, float]] = {}
    for result in pool.evaluate(candidates):
        if not result.ok:
            raise EvomergeError(f"hand recipe {names[result.key]!r} failed: {result.error}")
        scored[names[result.key]] = {t: result.estimates[t][config.fitness.estimator] for t in SEARCHED}
    scored = {name: scored[name] for name in recipes}  # grid order, whatever order results came in
    write_atomic(path, json.dumps(scored, indent=1).encode())
    log(f"hand recipes: {len(scored)} scored on the search split")
    return scored


def best_hand(scored: Mapping[str, Mapping[str, float]], method: str) -> str:
    """The hand recipe of `method` with the best mean estimate: chosen on the search split, as the search
    chooses (ties: the first in grid order)."""
    names = [n for n in scored if n.split()[0] == method]
    return max(names, key=lambda n: sum(scored[n].values()) / len(scored[n]))


def held_out_table(prepared, run_dir: Path, hand: Mapping[str, Mapping[str, float]], front: list[dict],
                   exported: Mapping[str, Path], log: Log, tasks_dir: Path = TASKS_DIR,
                   progress: Callable[[int, int, str], None] = lambda done, total, name: None,
                   hybrid: list[dict] = ()) -> list[Scored]:
    """Score the base, the specialists, the best hand recipes and the exported front models (ps `front`, then
    the new members of the `hybrid` search's front) on every test item, and the hand recipes and fronts on every
    search item too (`Scored.rescored`); `progress(done, total, name)` counts the models (name: the one under
    way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.demo.hand import hand_recipes
    from evomerge.fitness.lmeval import Scorer
    from evomerge.merge.recipe import Recipe
    from evomerge.search.rundir import write_atomic
    from evomerge.worker.sources import SourceModels

    hf_logging.disable_progress_bar()
    config = prepared.config
    sources = dict(config.sources.models)
    scorer = Scorer(list(TEST_TASKS.values()), [tasks_dir],
                    tokenizer=AutoTokenizer.from_pretrained(config.sources.base_model), batch_size=64)

    searched = Scorer(list(SEARCHED), [tasks_dir], tokenizer=scorer.tokenizer, batch_size=64)

    def test(model) -> dict[str, float]:
        with torch.no_grad():
            scores = scorer.score(model)
        return {t: float(scores[test_task].value) for t, test_task in TEST_TASKS.items()}

    def rescore(model) -> dict[str, float]:
        with torch.no_grad():
            scores = searched.score(model)
        return {t: float(scores[t].value) for t in SEARCHED}

    rows: list[Scored] = []
    total = 1 + len(sources) + 2 + len(front) + len(hybrid)  # base, specialists, best hand recipe per method, fronts

    def starting(message: str, name: str) -> None:
        log(message)
        progress(len(rows), total, name)

    for name, path, kind in [("base", config.sources.base_model, "base"),
                             *((name, path, "specialist") for name, path in sources.items())]:
        starting(f"test split: {name}", name)
        rows.append(Scored(name, kind, {}, test(AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval())))
    recipes = hand_recipes(sources, config.sources.base_model)
    materializer = SourceModels(config, prepared.config_dir).materializer  # as the workers build it
    for method in ("task_arithmetic", "ties"):
        name = best_hand(hand, method)
        starting(f"test split: best {method} ({name})", name)
        model = materializer.materialize(Recipe.from_mergekit(recipes[name], name), seed=config.seed)
        rows.append(Scored(name, "hand", dict(hand[name]), test(model), rescore(model)))
    for kind, items in (("front", front), ("hybrid", hybrid)):
        for item in items:
            starting(f"test split: {kind} model {item['id']}", item["id"])
            model = AutoModelForCausalLM.from_pretrained(exported[item["id"]], dtype="auto").eval()
            estimated = {t: float(item["objectives"][t]) for t in SEARCHED}
            rows.append(Scored(item["id"], kind, estimated, test(model), rescore(model)))
    progress(total, total, "")
    by_estimate = lambda kind: sorted((r for r in rows if r.kind == kind), key=lambda r: -r.estimated_mean)
    rows = [r for r in rows if r.kind in ("base", "specialist", "hand")] + by_estimate("front") + by_estimate("hybrid")
    write_atomic(run_dir / TABLE_FILE, (json.dumps([asdict(r) for r in rows], indent=1) + "\n").encode())
    return rows


def cached_table(run_dir: Path, front: list[dict], hybrid: list[dict] = ()) -> list[Scored] | None:
    """The held-out table a previous demo wrote for these fronts, else None (also for a table written before the
    base was scored or the hand recipes and front were re-scored on the whole search split: it is scored again)."""
    path = run_dir / TABLE_FILE
    if not path.is_file():
        return None
    rows = [Scored(**row) for row in json.loads(path.read_text())]
    same_front = ({r.name for r in rows if r.kind == "front"} == {f["id"] for f in front}
                  and {r.name for r in rows if r.kind == "hybrid"} == {f["id"] for f in hybrid})
    complete = any(r.kind == "base" for r in rows) and all(r.rescored for r in rows if r.kind in ("hand", "front"))
    return rows if same_front and complete else None


def short_name(row: Scored) -> str:
    """A table label: 'ties 1/0.5 d0.9' for a hand recipe, the id's generation-index part for a front model."""
    if row.kind in ("front", "hybrid"):
        return row.name[:10]
    if row.kind == "hand":
        words = row.name.split()
        weights = "/".join(w.split("=")[1] for w in words[1:] if "=" in w)
        density = f" d{words[-1]}" if "density" in words else ""
        return f"{'TA' if words[0] == 'task_arithmetic' else words[0]} {weights}{density}"
    return row.name


def summary(rows: list[Scored], hybrid_searched: bool = False) -> list[str]:
    """The comparisons the demo exists for, in points of held-out test accuracy."""
    front = [r for r in rows if r.kind in ("front", "hybrid")]
    if not front:
        return ["the search found no front model (every candidate failed): see the run's ledger"]
    # chosen on the search split, as a user would choose: on all its items, not the anchors the search saw
    best = max(front, key=lambda r: r.search_mean)
    hand = max((r for r in rows if r.kind == "hand"), key=lambda r: r.search_mean)
    top = max(front, key=lambda r: r.estimated_mean)  # what the search's own estimates would have picked
    specialists = {"adder": "demo_add", "translator": "demo_words"}
    lines = [f"best front model on the whole search split: {best.name} ({best.kind}; {_search_numbers(best)})"]
    if best.rescored:
        optimism = sum(r.estimated_mean - r.rescored_mean for r in front) / len(front)
        lines.append(f"  winner's curse: the top estimate, {top.name}, re-scores at {_search_numbers(top)}; "
                     f"over the front, anchor estimate minus whole-split accuracy averages {100 * optimism:+.1f} points")
    lines.append(f"  vs the best hand recipe ({hand.name}), mean of add and words: "
                 + f"{100 * (best.test_mean - hand.test_mean):+.1f} points")
    for r in rows:
        if r.kind == "specialist" and r.name in specialists:
            task = specialists[r.name]
            lines.append(f"  vs the {r.name} on {task}: {100 * (best.test[task] - r.test[task]):+.1f} points")
    return lines + (hybrid_lines(rows) if hybrid_searched else [])


def hybrid_lines(rows: list[Scored]) -> list[str]:
    """Whether the hybrid search found paths that beat every parameter-space front model on an objective."""
    ps = [r for r in rows if r.kind == "front"]
    hybrid = [r for r in rows if r.kind == "hybrid"]
    if not hybrid or not ps:
        return ["hybrid search: its front holds only the parameter-space front's own merges (no new path won)"]
    lines = [f"hybrid search: {len(hybrid)} new front model(s), paths through the specialists' and the front merges' "
             + "layers"]
    for task in SEARCHED:
        h, p = (max(rs, key=lambda r: r.estimated[task]) for rs in (hybrid, ps))
        verdict = "beats every parameter-space front model" if h.estimated[task] > p.estimated[task] else \
            "does not beat the best parameter-space one"
        lines.append(f"  on {task}: the best hybrid, {h.name[:10]}, estimate {100 * h.estimated[task]:.1f}% (held-out "
                     f"{100 * h.test[task]:.1f}%) vs {p.name[:10]} {100 * p.estimated[task]:.1f}% (held-out "
                     f"{100 * p.test[task]:.1f}%): {verdict}")
    return lines


def _search_numbers(row: Scored) -> str:
    estimate = f"anchor estimate {100 * row.estimated_mean:.1f}%"
    return f"whole search split {100 * row.rescored_mean:.1f}%, {estimate}" if row.rescored else estimate
