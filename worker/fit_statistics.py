"""Statistics across prompts: least squares, bootstrap intervals, permutation p-values, Holm's correction.

Pure numpy in float64; every statistic is None (or NaN inside arrays) where it is undefined (too few points, no
spread) instead of a NaN in the output, so results stay valid JSON. docs/definitions.md ("Per job") says what each
one is; the tests check each against an independent computation (np.polyfit, explicit loops, exact enumeration).

Shapes: `n` prompts, `S` source draws per prompt (1 without several draws), `F` fits computed together, `B`
bootstrap resamples, `N` permutations.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

N_BOOT = 1000
CI_LEVEL = 0.95
# Permutations: at least N_PERM_MIN, and enough that the smallest possible p-value, 1/(N + 1), is half of Holm's
# first threshold FAMILY_ALPHA / m for a family of m tests (so a clear effect can survive the correction).
N_PERM_MIN = 1999
FAMILY_ALPHA = 0.05
PERMUTATION_STREAM = 1  # permutations draw from numpy's PCG64 seeded with (seed, PERMUTATION_STREAM)
_TINY = 1e-18
_TIE = 1e-12  # relative: a permuted statistic this close to the observed one counts as at least as extreme


@dataclass(frozen=True)
class LineFit:
    slope: float | None
    intercept: float | None
    r2: float | None
    n: int


def ols(x: ArrayLike, y: ArrayLike) -> LineFit:
    """Least squares y ≈ slope·x + intercept, with R² = 1 − SS_res / SS_tot."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(xs.size)
    if n < 2:
        return LineFit(None, None, None, n)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx = float(dx @ dx)
    if sxx <= _TINY:
        return LineFit(None, None, None, n)
    slope = float(dx @ dy) / sxx
    intercept = float(ys.mean()) - slope * float(xs.mean())
    residual = ys - (slope * xs + intercept)
    total = float(dy @ dy)
    r2 = 1.0 - float(residual @ residual) / total if total > _TINY else None
    return LineFit(slope, intercept, r2, n)


def cluster_ids(labels: Sequence[Hashable]) -> np.ndarray:
    """Labels (e.g. each prompt's relation) as cluster numbers 0…G−1, in order of first appearance."""
    numbers: dict[Hashable, int] = {}
    return np.array([numbers.setdefault(label, len(numbers)) for label in labels], dtype=np.int64)


def bootstrap_weights(clusters: ArrayLike, n_draws: int, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """(B, S, n) resample counts: how often each prompt's point from each source draw is in each resample.

    A resample draws G clusters with replacement from the G clusters (numpy's PCG64 seeded with `seed`: `integers(0,
    G, size=(B, G))`) and takes every prompt of every drawn cluster; with S > 1 draws, each occurrence of a prompt
    then takes the point of one draw chosen uniformly at random (a multinomial split of its count), so the sources
    are redrawn too. With one cluster per prompt this is the plain bootstrap of the prompts.
    """
    ids = np.asarray(clusters, dtype=np.int64)
    n_clusters = int(ids.max()) + 1 if ids.size else 0
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    offsets = (np.arange(n_boot) * n_clusters)[:, None]
    counts = np.bincount((picks + offsets).ravel(), minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)
    per_prompt = counts[:, ids]  # (B, n)
    if n_draws == 1:
        return per_prompt[:, None, :].astype(np.float64)
    split = rng.multinomial(per_prompt, np.full(n_draws, 1.0 / n_draws))  # (B, n, S)
    return np.moveaxis(split, -1, 1).astype(np.float64)


def bootstrap_fits(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and R² of the weighted least-squares line of every fit in every resample: (B, F) each.

    `weights` (B, S, n) from bootstrap_weights; `x`, `y` (F, S, n). A weight is a multiplicity, so each value is
    exactly the OLS fit of the expanded resample. NaN where the resample has no spread in x (slope and R²) or in
    y (R²)."""
    n_boot = weights.shape[0]
    w = weights.reshape(n_boot, -1)
    # Centring each fit on its own mean first keeps the moment sums from cancelling (slope and R² do not change).
    xs = x.reshape(x.shape[0], -1)
    ys = y.reshape(y.shape[0], -1)
    xs = (xs - xs.mean(axis=1, keepdims=True)).T  # (S·n, F)
    ys = (ys - ys.mean(axis=1, keepdims=True)).T
    total = w.sum(axis=1)[:, None]  # (B, 1)
    sx, sy = w @ xs, w @ ys
    cxx = w @ (xs * xs) - sx * sx / total
    cxy = w @ (xs * ys) - sx * sy / total
    cyy = w @ (ys * ys) - sy * sy / total
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(cxx > _TINY, cxy / cxx, np.nan)
        r2 = np.where((cxx > _TINY) & (cyy > _TINY), cxy * cxy / (cxx * cyy), np.nan)
    return slope, r2


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float] | None:
    """The central `level` interval of the defined (non-NaN) `values` (numpy's default linear percentile); None
    when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def n_permutations(n_tests: int) -> int:
    """Permutations for a family of `n_tests` tests: max(N_PERM_MIN, 2·m/α − 1)."""
    return max(N_PERM_MIN, math.ceil(2 * n_tests / FAMILY_ALPHA) - 1)


def permutations(n: int, n_perm: int, seed: int) -> np.ndarray:
    """(N, n): `n_perm` uniformly random orderings of n prompts (PCG64 seeded with (seed, PERMUTATION_STREAM))."""
    rng = np.random.default_rng((seed, PERMUTATION_STREAM))
    return rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)


def permutation_slopes(x: np.ndarray, y: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The statistic T = mean over draws of each draw's OLS slope of y on x, observed (K,) and with x's prompts
    reordered by every row of `orders` (N, K): the permutation null of "y does not depend on x".

    `x` (S, n) is shared by the K fits of `y` (K, S, n); the same reordering moves every draw's x (a prompt's x
    goes with the prompt). NaN where a draw's x has no spread."""
    n_draws, n_fits = x.shape[0], y.shape[0]
    dy = y - y.mean(axis=2, keepdims=True)  # (K, S, n)
    dx = x - x.mean(axis=1, keepdims=True)  # (S, n)
    sxx = np.einsum("sn,sn->s", dx, dx)
    if np.any(sxx <= _TINY):
        return np.full(n_fits, np.nan), np.full((orders.shape[0], n_fits), np.nan)
    observed = np.einsum("ksn,sn->ks", dy, dx) / sxx
    if np.all(x == x[0]):  # Δunembed: one reordering of x serves every draw and fit in one product
        null = (dx[0][orders] @ dy.transpose(2, 0, 1).reshape(x.shape[1], -1)).reshape(-1, n_fits, n_draws) / sxx
    else:
        null = np.stack([dx[s][orders] @ dy[:, s, :].T / sxx[s] for s in range(n_draws)], axis=-1)
    return observed.mean(axis=1), null.mean(axis=2)


def permutation_p(observed: float, null: np.ndarray) -> float | None:
    """Two-sided permutation p-value (1 + #{|T_perm| ≥ |T|}) / (N + 1): never 0, exact in level (Phipson & Smyth,
    2010). None when T is undefined."""
    if math.isnan(observed):
        return None
    extreme = int(np.sum(np.abs(null) >= abs(observed) * (1 - _TIE)))
    return (1 + extreme) / (1 + null.size)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values over the defined entries (None stays None): sorted ascending,
    p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j)). Rejecting where p̃ ≤ α controls the family-wise error at α
    under any dependence between the tests."""
    defined = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(defined)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(defined)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def cluster_mean_interval(
    values: np.ndarray, clusters: np.ndarray, n_clusters: int, seed: int, n_boot: int = N_BOOT,
    level: float = CI_LEVEL,
) -> tuple[np.ndarray, list[tuple[float, float] | None]]:
    """Bootstrap of K means over fixed sets of items, resampling whole clusters (documents): (B, K) resampled
    means, and each mean's percentile interval.

    `values` (K, m) with NaN where an item is not in a set; `clusters` (K, m) each item's cluster (0…G−1). A
    resample draws the G clusters with replacement (PCG64 seeded with `seed`); every set uses the same resamples, so
    means of several sets' means get intervals from them too."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    offsets = (np.arange(n_boot) * n_clusters)[:, None]
    counts = np.bincount((picks + offsets).ravel(), minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    sums = np.zeros((values.shape[0], n_clusters))
    sizes = np.zeros((values.shape[0], n_clusters))
    rows = np.repeat(np.arange(values.shape[0]), values.shape[1]).reshape(values.shape)
    np.add.at(sums, (rows[present], clusters[present]), filled[present])
    np.add.at(sizes, (rows[present], clusters[present]), 1.0)
    counts = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = (counts @ sums.T) / (counts @ sizes.T)  # (B, K); NaN where a resample holds none of a set
    return means, [percentile_interval(means[:, k], level) for k in range(values.shape[0])]


def pearson(x: ArrayLike, y: ArrayLike) -> float | None:
    """Pearson's r; None with fewer than two points or no spread in either variable."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.size < 2:
        return None
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx <= _TINY or syy <= _TINY:
        return None
    return float(dx @ dy) / float(np.sqrt(sxx * syy))


def excludes(interval: tuple[float, float] | None, value: float) -> bool | None:
    """Whether a closed interval lies entirely on one side of `value`."""
    if interval is None:
        return None
    return interval[0] > value or interval[1] < value


def inside(interval: tuple[float, float] | None, low: float, high: float) -> bool | None:
    """Whether a closed interval lies entirely inside the open interval (low, high)."""
    if interval is None:
        return None
    return interval[0] > low and interval[1] < high
