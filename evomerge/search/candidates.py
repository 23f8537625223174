"""What travels between the driver and the workers: plain, small, picklable data (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class Candidate:
    key: str  # ledger key: generation, index and the genome's exact bits
    generation: int
    index: int
    genome: list[float]
    recipe: dict  # decoded by the driver: a mergekit-style PS document or a `merge_method: dataflow` one
    seed: int  # derived from the run seed and the key: DARE masks and the like


@dataclass(frozen=True)
class EvalResult:
    """costs: params (parameter count of the merged model, a repeated layer counted each time it runs, as in
    the exported checkpoint) and path_length (data-flow layers; 0 for parameter space)."""

    key: str
    status: str  # "ok" | "failed"
    responses: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {anchor item id: 0/1}
    estimates: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {estimator: accuracy}
    costs: dict[str, float] = field(default_factory=dict)  # params, path_length
    error: str | None = None
    worker: str = ""
    node: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds: materialize, check, score (of it: forward), estimate, total

    @property
    def ok(self) -> bool:
        return self.status == OK
