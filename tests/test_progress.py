"""Progress of long stages: done/total and an ETA on stderr, as bars on a terminal and a few plain lines elsewhere.

The estimator and the line throttling run on a fake clock; the real stages (calibrate, export --verify, the demo
kit's training) run on tiny inputs, and what they write is read back as a user off a terminal (CI, a pipe) sees it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from io import StringIO
from types import SimpleNamespace

import pytest
from rich.console import Console

from evomerge.cli.progress import Board, Estimate, RichDemoUI, counting, duration, search_bars

LINE = re.compile(r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+)(?: \w+)? \((?P<pct>\d+)%\), \S+ elapsed, "
                  r"ETA (?P<eta>\d+s|\d+m\d\ds|\d+h\d\dm)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _plain(width: int = 80) -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, width=width), out  # a file, not a terminal: plain lines


def _progress_lines(text: str, label: str) -> list[re.Match]:
    return [m for line in text.splitlines() if (m := LINE.match(line)) and m["label"] == label]


# ---------------------------------------------------------------------------------------------- the estimate


def test_duration_is_short_and_exact():
    assert [duration(s) for s in (0, 8.4, 59.6, 60, 185, 3599, 3600, 3725, 90000)] == [
        "0s", "8s", "1m00s", "1m00s", "3m05s", "59m59s", "1h00m", "1h02m", "25h00m"]


def test_estimate_leaves_the_first_items_start_up_out_of_the_pace():
    clock = FakeClock()
    e = Estimate(10, clock=clock)
    assert e.remaining() is None and e.eta() == "ETA ?"  # nothing measured yet
    clock.now += 30  # the first item: 25 s of start-up (tasks, models) and 5 s of work
    e.update(1)
    assert e.remaining() == pytest.approx(9 * 30)  # one item: its own time is all there is
    for _ in range(3):
        clock.now += 5
        e.advance()
    assert e.seconds_per_item() == pytest.approx(5) and e.remaining() == pytest.approx(6 * 5)
    clock.now += 2  # two seconds into the fifth item: the ETA counts down between updates ...
    assert e.remaining() == pytest.approx(6 * 5 - 2) and e.eta() == "ETA 28s"
    clock.now += 20  # ... but not below the items after the one under way
    assert e.remaining() == pytest.approx(5 * 5)
    e.update(10)
    assert e.remaining() == 0.0


def test_estimate_leaves_items_found_in_the_ledger_out_of_the_pace():
    clock = FakeClock()
    e = Estimate(20, clock=clock)
    e.skip(8)  # a resumed run replays what the ledger has: no time, no pace
    assert e.done == 8 and e.remaining() is None
    clock.now += 12
    e.advance()
    clock.now += 3
    e.advance()
    clock.now += 3
    e.advance()
    assert e.seconds_per_item() == pytest.approx(3) and e.remaining() == pytest.approx(9 * 3)
    e.update(11, total=30)  # the total may change once it is known better
    assert e.remaining() == pytest.approx(19 * 3)


def test_estimate_without_a_total_counts_but_gives_no_eta():
    clock = FakeClock()
    e = Estimate(clock=clock)
    clock.now += 4
    e.update(2)
    assert e.done == 2 and e.remaining() is None and e.elapsed() == 4


# ---------------------------------------------------------------------------------------------- plain lines


def test_plain_lines_every_tenth_of_the_work_then_a_closing_line():
    clock = FakeClock()
    console, out = _plain()
    with counting(console, "training the demo kit", "steps", clock=clock) as progress:
        for step in range(1, 201):
            clock.now += 0.5  # 100 s in all: the 10% rule, never the 30 s one
            progress(step, 200, "base")
    lines = out.getvalue().splitlines()
    shown = _progress_lines(out.getvalue(), "training the demo kit")
    assert [int(m["done"]) for m in shown] == list(range(20, 200, 20)) and len(lines) == 10
    assert shown[0]["eta"] == "1m30s" and shown[-1].group(0) == \
        "training the demo kit: 180/200 steps (90%), 1m30s elapsed, ETA 10s"
    assert lines[-1] == "training the demo kit: 200/200 steps done in 1m40s"


def test_plain_lines_at_least_every_30_s_of_a_slow_stage():
    """The issue's case: a long training printed a line per 100 steps, minutes apart and with no ETA."""
    clock = FakeClock()
    console, out = _plain()
    with counting(console, "training", "steps", clock=clock) as progress:
        for step in range(1, 1001):
            clock.now += 2.5  # 42 minutes
            progress(step, 1000, "")
    shown = _progress_lines(out.getvalue(), "training")
    times = [int(m["done"]) * 2.5 for m in shown]
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert max(gaps) <= 30 and len(shown) < 2500 / 30 + 10  # a line every 30 s, not one per step
    assert all(m["eta"] == duration((1000 - int(m["done"])) * 2.5) for m in shown)  # the steps left at 2.5 s


def test_a_stage_that_counts_nothing_writes_nothing_and_an_interrupted_one_no_closing_line():
    """A cached kit or calibration opens and closes its stage without a line; Ctrl-C is not 'done'."""
    console, out = _plain()
    with counting(console, "training the demo kit", "steps"):
        pass
    with counting(console, "scoring", "models") as progress:
        progress(0, 5, "a")
    assert out.getvalue() == ""
    with pytest.raises(KeyboardInterrupt), counting(console, "scoring", "models") as progress:
        progress(1, 5, "b")
        raise KeyboardInterrupt
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["scoring: 1/5 models (20%)"]


def test_a_terminal_gets_a_bar_with_the_eta_and_no_plain_lines():
    clock = FakeClock()
    out = StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with Board(console, clock=clock) as board:
        meter = board.meter("scoring reference models", "models")
        for k in range(1, 5):
            clock.now += 10
            meter(k, 8, f"merge_{k}")
        board.progress.refresh()
    text = out.getvalue()
    assert "4/8 models" in text and "ETA 40s" in text and "merge_4" in text
    assert not _progress_lines(text, "scoring reference models")  # the bar, not lines
    assert text.rstrip().endswith("scoring reference models: 4/8 models done in 40s")


def test_search_lines_count_generations_and_evaluations_with_the_eta():
    """A resumed search: the first generation comes from the ledger (no time), then 4 evaluations of 5 s each."""
    clock = FakeClock()
    console, out = _plain(width=200)
    with search_bars(console, 3, 4, clock=clock) as (on_generation, on_result):
        on_generation(SimpleNamespace(generation=0, evaluated=0, reused=4, failed=0))
        for g in (1, 2):
            for i in range(4):
                clock.now += 5
                on_result(SimpleNamespace(key=f"g{g}-{i}"))
            on_generation(SimpleNamespace(generation=g, evaluated=4, reused=0, failed=0))
    text = out.getvalue()
    shown = _progress_lines(text, "evaluations")
    assert shown[0].group(0) == "evaluations: 5/12 (41%), 5s elapsed, ETA 35s"  # the ledger's 4 are not pace
    assert "generation 0: 0 evaluated, 4 from the ledger, 0 failed (1/3 generations, ETA ?)" in text
    assert "generation 1: 4 evaluated, 0 from the ledger, 0 failed (2/3 generations, ETA 20s)" in text
    assert text.splitlines()[-2:] == ["generations: 3/3 done in 40s", "evaluations: 12/12 done in 40s"]


def test_the_demo_ui_counts_its_stages():
    console, out = _plain(width=200)
    ui = RichDemoUI(console)
    with ui.waiting("scoring hand recipes") as progress:
        for k in range(4):
            progress(k, 4, f"hand-{k:02d}")
        progress(4, 4, "")
    with ui.counting("exporting the front", "models") as progress:
        progress(0, 2, "g0001-0000")
        progress(1, 2, "g0001-0001")
        progress(2, 2, "")
    lines = out.getvalue().splitlines()
    assert [m["done"] for m in _progress_lines(out.getvalue(), "scoring hand recipes")] == ["1", "2", "3"]
    assert lines[3].startswith("scoring hand recipes: 4/4 done in ")
    assert lines[-1].startswith("exporting the front: 2/2 models done in ")


def test_the_demos_pool_wrapper_counts_what_it_passes_on():
    from evomerge.demo.pipeline import _CountedPool

    seen = []
    pool = SimpleNamespace(evaluate=lambda cands: (SimpleNamespace(key=c) for c in reversed(cands)))
    counted = _CountedPool(pool, lambda *a: seen.append(a))
    assert [r.key for r in counted.evaluate(iter(["a", "b"]))] == ["b", "a"]
    assert seen == [(0, 2, ""), (1, 2, "b"), (2, 2, "a")]


# ---------------------------------------------------------------------------------------------- real stages


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from evomerge.testing.workspace import make_search_workspace

    return make_search_workspace(tmp_path_factory.mktemp("progress"), algorithm={"pop_size": 4, "generations": 2})


@pytest.mark.slow
def test_calibrate_shows_models_scored_with_an_eta_on_stderr_only(workspace):
    """`evomerge calibrate` off a terminal: a line per tenth of the models, each with done/total and an ETA."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "evomerge", "calibrate", "--force", "calibrate.yaml"],
                          cwd=workspace, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    shown = _progress_lines(done.stderr, "scoring reference models")
    total = 2 + 1 + 4  # sources, base, reference merges
    assert [int(m["done"]) for m in shown] == list(range(1, total)), done.stderr
    assert all(int(m["total"]) == total for m in shown)
    assert re.search(rf"^scoring reference models: {total}/{total} models done in \d+s$", done.stderr, re.MULTILINE)
    assert "ETA" not in done.stdout and "scoring reference models" not in done.stdout
    assert done.stdout.startswith("task t_add: 7 models x 30 items")


@pytest.mark.slow
def test_export_verify_shows_models_done_with_an_eta(workspace, capsys):
    """`evomerge export --verify`: its per-model lines as they were, and between them done/total with an ETA."""
    from evomerge.cli import main
    from evomerge.search.session import create_run, drive, status
    from evomerge.worker.local_pool import LocalPool

    run, prepared = create_run(workspace / "run.yaml", workspace / "runs" / "export")
    drive(run, prepared, LocalPool(prepared))
    with run.open_ledger() as ledger:
        keys = [r.key for r in ledger.all("ok")][:3]
    capsys.readouterr()
    assert main(["export", str(run.path), "--out", str(workspace / "exported"), "--ids", ",".join(keys),
                 "--verify"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line for line in lines if line.startswith("exporting")] == [
        f"exporting {k} ({i}/3) and verifying it on the full tasks" for i, k in enumerate(keys, 1)]
    shown = _progress_lines(captured.err, "export")
    assert [(m["done"], m["total"]) for m in shown] == [("1", "3"), ("2", "3")], captured.err
    assert [line.split(" (")[0] for line in lines] == [  # each count line before the next model's
        f"exporting {keys[0]}", "export: 1/3 models", f"exporting {keys[1]}", "export: 2/3 models",
        f"exporting {keys[2]}", lines[-1]]
    assert re.fullmatch(r"export: 3/3 models done in \d+s", lines[-1])
    assert "ETA" not in captured.out and status(run, prepared)["front"]


def test_demo_kit_training_counts_every_step_of_the_three_models(tmp_path):
    from evomerge.demo.kit import KitConfig, build_demo_kit

    tiny = KitConfig(hidden=32, layers=2, heads=2, intermediate=64, block=32, batch=4, base_steps=6,
                     specialist_steps=4, warmup=2, log_every=3)
    calls = []
    build_demo_kit(tmp_path, config=tiny, threads=1, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, 15)) and {c[1] for c in calls} == {6 + 2 * 4}
    assert [c[2] for c in calls] == ["base"] * 6 + ["adder"] * 4 + ["translator"] * 4
    calls.clear()
    build_demo_kit(tmp_path, config=tiny, progress=lambda *a: calls.append(a))  # cached: nothing counted
    assert calls == []
