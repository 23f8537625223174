"""The pymoo algorithms a run config can name, each a factory (pop_size, n_obj, sampling) -> algorithm.

Registered by name: the config validates `algorithm.name` against this registry, the driver builds from it.
pymoo is imported only when an algorithm is built."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from evomerge.registry import Registry

ALGORITHMS: Registry[Callable[..., Any]] = Registry("algorithm")


def _reference_directions(n_obj: int, pop_size: int):
    from pymoo.util.ref_dirs import get_reference_directions

    partitions = 1
    while math.comb(n_obj + partitions, n_obj - 1) <= pop_size:  # as many directions as fit the population
        partitions += 1
    return get_reference_directions("das-dennis", n_obj, n_partitions=partitions)


@ALGORITHMS.register("nsga2")
def _nsga2(pop_size: int, n_obj: int, sampling: np.ndarray):
    from pymoo.algorithms.moo.nsga2 import NSGA2

    return NSGA2(pop_size=pop_size, sampling=sampling, eliminate_duplicates=True)


@ALGORITHMS.register("nsga3")
def _nsga3(pop_size: int, n_obj: int, sampling: np.ndarray):
    from pymoo.algorithms.moo.nsga3 import NSGA3

    return NSGA3(ref_dirs=_reference_directions(n_obj, pop_size), pop_size=pop_size, sampling=sampling,
                 eliminate_duplicates=True)


@ALGORITHMS.register("moead")
def _moead(pop_size: int, n_obj: int, sampling: np.ndarray):
    from pymoo.algorithms.moo.moead import ParallelMOEAD

    ref_dirs = _reference_directions(n_obj, pop_size)
    # the batch variant: one offspring per subproblem per ask, a whole generation to evaluate in parallel
    return ParallelMOEAD(ref_dirs=ref_dirs, n_neighbors=min(15, len(ref_dirs)), sampling=sampling,
                         n_offsprings=len(ref_dirs))


@ALGORITHMS.register("ga")
def _ga(pop_size: int, n_obj: int, sampling: np.ndarray):
    from pymoo.algorithms.soo.nonconvex.ga import GA

    return GA(pop_size=pop_size, sampling=sampling, eliminate_duplicates=True)
