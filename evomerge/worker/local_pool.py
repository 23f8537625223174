"""The pool without Ray: one Evaluator in this process, candidates evaluated one after another."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from evomerge.search.candidates import Candidate, EvalResult
from evomerge.worker.evaluator import Evaluator


class LocalPool:
    """Evaluates candidates one after another in this process (one Evaluator, sources loaded once)."""

    def __init__(self, prepared, device: str = "cpu") -> None:
        self.evaluator = Evaluator(prepared.config, prepared.config_dir, device=device)

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterable[EvalResult]:
        for c in candidates:
            yield self.evaluator.evaluate(c)

    def close(self) -> None:
        """Nothing to stop (the interface every pool has: Ray's stops its workers)."""
