"""Progress of long work on stderr: calibration, the search, export, the demo's stages.

Every countable stage is a `Meter`: done/total, time elapsed and an ETA. On a terminal the meters of a
`Board` are rich bars; elsewhere (CI, pipes, files, tests) rich draws nothing live, so a meter writes plain
lines instead, few of them: one each time another tenth of the work is done or 30 s have passed since its
last line, and one when the stage ends, e.g.

    scoring reference models: 3/12 models (25%), 41s elapsed, ETA 1m52s
    scoring reference models: 12/12 models done in 2m31s

The ETA is `Estimate`'s, not rich's (rich's speed is a moving average that the first item, which carries
the start-up, and items found in a ledger, which take no time, both mislead).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

from evomerge.demo.pipeline import DemoUI

Clock = Callable[[], float]  # seconds, monotonic
LINE_PARTS = 10  # plain lines: one per tenth of the work ...
LINE_SECONDS = 30.0  # ... or per 30 s, whichever comes first


def duration(seconds: float) -> str:
    """'8s', '3m05s', '1h02m': elapsed times and ETAs, short enough for a bar."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Estimate:
    """Time left of countable work, from the pace of the items finished so far.

    The pace is measured from the first finished item on, so the start-up that item carries (building the
    tasks, loading models, starting workers) is left out once a second item is done; with one item done it
    is that item's time. Items finished without work (`skip`: found in the ledger) count as done and are
    not part of the pace. `clock` is injectable: tests pass a fake one."""

    def __init__(self, total: int | None = None, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.total = total
        self.done = 0
        self.skipped = 0
        self._first: tuple[float, int] | None = None  # (time, items measured) at the first finished item
        self._last: tuple[float, int] | None = None  # ... at the latest

    def update(self, done: int, total: int | None = None) -> None:
        """`done` items finished in all (skipped ones included); `total` when it is known or changes."""
        if total is not None:
            self.total = total
        if done > self.done:
            self.done = done
            measured, now = done - self.skipped, self.clock()
            if measured > 0:
                self._first = self._first or (now, measured)
                self._last = (now, measured)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def skip(self, n: int) -> None:
        """`n` items finished without work."""
        self.done += n
        self.skipped += n

    def elapsed(self) -> float:
        return self.clock() - self.start

    def seconds_per_item(self) -> float | None:
        if self._first is None:
            return None
        (t1, m1), (t, m) = self._first, self._last
        return (t - t1) / (m - m1) if m > m1 else (t1 - self.start) / m1

    def remaining(self) -> float | None:
        """Seconds left, or None before anything is measured or while the total is unknown."""
        pace = self.seconds_per_item()
        if pace is None or self.total is None:
            return None
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        since = self.clock() - self._last[0]  # the item under way is partly done, but at least started
        return max(left * pace - since, (left - 1) * pace)

    def eta(self) -> str:
        left = self.remaining()
        return "ETA ?" if left is None else f"ETA {duration(left)}"


class Meter:
    """One countable stage on a `Board`. Call it as `meter(done, total, note)`: the `progress` callback of
    calibrate(), export_run(), build_demo_kit() and the demo's stages."""

    def __init__(self, board: Board, label: str, unit: str, total: int | None, lines: bool) -> None:
        self.board, self.label, self.unit, self.lines = board, label, unit, lines
        self.estimate = Estimate(total, clock=board.clock)
        self._line_at = (self.estimate.start, 0)  # (time, tenths done) of the last plain line
        self._task = None
        if board.progress is not None:
            self._task = board.progress.add_task("", total=total, label=label, unit=unit, estimate=self.estimate)

    def __call__(self, done: int, total: int | None = None, note: str = "") -> None:
        self.estimate.update(done, total)
        self._show(note)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.estimate.advance(n)
        self._show(note)

    def skip(self, n: int) -> None:
        """`n` items finished without work (from the ledger): done, but not part of the pace."""
        self.estimate.skip(n)
        self._show(None)

    def show_eta_of(self, other: Meter) -> None:
        """Show `other`'s time and ETA on this one's bar (a coarse count paced by a finer one)."""
        if self._task is not None:
            self.board.progress.update(self._task, estimate=other.estimate)

    def status(self) -> str:
        """'3/12 models (25%), 41s elapsed, ETA 1m52s'."""
        e = self.estimate
        unit = f" {self.unit}" if self.unit else ""
        if e.total is None:
            return f"{e.done}{unit}, {duration(e.elapsed())} elapsed"
        pct = f" ({100 * e.done // e.total}%)" if e.total else ""
        return f"{e.done}/{e.total}{unit}{pct}, {duration(e.elapsed())} elapsed, {e.eta()}"

    def final(self) -> str | None:
        """The line that closes the stage, if anything was counted."""
        e = self.estimate
        if e.done == 0:
            return None
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.label}: {e.done}{'' if e.total is None else f'/{e.total}'}{unit} done in {duration(e.elapsed())}"

    def _show(self, note: str | None) -> None:
        e = self.estimate
        if self._task is not None:
            fields = {} if note is None else {"description": note}
            self.board.progress.update(self._task, completed=e.done, total=e.total, **fields)
        elif self.lines and e.seconds_per_item() is not None and (e.total is None or e.done < e.total):
            # something measured (a line without an ETA says little), not the end (the last line is final()'s)
            now, part = e.clock(), e.done * LINE_PARTS // e.total if e.total else 0
            last_time, last_part = self._line_at
            if part > last_part or now - last_time >= LINE_SECONDS:
                self._line_at = (now, part)
                self.board.line(f"{self.label}: {self.status()}")


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = f" {task.fields['unit']}" if task.fields.get("unit") else ""
        total = "" if task.total is None else f"/{task.total:.0f}"
        return Text(f"{task.completed:.0f}{total}{unit}", style="progress.download")


class _TimeColumn(ProgressColumn):
    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        e: Estimate = task.fields["estimate"]
        return Text(f"{duration(e.elapsed())}, {e.eta()}", style="progress.remaining")


def _one_line(**kw) -> Column:
    return Column(no_wrap=True, overflow="ellipsis", **kw)


class Board:
    """The meters of one display on `console`: rich bars on a terminal, plain lines elsewhere (`live`
    decides; None: whether the console is a real terminal). Each meter's closing line is written when the
    board closes without an error."""

    def __init__(self, console: Console, *, live: bool | None = None, clock: Clock = time.monotonic) -> None:
        self.console, self.clock = console, clock
        live = console.is_terminal and not console.is_dumb_terminal if live is None else live
        columns = (TextColumn("{task.fields[label]}", table_column=_one_line(max_width=32)), SpinnerColumn(),
                   BarColumn(bar_width=30), _CountColumn(table_column=_one_line(min_width=9)),
                   _TimeColumn(table_column=_one_line(min_width=14)),
                   TextColumn("{task.description}", table_column=_one_line(max_width=24)))  # note: the item under way
        self.progress = Progress(*columns, console=console, transient=True) if live else None
        self.meters: list[Meter] = []

    def meter(self, label: str, unit: str = "", total: int | None = None, *, lines: bool = True) -> Meter:
        """A new meter; `lines=False`: no plain lines of its own (its stage logs lines that say as much)."""
        self.meters.append(Meter(self, label, unit, total, lines))
        return self.meters[-1]

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> Board:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.progress is not None:
            self.progress.stop()
        if exc_type is None:
            for m in self.meters:
                if (text := m.final()) is not None:
                    self.line(text)


@contextmanager
def counting(console: Console, label: str, unit: str = "", *, clock: Clock = time.monotonic,
             ) -> Iterator[Meter]:
    """One meter on its own board: yields the `progress(done, total, note)` of a countable stage."""
    with Board(console, clock=clock) as board:
        yield board.meter(label, unit)


def calibration_bar(console: Console, label: str = "scoring reference models"):
    """The reference models scored so far; yields calibrate()'s `progress(done, total, name)`."""
    return counting(console, label, "models")


@contextmanager
def search_bars(console: Console, generations: int, pop_size: int, *, clock: Clock = time.monotonic,
                ) -> Iterator[tuple[Callable, Callable]]:
    """Bars of generations and evaluations, a log line per generation (with the ETA); yields drive()'s
    (on_generation, on_result). The ETA is the evaluations' pace times the evaluations left; those the ledger
    had (a resumed run replays them) take no time and are left out of the pace."""
    with Board(console, clock=clock) as board:
        gens = board.meter("generations", "", generations, lines=False)
        evals = board.meter("evaluations", "", generations * pop_size)
        gens.show_eta_of(evals)

        def on_generation(report) -> None:
            # the ledger's (no on_result for them) and any a short generation lacked: done, in no time
            evals.skip(max(0, (report.generation + 1) * pop_size - evals.estimate.done))
            gens(report.generation + 1)
            console.log(f"generation {report.generation}: {report.evaluated} evaluated, {report.reused} from the "
                        f"ledger, {report.failed} failed ({report.generation + 1}/{generations} generations, "
                        f"{evals.estimate.eta()})")

        yield on_generation, lambda record: evals.advance()


class RichDemoUI(DemoUI):
    """The demo's stages shown on a rich console: log lines, and a meter per stage (plain lines off a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.log = console.log  # itself, not a wrapper: rich shows where each line was logged from

    def counting(self, label: str, unit: str):
        return counting(self.console, label, unit)

    def searching(self, generations: int, pop_size: int):
        return search_bars(self.console, generations, pop_size)

    def waiting(self, message: str):
        return counting(self.console, message)  # a spinner until the stage counts its work
