"""Statistics across prompts: least squares, a seeded bootstrap interval for the slope, Pearson correlation.

Pure numpy in float64; every function returns None where the statistic is undefined (too few points, no spread)
instead of a NaN, so results stay valid JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

N_BOOT = 1000
CI_LEVEL = 0.95
_TINY = 1e-18


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


def bootstrap_slopes(x: ArrayLike, y: ArrayLike, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """The OLS slope on `n_boot` resamples of the points (drawn with replacement, numpy's PCG64 seeded with
    `seed`); resamples without spread in x are dropped."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = xs.size
    if n < 2:
        return np.empty(0)
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    bx, by = xs[index], ys[index]
    dx = bx - bx.mean(axis=1, keepdims=True)
    dy = by - by.mean(axis=1, keepdims=True)
    sxx = (dx * dx).sum(axis=1)
    keep = sxx > _TINY
    return (dx * dy).sum(axis=1)[keep] / sxx[keep]


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float] | None:
    """The central `level` interval of `values` (numpy's default linear percentile); None when empty."""
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


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
