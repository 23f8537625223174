"""The search loop: ask pymoo for genomes, evaluate what the ledger lacks, tell, checkpoint (no torch here).

Every generation: the algorithm proposes genomes (ask), each gets a deterministic key (generation, index,
exact genome bits) and seed; genomes decode to recipes here (a genome that cannot decode is a failed
evaluation, not a crash); candidates the ledger has not finished go to the pool; results are ledgered as
they arrive; objectives go back to the algorithm (tell); the algorithm is checkpointed atomically.

Resume after any crash: the checkpoint holds the algorithm (and its random state) after the last tell, so
ask() proposes the same generation again; finished candidates come from the ledger, the rest are evaluated.
The final front therefore equals an uninterrupted run's with the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from evomerge.config import RunConfig
from evomerge.errors import GenomeError
from evomerge.search.algorithms import ALGORITHMS
from evomerge.search.candidates import Candidate, EvalResult
from evomerge.search.ledger import Ledger, Record, candidate_key
from evomerge.seeds import derive_seed

FAILED_COST = 1e6  # a failed candidate's cost objectives: worse than any real model, finite for pymoo


class Pool(Protocol):
    def evaluate(self, candidates: Sequence[Candidate]) -> Iterable[EvalResult]:
        """Results in any order, one per candidate."""

    def close(self) -> None:
        """Stop what the pool started (workers); callers close every pool they made."""


@dataclass(frozen=True)
class Objective:
    name: str  # a task name, or cost:params / cost:path_length
    task: str | None
    cost: str | None

    def value(self, result_estimates: dict, costs: dict, estimator: str) -> float:
        """The objective as pymoo minimizes it: -accuracy for tasks, the cost itself for costs."""
        if self.task is not None:
            return -float(result_estimates[self.task][estimator])
        return float(costs[self.cost])

    def shown(self, minimized: float) -> float:
        """The objective as users read it: a task's estimated accuracy (the ledger keeps it negated), a cost."""
        return -minimized if self.task is not None else minimized

    def worst(self) -> float:
        return 0.0 if self.task is not None else FAILED_COST


def objectives_of(config: RunConfig) -> list[Objective]:
    return [Objective(o.name, o.task, o.cost) for o in config.objectives]


def initial_population(seeds: np.ndarray, pop_size: int, dim: int, seed: int) -> np.ndarray:
    """The space's seed genomes (uniform recipes, identity paths) first, then seeded uniform random ones."""
    rng = np.random.default_rng(derive_seed(seed, "initial-population"))
    seeds = np.asarray(seeds, dtype=np.float64).reshape(-1, dim)[:pop_size]
    return np.vstack([seeds, rng.random((pop_size - len(seeds), dim))])


def new_algorithm(config: RunConfig, dim: int, seeds: np.ndarray):
    """A pymoo algorithm, set up for ask/tell on [0, 1]^dim with the config's objectives and constraints."""
    from pymoo.core.problem import Problem

    n_obj = len(config.objectives)
    n_constr = 1 if config.max_path_length is not None else 0
    sampling = initial_population(seeds, config.algorithm.pop_size, dim, config.seed)
    algorithm = ALGORITHMS[config.algorithm.name](config.algorithm.pop_size, n_obj, sampling)
    problem = Problem(n_var=dim, n_obj=n_obj, n_ieq_constr=n_constr, xl=0.0, xu=1.0)
    algorithm.setup(problem, termination=("n_gen", config.algorithm.generations), seed=config.seed, verbose=False)
    return algorithm


# -- one generation ------------------------------------------------------------------------------------------
@dataclass
class GenerationReport:
    generation: int
    evaluated: int  # sent to the pool in this call
    reused: int  # found finished in the ledger
    failed: int


def candidates_of(X: np.ndarray, generation: int, run_seed: int, decode: Callable[[np.ndarray], dict],
                  ) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates of one generation, and the keys of genomes that failed to decode (key -> error)."""
    cands, failed = [], {}
    for i, x in enumerate(X):
        genome = [float(v) for v in x]
        key = candidate_key(generation, i, genome)
        try:
            recipe = decode(x)
        except GenomeError as e:
            failed[key] = f"GenomeError: {e}"
            recipe = {}
        cands.append(Candidate(key, generation, i, genome, recipe, derive_seed(run_seed, key)))
    return cands, failed


def run_generation(algorithm, generation: int, ledger: Ledger, pool: Pool, config: RunConfig,
                   decode: Callable[[np.ndarray], dict], on_result: Callable[[Record], None] = lambda r: None,
                   ) -> GenerationReport:
    pop = algorithm.ask()
    cands, undecodable = candidates_of(pop.get("X"), generation, config.seed, decode)
    records: dict[str, Record] = {}
    for c in cands:
        done = ledger.get(c.key)
        if done is not None and done.is_finished:
            records[c.key] = done
        elif c.key in undecodable:
            records[c.key] = ledger.record(_failed_record(c, undecodable[c.key]))
            on_result(records[c.key])
    todo = [c for c in cands if c.key not in records]
    reused = len(cands) - len(todo) - len(undecodable)
    by_key = {c.key: c for c in todo}
    for result in pool.evaluate(todo):
        rec = ledger.record(_record(by_key[result.key], result, config))
        records[rec.key] = rec
        on_result(rec)

    objectives = objectives_of(config)
    F = np.array([[records[c.key].objectives.get(o.name, o.worst()) for o in objectives] for c in cands])
    pop.set("F", F)
    if config.max_path_length is not None:
        lengths = [records[c.key].extra.get("path_length", 0) if records[c.key].status == "ok" else math.inf
                   for c in cands]
        pop.set("G", np.array([[min(n, FAILED_COST) - config.max_path_length] for n in lengths], dtype=float))
    algorithm.tell(infills=pop)
    failed = sum(records[c.key].status == "failed" for c in cands)
    return GenerationReport(generation, len(todo), reused, failed)


def _record(c: Candidate, r: EvalResult, config: RunConfig) -> Record:
    objectives = {}
    if r.status == "ok":
        estimator = config.fitness.estimator
        values = {o.name: o.value(r.estimates, r.costs, estimator) for o in objectives_of(config)}
        if all(math.isfinite(v) for v in values.values()):
            objectives = values
        else:
            r = EvalResult(**{**r.__dict__, "status": "failed", "error": f"non-finite objectives {values}"})
    return Record(
        key=c.key, generation=c.generation, index=c.index, genome=c.genome, status=r.status, seed=c.seed,
        recipe=c.recipe, responses=r.responses, estimates=r.estimates, objectives=objectives, error=r.error,
        worker=r.worker, node=r.node, timings=r.timings, extra={"path_length": r.costs.get("path_length", 0),
                                                                 "params": r.costs.get("params")},
    )


def _failed_record(c: Candidate, error: str) -> Record:
    return Record(key=c.key, generation=c.generation, index=c.index, genome=c.genome, status="failed", seed=c.seed,
                  recipe=c.recipe, responses={}, estimates={}, objectives={}, error=error, worker="driver",
                  node="driver", timings={}, extra={})


def generations(algorithm, start: int) -> Iterator[int]:
    g = start
    while algorithm.has_next():
        yield g
        g += 1
