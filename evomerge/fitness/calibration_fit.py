"""Fit a calibration: per task, the IRT item parameters, the anchors and weights, the estimators' settings and the
abilities of the source models, fitted from a responses matrix of calibration models (the file: calibration.py).

fit_calibration() runs the whole recipe for each task (tinyBenchmarks, Polo et al. 2024, adapted to calibration
sets of 10-40 models):

1. Hold out ~20% of the non-source models (seeded). For each candidate prior sd of the slopes (at the smallest
   D), then each candidate dimension D, fit the 2PL model on the rest and measure, on the held-out models, the
   error of the p-IRT estimate of the accuracy on the items they did not see, with abilities fitted on (a) random
   subsets of n_anchors items and (b) half of the items. The candidate with the smallest error (a) wins: the
   error with as many items as the anchors we will score on.
2. Fit the 2PL model of dimension D on all models; its abilities of the named sources are saved for mp-IRT.
3. Choose the anchors (random / correctness / irt) and their weights from the full fit.
4. gp-IRT's lambda by the bias/variance rule of tinyBenchmarks: lambda = b^2 / (b^2 + v), b = error (b) of
   p-IRT on the held-out models (the IRT model's bias once theta is pinned down), scaled to the share of the task
   p-IRT predicts ((N - n) / N: the n anchors' answers enter as they are); v = expected squared error of the
   weighted anchor mean under the fitted IRT model, averaged over the calibration models' abilities.
   gmp-IRT's lambda the same way with the held-out error of mp-IRT; MERGE^3 fixes it at 0.5.

With fewer than MIN_INFORMATIVE_MODELS models at most one is held out, and k-means anchors cluster the items those
few models all answered alike: step 1 takes D = the smallest candidate and the middle slope sd without choosing,
step 3 takes stratified random anchors, and the task's diagnostics carry a warning (bench/IRT_NOTES.md).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from evomerge.errors import FitnessError
from evomerge.fitness.anchors import ANCHOR_METHODS, select_anchors
from evomerge.fitness.calibration import Calibration, TaskCalibration
from evomerge.fitness.estimators import fit_mixture
from evomerge.fitness.irt import ItemParams, Prior, fit_ability
from evomerge.fitness.irt_fit import fit_2pl
from evomerge.fitness.responses import Responses
from evomerge.registry import UnknownNameError
from evomerge.seeds import derive_seed

log = logging.getLogger(__name__)
# warnings reach the handlers an application configures; without any, Python's last-resort handler would print
# them a second time beside the CLI's own `evomerge: warning:` lines
log.addHandler(logging.NullHandler())

DEFAULT_DIMS = (1, 2, 3, 5)
# spread of the items' slopes around their common slope (the prior's sd). With 10-40 models an item's own
# slopes are mostly noise, and noisy slopes attenuate every new model's fitted ability (errors in variables):
# on 40 simulated models x 5000 items, sd 1 left held-out abilities at 40% of their spread, sd 0.03 at 99%.
DEFAULT_A_SD = (0.03, 0.1, 0.3)
MIN_MODELS = 4
# below this many calibration models the IRT fit is not informative (bench/bench_irt_models.py, IRT_NOTES.md):
# p-IRT's error was well above its plateau, and only one model can be held out to choose D, slope sd and lambda
MIN_INFORMATIVE_MODELS = 8
HELDOUT_SHARE = 0.2  # tinyBenchmarks holds out every 5th training model to choose D
HELDOUT_DRAWS = 5  # random anchor-sized subsets per held-out model when scoring a candidate D
SELECTION_TOL = 1e-6  # relative loss change that ends a candidate's fit (the final fit: 1e-7)
DEFAULT_LAMBDA = 0.5  # MERGE^3's fixed mixing weight, used when no held-out model can measure the bias


def fit_calibration(responses_by_task: dict[str, Responses], *, n_anchors: int = 100, seed: int = 0,
                    anchor_method: str = "irt", sources: list[str] | None = None,
                    dims: int | list[int] | None = None, a_sd: float | list[float] | None = None,
                    prior: Prior | None = None) -> Calibration:
    """Fit one calibration per task (its own IRT model, anchors and lambdas) and bundle them.

    `dims` fixes the IRT dimension (int) or gives the candidates to choose from on held-out models (default
    1, 2, 3, 5, capped by the number of models); `a_sd` likewise the prior sd of the slopes (default 0.03, 0.1,
    0.3; `prior.a_sd` is not used). `sources` names models (rows) whose abilities mp-IRT combines.
    """
    prior = prior or Prior()
    if anchor_method not in ANCHOR_METHODS:
        try:
            ANCHOR_METHODS[anchor_method]
        except UnknownNameError as e:
            raise FitnessError(f"--method: {e}") from None
    if not responses_by_task:
        raise FitnessError("no responses given: pass at least one responses file")
    candidates = list(DEFAULT_DIMS) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if not candidates or min(candidates) < 1:
        raise FitnessError(f"--dims {candidates}: IRT dimensions must be integers >= 1")
    spreads = list(DEFAULT_A_SD) if a_sd is None else [a_sd] if isinstance(a_sd, (int, float)) else list(a_sd)
    if not spreads or min(spreads) <= 0:
        raise FitnessError(f"a_sd {spreads}: the prior sd of the slopes must be > 0")
    tasks = {
        task: fit_task(task, resp, n_anchors=n_anchors, seed=derive_seed(seed, "irt", task),
                       anchor_method=anchor_method, sources=sources or [], dims=candidates, a_sds=spreads,
                       prior=prior)
        for task, resp in responses_by_task.items()
    }
    settings = {"n_anchors": n_anchors, "anchor_method": anchor_method, "dims": candidates, "a_sd": spreads,
                "prior": {"theta_sd": prior.theta_sd, "b_sd": prior.b_sd},
                "heldout_share": HELDOUT_SHARE, "heldout_draws": HELDOUT_DRAWS}
    return Calibration(tasks=tasks, settings=settings, seed=seed)


def fit_task(task: str, resp: Responses, *, n_anchors: int, seed: int, anchor_method: str, sources: list[str],
             dims: list[int], a_sds: list[float], prior: Prior) -> TaskCalibration:
    """Steps 1-4 of the module docstring for one task."""
    start = time.perf_counter()
    _validate(task, resp, n_anchors, sources)
    y = resp.values
    m = len(resp.models)
    is_source = np.isin(resp.models, sources)
    rng = np.random.default_rng(derive_seed(seed, "heldout"))
    others = np.flatnonzero(~is_source)
    n_val = min(max(1, round(HELDOUT_SHARE * m)), len(others))
    if m - n_val < 3:
        n_val = 0  # too few models to hold any out: D is the smallest candidate, lambdas fall back to defaults
    val = np.sort(rng.choice(others, size=n_val, replace=False)) if n_val else np.array([], dtype=np.int64)
    train = np.setdiff1d(np.arange(m), val)
    usable = sorted(d for d in dims if d <= max(1, len(train) // 2))  # more dims than half the models overfit
    if not usable:
        usable = [min(dims)]
    few = m < MIN_INFORMATIVE_MODELS
    if few:
        # at most one model is held out: choosing D and the slope sd on its error did worse than not choosing
        # (bench/IRT_NOTES.md), so take the simplest D and the middle sd (the anchors fall back below)
        usable, a_sds = usable[:1], [a_sds[len(a_sds) // 2]]

    # held-out choice of (slope sd, D), one coordinate at a time: the slope sd at the smallest D, then D
    errors: dict[tuple[float, int], dict[str, float]] = {}

    def score(spread: float, d: int) -> float:
        if (spread, d) not in errors:
            # a looser tolerance than the final fit: the candidates only have to be ranked
            fit = fit_2pl(y[train], d, prior=replace(prior, a_sd=spread), tol=SELECTION_TOL)
            src_theta = fit.theta[np.flatnonzero(is_source[train])] if sources else None
            errors[spread, d] = _heldout_errors(fit.items, y[val], n_anchors, src_theta,
                                                derive_seed(seed, "draws"))
            log.info("task %s: a_sd=%g D=%d held-out error %.4f (anchors) %.4f (half)", task, spread, d,
                     errors[spread, d]["anchors"], errors[spread, d]["half"])
        return round(errors[spread, d]["anchors"], 4)  # ties (at 1e-4) go to the earlier, simpler candidate

    spread, chosen = a_sds[len(a_sds) // 2], usable[0]
    if n_val:
        spread = min(a_sds, key=lambda s: score(s, usable[0]))
        chosen = min(usable, key=lambda d: score(spread, d))

    fit = fit_2pl(y, chosen, prior=replace(prior, a_sd=spread))
    method = anchor_method
    if few and method != "random":
        # k-means on few models' answers (or on item parameters fitted from them) groups the items they all answered
        # alike: clusters of very unequal size, one anchor each; strata of equal size by item mean do much better
        method = "random"
    anchors = select_anchors(method, n_anchors, y, fit.items, derive_seed(seed, "anchors"))
    v = anchor_mean_mse(fit.items, fit.theta, anchors.index, anchors.weights)
    lambdas = {"gpirt": DEFAULT_LAMBDA, "gmpirt": DEFAULT_LAMBDA}
    if errors:
        best = errors[spread, chosen]
        unseen = (len(resp.items) - n_anchors) / len(resp.items)  # the share of the estimate the IRT model predicts
        lambdas["gpirt"] = _bias_variance_lambda(unseen * best["half"], v)
        if "mp_half" in best:
            lambdas["gmpirt"] = _bias_variance_lambda(unseen * best["mp_half"], v)
    source_theta = {name: fit.theta[resp.models.index(name)].tolist() for name in sources}
    seconds = time.perf_counter() - start
    diagnostics = {
        "models": m, "items": len(resp.items), "heldout_models": int(n_val), "dims": chosen, "a_sd": spread,
        "anchor_method": method,
        "heldout_errors": {f"a_sd={s:g},D={d}": {k: round(e, 5) for k, e in errs.items()}
                           for (s, d), errs in errors.items()},
        "anchor_mse": round(float(v), 7), "fit_iterations": fit.iterations, "fit_converged": fit.converged,
        "seconds": round(seconds, 2), "warnings": degenerate_fit_warnings(y, fit.converged, n_val),
    }
    if few:
        diagnostics["warnings"].append(too_few_models_warning(m, chosen, spread, lambdas["gpirt"], int(n_val),
                                                              anchor_method))
    for warning in diagnostics["warnings"]:
        log.warning("task %s: %s", task, warning)
    log.info("task %s: %d models x %d items, D=%d, lambdas %s, %.1f s", task, m, len(resp.items), chosen,
             lambdas, seconds)
    return TaskCalibration(name=task, item_ids=list(resp.items), items=fit.items, anchors=anchors.index,
                           weights=anchors.weights, lambdas=lambdas, sources=source_theta, seed=seed,
                           diagnostics=diagnostics)


def degenerate_fit_warnings(y: np.ndarray, converged: bool, heldout: int) -> list[str]:
    """Why this task's IRT fit cannot be trusted, if it cannot: answers that tell models or items apart carry
    the fit; without them the estimates are the prior's."""
    seen = y[~np.isnan(y)]
    warnings = []
    if seen.size and (seen.min() == seen.max()):
        warnings.append(f"every answer is {'right' if seen[0] else 'wrong'}: the responses tell no model or item "
                        "apart, so the estimates are the prior's (calibrate with models that differ on this task)")
    else:
        rates = np.nanmean(y, axis=1)
        if np.allclose(rates, rates[0]):
            warnings.append("every model has the same accuracy: abilities cannot be told apart")
    if not converged:
        warnings.append("the IRT fit did not converge: its item parameters are uncertain")
    if heldout == 0:
        warnings.append("too few models to hold any out: IRT dimension and mixing weights are defaults, not chosen")
    return warnings


def too_few_models_warning(models: int, dims: int, a_sd: float, lam: float, heldout: int, anchor_method: str) -> str:
    """The one line that says a calibration has too few models to be informative, and what it fell back to."""
    basis = f"fitted on {heldout} held-out model" + "s" * (heldout != 1) if heldout else "the default, none held out"
    anchors = "random (strata by item mean)" + ("" if anchor_method == "random" else f" instead of {anchor_method}")
    return (f"{models} calibration models, fewer than {MIN_INFORMATIVE_MODELS}: too few for an informative IRT fit "
            "(at most one model can be held out to choose its settings, and k-means anchors group the items these "
            "few models all answered alike; on simulated tasks the usual calibration's p-IRT error was then up to "
            f"1.6x what {MIN_INFORMATIVE_MODELS} or more models give, see bench/IRT_NOTES.md); fell back to IRT "
            f"dimension {dims}, slope prior sd {a_sd:g}, anchors {anchors}, gp-IRT weight of the anchor mean "
            f"{lam:.2f} ({basis}); estimates stay up to 1.3x less accurate: calibrate with at least "
            f"{MIN_INFORMATIVE_MODELS} models")


def _validate(task: str, resp: Responses, n_anchors: int, sources: list[str]) -> None:
    where = f"{resp.source} (task {task!r})"
    m, n = resp.values.shape
    if m < MIN_MODELS:
        raise FitnessError(f"{where}: {m} model rows, but calibrating needs at least {MIN_MODELS} "
                           "(10-40 is typical): add the responses of more models")
    if n_anchors < 1:
        raise FitnessError(f"--anchors {n_anchors}: the number of anchor items must be at least 1")
    if n_anchors > n:
        raise FitnessError(f"{where}: {n} items, too few for {n_anchors} anchors: ask for at most {n} "
                           "(--anchors) or give more items")
    observed = resp.observed
    empty_items = np.flatnonzero(~observed.any(axis=0))
    if len(empty_items):
        raise FitnessError(f"{where}: item {resp.items[empty_items[0]]!r} has no response from any model: "
                           "drop its column or score it")
    empty_models = np.flatnonzero(~observed.any(axis=1))
    if len(empty_models):
        raise FitnessError(f"{where}: model {resp.models[empty_models[0]]!r} has no responses: drop its row")
    unknown = [s for s in sources if s not in resp.models]
    if unknown:
        raise FitnessError(f"--sources: {', '.join(map(repr, unknown))} is not a model (row) of {where}: "
                           f"name rows of the file, e.g. {', '.join(resp.models[:3])}")


def _heldout_errors(items: ItemParams, y: np.ndarray, n_anchors: int, source_theta: np.ndarray | None,
                    seed: int) -> dict[str, float]:
    """Mean absolute errors, over held-out models (rows of y), of IRT estimates of their accuracy on unseen items.

    "anchors": ability from random subsets of n_anchors items; "half": ability from every other item (as
    tinyBenchmarks), predicting the other half; "mp_half": the same with mp-IRT's source mixture.
    """
    rng = np.random.default_rng(seed)
    n = y.shape[1]
    out: dict[str, float] = {}
    errs = []
    for _ in range(HELDOUT_DRAWS):
        seen = np.zeros(n, dtype=bool)
        seen[rng.choice(n, size=min(n_anchors, n - 1), replace=False)] = True
        errs.append(_prediction_error(items, y, seen))
    out["anchors"] = float(np.mean(errs))
    half = np.arange(n) % 2 == 0
    out["half"] = _prediction_error(items, y, half)
    if source_theta is not None and len(source_theta):
        task = _MixtureView(items, source_theta)
        err = []
        for row in y:
            idx = np.flatnonzero(half & ~np.isnan(row))
            rest = ~half & ~np.isnan(row)
            if not len(idx) or not rest.any():
                continue
            w = fit_mixture(task, idx, row[idx])  # type: ignore[arg-type]
            p = items.prob(w @ source_theta)[0]
            err.append(abs(p[rest].mean() - row[rest].mean()))
        if err:
            out["mp_half"] = float(np.mean(err))
    return out


@dataclass
class _MixtureView:
    """The two fields fit_mixture reads, for a fit that is not (yet) a TaskCalibration."""

    items: ItemParams
    source_theta: np.ndarray


def _prediction_error(items: ItemParams, y: np.ndarray, seen: np.ndarray) -> float:
    """MAE over models of the IRT-predicted vs actual accuracy on the unseen items, theta from the seen ones."""
    values = np.where(seen, y, np.nan)
    theta = fit_ability(items, values)
    p = items.prob(theta)  # (M, N)
    rest = ~seen & ~np.isnan(y)
    keep = rest.any(axis=1) & (~np.isnan(values)).any(axis=1)
    with np.errstate(invalid="ignore"):
        pred = np.nanmean(np.where(rest, p, np.nan), axis=1)
        true = np.nanmean(np.where(rest, y, np.nan), axis=1)
    return float(np.mean(np.abs(pred - true)[keep])) if keep.any() else math.nan


def anchor_mean_mse(items: ItemParams, theta: np.ndarray, anchors: np.ndarray, weights: np.ndarray) -> float:
    """Expected squared error of the weighted anchor mean as an estimate of the full-task accuracy, under the IRT
    model, averaged over the abilities theta (M, D) of the calibration models.

    Given theta the answers are independent Bernoulli(P_i), and anchor mean - accuracy = sum_i c_i y_i with
    c_i = w_i [i is an anchor] - 1/N: its mean is c . P, its variance sum_i c_i^2 P_i (1 - P_i). (The within-cluster
    spread of the calibration models' own answers is no estimate of this: the clusters are made from those answers,
    and with few models every cluster holds items they all answered alike, so it was 0 and lambda 1.)
    """
    n = len(items.b)
    coef = np.full(n, -1.0 / n)
    coef[anchors] += weights / weights.sum()
    p = items.prob(theta)  # (M, N)
    return float(np.mean((p @ coef) ** 2 + (p * (1 - p)) @ coef**2))


def _bias_variance_lambda(bias: float, variance: float) -> float:
    """tinyBenchmarks' gp-IRT weight of the anchor mean: b^2 / (b^2 + v); 0.5 if neither is measurable."""
    if not np.isfinite(bias) or bias**2 + variance <= 0:
        return DEFAULT_LAMBDA
    return float(bias**2 / (bias**2 + variance))
