"""Anchor items: the few items of a task every candidate is scored on, each standing for a cluster of items.

Three ways to choose them (tinyBenchmarks, Polo et al. 2024), all seeded and all returning one anchor per
cluster with weight = cluster size / number of items, so the weights sum to 1 and the weighted anchor mean
estimates the full-task accuracy:

- `random`: stratified random. Items sorted by their mean correctness over the calibration models, cut into n
  strata of (nearly) equal size, one item drawn at random from each.
- `correctness`: k-means on the items' correctness vectors (one coordinate per calibration model).
- `irt`: k-means on the items' fitted IRT parameters (a_i, b_i).

For the two k-means methods the anchor of a cluster is the item nearest its centroid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evomerge.fitness.irt import ItemParams
from evomerge.registry import Registry


@dataclass(frozen=True)
class Anchors:
    index: np.ndarray  # (n,) positions of the anchor items in the task's item list
    weights: np.ndarray  # (n,) share of the task each anchor stands for; sums to 1
    labels: np.ndarray  # (N,) cluster (anchor number) of every item of the task


Selector = Callable[[int, np.ndarray, ItemParams, np.random.Generator], Anchors]
ANCHOR_METHODS: Registry[Selector] = Registry("anchor method")


def select_anchors(method: str, n: int, values: np.ndarray, items: ItemParams, seed: int) -> Anchors:
    """n anchors among the N columns of `values` (M, N; NaN = not observed), with `method`'s rule."""
    if not 1 <= n <= values.shape[1]:
        raise ValueError(f"cannot choose {n} anchors among {values.shape[1]} items")
    return ANCHOR_METHODS[method](n, values, items, np.random.default_rng(seed))


def _from_labels(labels: np.ndarray, index: np.ndarray) -> Anchors:
    sizes = np.bincount(labels, minlength=len(index))
    return Anchors(index=index, weights=sizes / sizes.sum(), labels=labels)


@ANCHOR_METHODS.register("random")
def _stratified_random(n: int, values: np.ndarray, items: ItemParams, rng: np.random.Generator) -> Anchors:
    p = np.nanmean(values, axis=0)  # (N,) how many calibration models got each item right
    # random tie-break: many items share a mean (all right, all wrong), and the order within a tie must not
    # follow the column order of the file
    order = np.lexsort((rng.random(len(p)), p))
    labels = np.empty(len(p), dtype=np.int64)
    index = np.empty(n, dtype=np.int64)
    for k, stratum in enumerate(np.array_split(order, n)):
        labels[stratum] = k
        index[k] = rng.choice(stratum)
    return _from_labels(labels, index)


@ANCHOR_METHODS.register("correctness")
def _kmeans_correctness(n: int, values: np.ndarray, items: ItemParams, rng: np.random.Generator) -> Anchors:
    mean = np.nanmean(values, axis=0)
    features = np.where(np.isnan(values), mean, values).T  # (N, M): an item is its column of answers
    return _kmeans_anchors(features, n, rng)


@ANCHOR_METHODS.register("irt")
def _kmeans_irt(n: int, values: np.ndarray, items: ItemParams, rng: np.random.Generator) -> Anchors:
    features = np.concatenate([items.a, items.b[:, None]], axis=1)  # (N, D+1)
    return _kmeans_anchors(features, n, rng)


def _kmeans_anchors(features: np.ndarray, n: int, rng: np.random.Generator) -> Anchors:
    labels, centroids = kmeans(features, n, rng)
    index = np.empty(n, dtype=np.int64)
    for k in range(n):
        members = np.flatnonzero(labels == k)
        dist = np.sum((features[members] - centroids[k]) ** 2, axis=1)
        index[k] = members[np.argmin(dist)]
    return _from_labels(labels, index)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, *, restarts: int = 3, iters: int = 100
           ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ starts; the best of `restarts` runs. Every cluster ends non-empty.

    Returns labels (N,) and centroids (k, F).
    """
    x = np.asarray(x, dtype=np.float64)
    sq = np.sum(x**2, axis=1)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        centroids = _kmeans_pp(x, sq, k, rng)
        labels = np.full(len(x), -1)
        for _ in range(iters):
            d2 = sq[:, None] - 2 * x @ centroids.T + np.sum(centroids**2, axis=1)  # (N, k)
            new = np.argmin(d2, axis=1)
            counts = np.bincount(new, minlength=k)
            for empty in np.flatnonzero(counts == 0):
                # an empty cluster takes the point farthest from its centroid, from a cluster of 2 or more
                dist = d2[np.arange(len(x)), new]
                dist[counts[new] < 2] = -1
                far = int(np.argmax(dist))
                counts[new[far]] -= 1
                new[far] = empty
                counts[empty] = 1
            if np.array_equal(new, labels):
                break
            labels = new
            centroids = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
        inertia = float(np.sum((x - centroids[labels]) ** 2))
        if best is None or inertia < best[0]:
            best = (inertia, labels.copy(), centroids.copy())
    assert best is not None
    return best[1], best[2]


def _kmeans_pp(x: np.ndarray, sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(len(x))]]
    d2 = np.maximum(sq - 2 * x @ centroids[0] + centroids[0] @ centroids[0], 0)
    for _ in range(1, k):
        total = d2.sum()
        # all remaining points coincide with a centroid (duplicated items): any point will do
        pick = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=d2 / total)
        centroids.append(x[pick])
        d2 = np.minimum(d2, np.maximum(sq - 2 * x @ x[pick] + x[pick] @ x[pick], 0))
    return np.stack(centroids)
