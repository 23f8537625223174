"""The driver's algorithms by name, on a real pymoo ask/tell loop over a closed-form problem (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.config import RunConfig
from evomerge.search.algorithms import ALGORITHMS
from evomerge.search.driver import initial_population, new_algorithm


def _config(name: str, objectives: int) -> RunConfig:
    return RunConfig.model_validate({
        "name": "t", "sources": {"models": {"a": "x"}}, "search_space": "ps_task_arithmetic",
        "fitness": {"calibration": "c.json"}, "objectives": [{"task": f"t{i}"} for i in range(objectives)],
        "algorithm": {"name": name, "pop_size": 8, "generations": 3}, "seed": 5})


def _run(name: str, objectives: int) -> list[np.ndarray]:
    algorithm = new_algorithm(_config(name, objectives), dim=4, seeds=np.full((1, 4), 0.5))
    asked = []
    while algorithm.has_next():
        pop = algorithm.ask()
        X = pop.get("X")
        asked.append(X.copy())
        # a two-objective trade-off (ZDT1-like) on the first coordinate; one objective: their sum
        f1, f2 = X[:, 0], 1 - np.sqrt(X[:, 0]) + X[:, 1:].sum(axis=1)
        pop.set("F", np.column_stack([f1, f2])[:, :objectives] if objectives == 2 else (f1 + f2)[:, None])
        algorithm.tell(infills=pop)
    return asked


@pytest.mark.parametrize("name, objectives", [("nsga2", 2), ("nsga3", 2), ("moead", 2), ("ga", 1)])
def test_every_algorithm_runs_ask_tell_and_is_seeded(name, objectives):
    first, again = _run(name, objectives), _run(name, objectives)
    assert len(first) >= 3 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(((x >= 0) & (x <= 1)).all() for x in first)
    assert np.allclose(first[0][0], 0.5)  # the space's seed genome is in the first population


def test_initial_population_puts_seeds_first_then_seeded_random():
    seeds = np.array([[0.5, 0.5], [1.0, 0.0]])
    pop = initial_population(seeds, 5, 2, seed=3)
    assert pop.shape == (5, 2) and np.array_equal(pop[:2], seeds)
    assert np.array_equal(pop, initial_population(seeds, 5, 2, seed=3))
    assert not np.array_equal(pop[2:], initial_population(seeds, 5, 2, seed=4)[2:])


def test_algorithm_names_are_a_registry_with_suggestions():
    with pytest.raises(Exception, match="nsga2"):
        ALGORITHMS["nsga"]
