"""Progress of long work on stderr (rich): calibration, the search's generations, the demo's stages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.demo.pipeline import DemoUI


@contextmanager
def calibration_bar(console: Console, label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A bar of the models scored so far; yields calibrate()'s `progress(done, total, name)`."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("", total=None)
        yield lambda done, total, name: progress.update(bar, completed=done, total=total, description=name)


@contextmanager
def search_bars(console: Console, generations: int, pop_size: int) -> Iterator[tuple[Callable, Callable]]:
    """Bars of generations and evaluations, a log line per generation; yields drive()'s
    (on_generation, on_result)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        gens = progress.add_task("generations", total=generations)
        evals = progress.add_task("evaluations", total=generations * pop_size)

        def on_generation(report) -> None:
            progress.update(gens, completed=report.generation + 1)
            progress.advance(evals, report.reused)  # from the ledger: no on_result for them
            console.log(f"generation {report.generation}: {report.evaluated} evaluated, {report.reused} from the "
                        f"ledger, {report.failed} failed")

        yield on_generation, lambda record: progress.advance(evals)


class RichDemoUI(DemoUI):
    """The demo's stages shown on a rich console: log lines, bars, and spinners for unmeasured work."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.log = console.log  # itself, not a wrapper: rich shows where each line was logged from

    def calibrating(self):
        return calibration_bar(self.console, "calibrating: scoring reference models")

    def searching(self, generations: int, pop_size: int):
        return search_bars(self.console, generations, pop_size)

    def waiting(self, message: str):
        return self.console.status(message)
