"""Estimators of full-task accuracy from a model's answers on a few items of the task.

Pure functions of (calibration, answers). Every estimator is registered by name in ESTIMATORS:

- `anchor_mean`: the anchor-weighted mean of the answers (plain mean when the items seen are not all anchors).
- `pirt`: p-IRT (tinyBenchmarks): fit the model's ability theta on the items seen, then average the answers
  seen with the IRT probabilities of the items not seen: (sum_seen y_i + sum_unseen P_i(theta)) / N.
- `gpirt`: gp-IRT: lambda * anchor_mean + (1 - lambda) * pirt, lambda from the calibration (bias/variance rule).
- `mpirt`: mp-IRT (MERGE^3, Mencattini et al. 2025): as p-IRT, but theta = sum_j w_j theta_j, a combination of
  the abilities of the source models, with w on the simplex (w_j >= 0, sum w_j = 1) fitted to the answers.
- `gmpirt`: gmp-IRT: lambda_mp * anchor_mean + (1 - lambda_mp) * mpirt, lambda_mp fitted like gp-IRT's
  (MERGE^3's code fixes it at 0.5).

The two mp estimators need source abilities in the calibration; without them they are left out of the result.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from evomerge.errors import FitnessError
from evomerge.fitness.irt import fit_ability
from evomerge.registry import Registry

if TYPE_CHECKING:
    from evomerge.fitness.calibration import Calibration, TaskCalibration
    from evomerge.fitness.responses import Responses


class Answers:
    """One model's answers on some items of one calibrated task; the abilities are fitted once, on demand."""

    def __init__(self, task: TaskCalibration, index: np.ndarray, correct: np.ndarray) -> None:
        self.task = task
        self.index = np.asarray(index, dtype=np.int64)  # (n,) positions in the task's item list
        self.y = np.asarray(correct, dtype=np.float64)  # (n,) 0/1

    @cached_property
    def anchor_mean(self) -> float:
        weight = self.task.anchor_weight_of(self.index)  # (n,), NaN for an item that is not an anchor
        if np.isnan(weight).any():
            return float(self.y.mean())
        return float(weight @ self.y / weight.sum())

    @cached_property
    def theta(self) -> np.ndarray:
        """(D,) MAP ability from the items seen."""
        items = self.task.items.take(self.index)
        return fit_ability(items, self.y[None], mean=self.task.ability_mean, cov=self.task.ability_cov)[0]

    @cached_property
    def mixture(self) -> np.ndarray:
        """(K,) weights of the source abilities that best explain the answers (simplex-constrained MLE)."""
        return fit_mixture(self.task, self.index, self.y)

    def irt_estimate(self, theta: np.ndarray) -> float:
        """Answers seen + IRT probabilities of the items not seen, averaged over all N items of the task."""
        p = self.task.items.prob(theta)[0]  # (N,)
        p[self.index] = self.y
        return float(p.mean())


def fit_mixture(task: TaskCalibration, index: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights w on the simplex maximising the likelihood of y under theta = w @ source_thetas.

    The negative log-likelihood is convex in theta, theta is linear in w and the simplex is convex: SLSQP from the
    uniform mixture finds the optimum. Few answers can leave it flat; the uniform start then stays near uniform.
    """
    sources = task.source_theta  # (K, D)
    k = len(sources)
    if k == 1:
        return np.ones(1)
    a, b = task.items.a[index], task.items.b[index]
    base = sources @ a.T  # (K, n): logits of each source before the difficulty

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = w @ base - b
        value = np.sum(np.logaddexp(0.0, z) - y * z)
        return float(value), base @ (expit(z) - y)

    res = minimize(nll, np.full(k, 1 / k), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones_like(w)}],
                   options={"maxiter": 200, "ftol": 1e-10})
    w = np.clip(res.x, 0, None)
    return w / w.sum()


Estimator = Callable[[Answers], float]
ESTIMATORS: Registry[Estimator] = Registry("estimator")


@ESTIMATORS.register("anchor_mean")
def _anchor_mean(ans: Answers) -> float:
    return ans.anchor_mean


@ESTIMATORS.register("pirt")
def _pirt(ans: Answers) -> float:
    return ans.irt_estimate(ans.theta)


@ESTIMATORS.register("gpirt")
def _gpirt(ans: Answers) -> float:
    lam = ans.task.lambdas["gpirt"]
    return lam * ans.anchor_mean + (1 - lam) * _pirt(ans)


@ESTIMATORS.register("mpirt")
def _mpirt(ans: Answers) -> float:
    return ans.irt_estimate(ans.mixture @ ans.task.source_theta)


@ESTIMATORS.register("gmpirt")
def _gmpirt(ans: Answers) -> float:
    lam = ans.task.lambdas["gmpirt"]
    return lam * ans.anchor_mean + (1 - lam) * _mpirt(ans)


NEEDS_SOURCES = frozenset({"mpirt", "gmpirt"})


def estimate(calibration: Calibration, task: str, item_ids: list[str] | list[int], correct: np.ndarray,
             estimators: list[str] | None = None) -> dict[str, float]:
    """Estimated full-task accuracy of one model, by estimator name, from its answers on `item_ids`.

    `correct` holds 0/1 (or bool) per item id; NaN entries count as not seen. Item ids must belong to the task.
    """
    return estimate_details(calibration, task, item_ids, correct, estimators)[0]


def estimate_details(calibration: Calibration, task: str, item_ids: list[str] | list[int], correct: np.ndarray,
                     estimators: list[str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """estimate(), plus the fitted mp-IRT source weights (by source name; empty without sources or mp-IRT)."""
    cal = calibration.task(task)
    y = np.asarray(correct, dtype=np.float64).ravel()
    index = cal.positions([str(i) for i in item_ids])
    if len(index) != len(y):
        raise ValueError(f"{len(item_ids)} item ids but {len(y)} answers")
    seen = ~np.isnan(y)
    if not seen.any():
        raise ValueError(f"task {task!r}: no answers to estimate from (every entry is NaN)")
    bad = ~((y[seen] == 0) | (y[seen] == 1))
    if bad.any():
        raise ValueError(f"task {task!r}: answers must be 0 or 1, got {y[seen][bad][0]!r}")
    ans = Answers(cal, index[seen], y[seen])
    names = estimators if estimators is not None else list(ESTIMATORS)
    usable = [n for n in names if cal.source_names or n not in NEEDS_SOURCES]
    out = {name: ESTIMATORS[name](ans) for name in usable}
    weights: dict[str, float] = {}
    if "mixture" in ans.__dict__:  # computed by an mp estimator
        weights = dict(zip(cal.source_names, map(float, ans.mixture)))
    return out, weights


def estimate_responses(calibration: Calibration, task: str, responses: Responses) -> list[dict[str, Any]]:
    """estimate_details() for every row of a responses matrix whose columns are items of `task`.

    Returns one record per model: task, model, items_seen, estimates (name -> accuracy), mpirt_weights.
    """
    cal = calibration.task(task)
    cal.positions(responses.items, source=f"{responses.source} (task {task!r})")  # unknown ids name the file
    records = []
    for model, row in zip(responses.models, responses.values):
        seen = ~np.isnan(row)
        if not seen.any():
            raise FitnessError(f"{responses.source}: row {model!r} has no answers: fill in its 0/1 values "
                               "or drop the row")
        values, weights = estimate_details(calibration, task, responses.items, row)
        records.append({"task": task, "model": model, "items_seen": int(seen.sum()), "estimates": values,
                        "mpirt_weights": weights})
    return records
