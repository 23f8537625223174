"""Multidimensional 2PL item response model: P(model l answers item i) = sigmoid(a_i . theta_l - b_i).

Here: the model's item parameters and the MAP abilities of new models from their answers (numpy only: what
the estimators need). The fit of the item parameters (irt_fit.py, torch) is a joint MAP estimate (Gaussian
priors on abilities, discriminations and difficulties) by L-BFGS on the exact gradient. Calibration sets are
small in models (10-40) and moderate in items (hundreds to thousands), so the priors carry real weight: without
them an item every model got right has b -> -inf, and with few models each item's D+1 parameters overfit.
bench/IRT_NOTES.md compares this fit with py-irt's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit


@dataclass(frozen=True)
class Prior:
    """Standard deviations of the zero-mean Gaussian priors of the joint MAP fit."""

    theta_sd: float = 1.0  # abilities: fixes the scale and origin the likelihood leaves free
    a_sd: float = 0.1  # slopes around their common value: shrinks the D slopes of an item seen by few models
    b_sd: float = 3.0  # difficulties: wide, only keeps items that every model got right (or wrong) finite


@dataclass(frozen=True)
class ItemParams:
    """Item parameters of a fitted 2PL model."""

    a: np.ndarray  # (N, D) discriminations
    b: np.ndarray  # (N,) difficulties

    @property
    def dims(self) -> int:
        return self.a.shape[1]

    def prob(self, theta: np.ndarray) -> np.ndarray:
        """(M, D) abilities -> (M, N) probabilities of a right answer."""
        return expit(np.atleast_2d(theta) @ self.a.T - self.b)

    def take(self, index: np.ndarray | list[int]) -> ItemParams:
        return ItemParams(self.a[index], self.b[index])


def fit_ability(items: ItemParams, values: np.ndarray, *, mean: np.ndarray | None = None,
                cov: np.ndarray | None = None, iters: int = 50) -> np.ndarray:
    """MAP abilities (M, D) of models from their answers (M, n) on the n items of `items` (NaN = not seen).

    The prior is N(mean, cov), by default N(0, I), the prior of the fit. The posterior is log-concave, so a damped
    Newton iteration converges in a few steps; all models are solved at once.
    """
    y = np.atleast_2d(np.asarray(values, dtype=np.float64))
    mask = ~np.isnan(y)
    y = np.where(mask, y, 0.0)
    d = items.dims
    mu = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
    prec = np.eye(d) if cov is None else np.linalg.inv(cov)
    a, b = items.a, items.b  # (n, D), (n,)

    def objective(theta: np.ndarray) -> np.ndarray:  # (M,) negative log posterior
        z = theta @ a.T - b
        diff = theta - mu
        return np.sum(mask * (np.logaddexp(0.0, z) - y * z), axis=1) + 0.5 * np.einsum("md,de,me->m", diff, prec, diff)

    theta = np.tile(mu, (y.shape[0], 1))
    current = objective(theta)
    for _ in range(iters):
        p = expit(theta @ a.T - b)  # (M, n)
        grad = (mask * (p - y)) @ a + (theta - mu) @ prec  # (M, D)
        hess = np.einsum("mi,id,ie->mde", mask * p * (1 - p), a, a) + prec  # (M, D, D)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        # halve the step for the models whose objective would go up (Newton overshoots on saturated logits)
        t = np.ones(len(theta))
        for _ in range(30):
            trial = objective(theta - t[:, None] * step)
            worse = trial > current + 1e-12
            if not worse.any():
                break
            t[worse] *= 0.5
        theta = theta - t[:, None] * step
        new = objective(theta)
        done = np.max(current - new) < 1e-10
        current = new
        if done:
            break
    return theta
