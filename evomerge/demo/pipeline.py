"""`evomerge demo`'s sequence of stages (the stages themselves are in search_demo.py):

    check the checkout -> kit -> calibration -> open the run -> search and hand recipes (unless finished)
    -> the hybrid search seeded with its front (where the kit has one; unless finished)
    -> export the front models not exported yet -> the held-out table (kept, or scored now) -> summary

The caller supplies the display (a `DemoUI`: log lines and progress) and the worker pool (`make_pool`), so
this module decides what runs and in which order, and nothing about how it is shown or where it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.demo import search_demo as stages

if TYPE_CHECKING:
    from evomerge.demo.kit import KitConfig
    from evomerge.demo.smollm2_kit import SmolKitConfig
    from evomerge.search.rundir import RunDir
    from evomerge.search.session import Prepared

FRONT_DIR = "front"  # the exported front models, in the run directory


Progress = Callable[[int, int, str], None]  # progress(done, total, note): a stage counting its work


def _ignore(done: int, total: int, note: str = "") -> None:
    pass


class DemoUI:
    """How the demo shows its progress. This one shows nothing; the CLI's draws bars (or, off a terminal,
    a few plain lines with done/total and an ETA) and logs lines."""

    def log(self, message: str) -> None:
        pass

    def counting(self, label: str, unit: str) -> AbstractContextManager[Progress]:
        """While countable work runs (kit training steps, reference models, exports): yields its progress."""
        return nullcontext(_ignore)

    def searching(self, generations: int, pop_size: int) -> AbstractContextManager[tuple[Callable, Callable]]:
        """While the search runs: yields drive()'s (on_generation, on_result)."""
        return nullcontext((lambda report: None, lambda record: None))

    def waiting(self, message: str) -> AbstractContextManager[Progress | None]:
        """While work runs whose size is known only once it starts (hand recipes, the held-out table): yields
        its progress, which the stage calls once it can count; or None, from a display that shows no measure."""
        return nullcontext(_ignore)


@dataclass(frozen=True)
class DemoInputs:
    """What the demo reads: the repository's configs and kit cache; tests point them at a tiny kit."""

    cache_dir: Path = stages.DEFAULT_CACHE
    kit: KitConfig | SmolKitConfig | None = None  # None: the demo's KitConfig(); smollm2_kit.demo_inputs() for SmolLM2
    run_config: Path = stages.DEMO_CONFIG
    calibrate_config: Path = stages.CALIBRATE_CONFIG
    tasks_dir: Path = stages.TASKS_DIR
    hybrid: stages.HybridStage | None = None  # the second search (None: the parameter-space search only)


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    rows: list[stages.Scored]  # the held-out table: specialists, best hand recipes, front models
    summary: list[str]  # the comparisons, one line each

    @property
    def front_dir(self) -> Path:
        return self.run_dir / FRONT_DIR


def run_demo(run_dir: Path | None, make_pool: Callable[[Prepared], object], ui: DemoUI | None = None,
             inputs: DemoInputs = DemoInputs()) -> DemoResult:
    """Run every stage not done yet (each is kept on disk) and return the table. `make_pool(prepared)` is
    called only when candidates need scoring, so a finished demo starts no workers."""
    from evomerge.search.session import status

    ui = ui or DemoUI()
    stages.check_checkout()
    with ui.counting("training the demo kit", "steps") as progress:  # counts nothing when the kit is cached
        _build_kit(inputs, ui.log, progress)
    with ui.counting("calibrating: scoring reference models", "models") as progress:
        stages.ensure_calibration(ui.log, progress, inputs.calibrate_config)
    run, prepared = stages.open_demo_run(run_dir or stages.DEFAULT_RUN_DIR, inputs.run_config)
    ui.log(f"run directory: {run.path}")
    with closing(_SharedPool(make_pool)) as pools:  # the workers go before the held-out scoring needs the cores
        if _finished(run, prepared):  # no workers: the hand-recipe scores are read back from the run directory
            ui.log("search and hand recipes: finished, read from the run directory")
            hand = stages.score_hand_recipes(prepared, None, run.path, ui.log)
        else:
            hand = _search_and_hand_recipes(run, prepared, pools, ui)
        front = status(run, prepared)["front"]
        fronts = [(run.path, front)]
        hybrid: list[dict] = []  # the hybrid search's new front members
        if inputs.hybrid is not None:
            hybrid, hybrid_dir = _hybrid_search(run, prepared, front, inputs.hybrid, pools, ui)
            fronts.append((hybrid_dir, hybrid))
    with ui.counting("exporting the front", "models") as progress:
        exported = export_fronts(fronts, ui.log, progress)
    rows = stages.cached_table(run.path, front, hybrid)
    if rows is None:
        with ui.waiting("scoring on the held-out test splits") as progress:
            rows = stages.held_out_table(prepared, run.path, hand, front, exported, ui.log, inputs.tasks_dir,
                                         progress or _ignore, hybrid)
    return DemoResult(run.path, rows, stages.summary(rows, hybrid_searched=inputs.hybrid is not None))


def _build_kit(inputs: DemoInputs, log, progress: Progress) -> None:
    from evomerge.demo.kit import build_demo_kit
    from evomerge.demo.smollm2_kit import SmolKitConfig, build_smollm2_kit

    if isinstance(inputs.kit, SmolKitConfig):
        build_smollm2_kit(inputs.cache_dir, inputs.kit, log=log, progress=progress)
    else:
        build_demo_kit(inputs.cache_dir, log=log, config=inputs.kit, progress=progress)


def _finished(run: RunDir, prepared: Prepared) -> bool:
    return _searched(run, prepared) and (run.path / stages.HAND_FILE).is_file()


def _searched(run: RunDir, prepared: Prepared) -> bool:
    from evomerge.search.session import status

    state = status(run, prepared)
    return state["generation"] >= state["generations"]


def _hybrid_search(ps_run: RunDir, ps_prepared: Prepared, front: list[dict], stage: stages.HybridStage,
                   pools: _SharedPool, ui: DemoUI) -> tuple[list[dict], Path]:
    """(its new front members, its run directory): the hybrid search seeded with the ps front, run to its
    budget (resumed if interrupted), on the ps search's workers where they are still up."""
    from evomerge.search.session import drive, status

    run, prepared = stages.open_hybrid_run(ps_run.path, ps_prepared, front, stage)
    if not _searched(run, prepared):
        ui.log(f"hybrid search: {len(prepared.space.seeds)} front merges seed paths through both specialists' "
               f"and their own layers; run directory {run.path}")
        pool = stages.SeedsScored(pools.get(prepared), ps_run.path, prepared, front)
        with ui.searching(stage.generations, prepared.config.algorithm.pop_size) as (on_generation, on_result):
            drive(run, prepared, pool, on_generation=on_generation, on_result=on_result)
    new = stages.new_front(run, prepared, status(run, prepared)["front"])
    ui.log(f"hybrid search: {len(new)} new front model(s) beside the parameter-space front's own merges")
    return new, run.path


def _search_and_hand_recipes(run: RunDir, prepared: Prepared, pools: _SharedPool, ui: DemoUI) -> dict:
    """Search to the budget (resumed if interrupted), plot its front, then score the hand recipes on the same
    workers, exactly as candidates are scored."""
    from evomerge.search.plot import FRONT_PLOT, plot_front
    from evomerge.search.session import drive, status

    algorithm = prepared.config.algorithm
    pool = pools.get(prepared)
    with ui.searching(algorithm.generations, algorithm.pop_size) as (on_generation, on_result):
        drive(run, prepared, pool, on_generation=on_generation, on_result=on_result)
    png = plot_front(status(run, prepared), run.path / FRONT_PLOT)
    if png:
        ui.log(f"front plot: {png}")
    with ui.waiting("scoring hand recipes (a grid of task_arithmetic and ties) on the search split") as progress:
        return stages.score_hand_recipes(prepared, _CountedPool(pool, progress or _ignore), run.path, ui.log)


class _SharedPool:
    """One set of workers for both searches: a worker builds only the run's sources and fitness (the driver
    decodes genomes), which the hybrid run copies from the ps run, so the ps search's workers serve it too
    (one start of the workers and one load of the sources instead of two). Started on first use."""

    def __init__(self, make_pool: Callable[[Prepared], object]) -> None:
        self.make_pool, self.pool, self.serves = make_pool, None, None

    def get(self, prepared: Prepared):
        serves = (prepared.config.sources, prepared.config.fitness)  # what the workers were built from
        if self.pool is not None and self.serves != serves:
            self.close()
        if self.pool is None:
            self.pool, self.serves = self.make_pool(prepared), serves
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = self.serves = None


def export_fronts(fronts: list[tuple[Path, list[dict]]], log, progress: Progress = _ignore) -> dict[str, Path]:
    """candidate id -> its export in RUN_DIR/front/ for each (run directory, front), exporting those not there
    yet; `progress` counts them all together."""
    from evomerge.export import export_run

    # an export appears whole or not at all
    todo = [(run_path, [f["id"] for f in front if not (run_path / FRONT_DIR / f["id"]).is_dir()])
            for run_path, front in fronts]
    total, done = sum(len(ids) for _, ids in todo), 0
    for run_path, ids in todo:
        if ids:
            counted = lambda d, _total, note, before=done: progress(before + d, total, note)
            export_run(run_path, run_path / FRONT_DIR, ids=ids, force=True, log=log, progress=counted)
            done += len(ids)
    return {f["id"]: run_path / FRONT_DIR / f["id"] for run_path, front in fronts for f in front}


class _CountedPool:
    """A pool whose evaluate() reports each result to `progress` as it comes (the hand recipes' progress)."""

    def __init__(self, pool, progress: Progress) -> None:
        self.pool, self.progress = pool, progress

    def evaluate(self, candidates):
        candidates = list(candidates)
        self.progress(0, len(candidates), "")
        for done, result in enumerate(self.pool.evaluate(candidates), 1):
            self.progress(done, len(candidates), result.key)
            yield result

