"""How attribution-patching estimates agree with the exact effects, and how much of their miss is the Hydra effect.

Pure functions over numpy arrays (float64), from an exact sweep (worker/engine/sweep.py) and the estimates of the
same job (worker/engine/attribution.py): rank correlation (Spearman), recall of the true top-k, the largest misses
with their exact and estimated values, the cost of each method, the verification set of a large job (the top-k by
estimate plus a seeded random sample, the components worth running exactly), and the link to this service's
measures: per component, the estimate's error against the exact total effect beside the compensatory effect (CE)
and the norm's response, and the error regressed on CE across prompts.

Signs and scales: `atp` and `atp_qkfix` estimate `total_effect` (clean − ablated) with its sign; `atp_star` (AtP*,
GradDrop's mean of absolute values) estimates its magnitude, so it is compared with |total_effect| (per ablated
run, averaged over the runs, when the sweep kept its samples). Rankings and top-k are by magnitude: the paper's
question is which components matter most, whatever the sign.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from hydra_ablate_client.wire import Fit
from worker.engine.attribution import MAGNITUDE, AttributionResult, MethodCost
from worker.engine.types import PromptMeasures, SweepResult
from worker.fit_statistics import (
    CI_LEVEL,
    N_BOOT,
    bootstrap_fits,
    bootstrap_weights,
    excludes,
    inside,
    ols,
    pearson,
    percentile_interval,
)

DEFAULT_TOP_K = 10
DEFAULT_MISSES = 10


# --------------------------------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------------------------------


def average_ranks(values: ArrayLike) -> np.ndarray:
    """Ranks 1 … n of `values`, ties sharing the mean of the ranks they span (as Spearman's ρ defines them)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    start = 0
    while start < x.size:
        stop = start + 1
        while stop < x.size and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 … stop
        start = stop
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float | None:
    """Spearman's ρ: Pearson's r of the average ranks; None with fewer than two points or no spread."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.size != ys.size:
        raise ValueError(f"spearman of {xs.size} and {ys.size} values")
    return pearson(average_ranks(xs), average_ranks(ys))


def top_k(values: ArrayLike, k: int) -> list[int]:
    """Indices of the k largest |values|, largest first (ties: the lower index first)."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    order = np.lexsort((np.arange(magnitude.size), -magnitude))
    return [int(i) for i in order[: max(0, min(k, magnitude.size))]]


def top_k_recall(exact: ArrayLike, estimate: ArrayLike, k: int) -> float | None:
    """The share of the true top-k (by |exact|) that is in the estimate's top-k (by |estimate|); None when k < 1."""
    n = np.asarray(exact).size
    k = min(k, n)
    if k < 1:
        return None
    return len(set(top_k(exact, k)) & set(top_k(estimate, k))) / k


# --------------------------------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Miss:
    """One (prompt, component) where the estimate is furthest from the exact value."""

    index: int  # the prompt's index in the job
    component: str
    exact: float  # what the estimate is compared with: total_effect, or |total_effect| for a magnitude
    estimate: float
    error: float  # estimate − exact
    position: int | None = None  # per-position jobs: the measured position


@dataclass(frozen=True)
class Agreement:
    """One method against the exact effects, over P prompts × C components."""

    method: str
    compared_with: str  # "total_effect" or "abs_total_effect"
    n_prompts: int
    n_components: int
    k: int
    spearman_per_prompt_mean: float | None  # ρ across components within each prompt, averaged over prompts
    spearman_per_prompt_median: float | None
    spearman_pooled: float | None  # ρ over every (prompt, component) pair
    spearman_of_means: float | None  # ρ across components of the means over prompts (the paper's distribution view)
    recall_at_k_per_prompt_mean: float | None  # true top-k found in the estimate's top-k, per prompt, averaged
    recall_at_k_of_means: float | None
    mean_abs_error: float
    largest_misses: list[Miss]
    n_pairs: int | None = None  # per-position jobs: the rows are (prompt, position) pairs (`agreement`'s positions)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _median_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def agreement(
    method: str,
    compared_with: str,
    exact: np.ndarray,
    estimate: np.ndarray,
    components: Sequence[str],
    indices: Sequence[int],
    *,
    k: int = DEFAULT_TOP_K,
    n_misses: int = DEFAULT_MISSES,
    positions: Sequence[int] | None = None,
) -> Agreement:
    """`exact` and `estimate` are (P, C) on the same scale (signed effects, or magnitudes for AtP*).

    Per-position jobs: the rows are (prompt, position) pairs, `indices` and `positions` name each row's prompt and
    position; the per-prompt statistics are then per pair, the means over pairs, and `n_prompts` counts the distinct
    prompts."""
    exact, estimate = np.asarray(exact, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    if exact.shape != estimate.shape or exact.ndim != 2:
        raise ValueError(f"exact {exact.shape} and estimate {estimate.shape} must both be (prompts, components)")
    n_prompts, n_components = exact.shape
    per_prompt = [spearman(exact[p], estimate[p]) for p in range(n_prompts)]
    error = estimate - exact
    flat = np.argsort(-np.abs(error), axis=None, kind="stable")[:n_misses]
    misses = [
        Miss(int(indices[p]), components[c], float(exact[p, c]), float(estimate[p, c]), float(error[p, c]),
             None if positions is None else int(positions[p]))
        for p, c in (np.unravel_index(i, error.shape) for i in flat)
    ]
    return Agreement(
        method=method,
        compared_with=compared_with,
        n_prompts=n_prompts if positions is None else len(set(indices)),
        n_pairs=None if positions is None else n_prompts,
        n_components=n_components,
        k=min(k, n_components),
        spearman_per_prompt_mean=_mean_or_none(per_prompt),
        spearman_per_prompt_median=_median_or_none(per_prompt),
        spearman_pooled=spearman(exact.ravel(), estimate.ravel()),
        spearman_of_means=spearman(exact.mean(axis=0), estimate.mean(axis=0)) if n_prompts else None,
        recall_at_k_per_prompt_mean=_mean_or_none([top_k_recall(exact[p], estimate[p], k) for p in range(n_prompts)]),
        recall_at_k_of_means=top_k_recall(exact.mean(axis=0), estimate.mean(axis=0), k) if n_prompts else None,
        mean_abs_error=float(np.abs(error).mean()) if error.size else math.nan,
        largest_misses=misses,
    )


# --------------------------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostSummary:
    """Per prompt: model evaluations (a forward or backward pass over the prompt counts 1, as the paper counts)
    and seconds, for each method; `speedup` is the exact engine's seconds over the method's."""

    method: str
    model_evaluations: float
    forward_passes: float
    backward_passes: float
    seconds: float
    speedup: float | None


def exact_cost(n_components: int, runs_per_component: int, noise_runs: int, seconds: float) -> MethodCost:
    """Activation patching as the paper counts it: the clean run, each noise run, and one forward per ablated run.

    The fast engine runs each ablated run from its component's layer on and only over the ablated positions, so its
    seconds are the fair comparison, not this count."""
    return MethodCost(1.0 + noise_runs + n_components * runs_per_component, 0.0, seconds)


def cost_table(costs: dict[str, MethodCost], exact: MethodCost) -> list[CostSummary]:
    rows = {"exact": exact, **costs}
    return [
        CostSummary(
            method=name,
            model_evaluations=c.model_evaluations,
            forward_passes=c.forward_passes,
            backward_passes=c.backward_passes,
            seconds=c.seconds,
            speedup=exact.seconds / c.seconds if c.seconds > 0 else None,
        )
        for name, c in rows.items()
    ]


# --------------------------------------------------------------------------------------------------------------------
# Verification set
# --------------------------------------------------------------------------------------------------------------------


def verification_set(estimate_means: ArrayLike, top: int, random: int, seed: int) -> list[int]:
    """The components to run exactly in a large job: the `top` largest by |estimate| (averaged over prompts), and
    `random` more drawn uniformly from the rest with numpy's PCG64 seeded with `seed` (a check of the estimate
    where it says nothing happens: the paper's false negatives). Sorted component indices."""
    magnitude = np.abs(np.asarray(estimate_means, dtype=np.float64))
    chosen = top_k(magnitude, top)
    rest = np.setdiff1d(np.arange(magnitude.size), np.asarray(chosen, dtype=np.int64))
    drawn: list[int] = []
    if rest.size:
        drawn = [int(i) for i in np.random.default_rng(seed).choice(rest, size=min(random, rest.size), replace=False)]
    return sorted({*chosen, *drawn})


# --------------------------------------------------------------------------------------------------------------------
# Pairing a sweep with its estimates, and the Hydra link
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """A sweep and its estimates on the same prompts (P, in job order) and components (C, in the sweep's order)."""

    indices: list[int]
    components: list[str]
    total_effect: np.ndarray  # (P, C)
    abs_total_effect: np.ndarray  # (P, C): mean over the ablated runs of |TE| (|mean TE| without kept samples)
    compensatory_effect: np.ndarray  # (P, C)
    norm_response: np.ndarray  # (P, C)
    estimates: dict[str, np.ndarray]  # method → (P, C)
    compared_with: dict[str, str]  # method → "total_effect" or "abs_total_effect"
    # Per-position jobs: the rows are (prompt, position) pairs, `indices` each row's prompt and this its position.
    positions: list[int] | None = None

    def exact_for(self, method: str) -> np.ndarray:
        return self.abs_total_effect if self.compared_with[method] == MAGNITUDE else self.total_effect


def pair(sweep: SweepResult, estimates: AttributionResult) -> Paired:
    """Align the two results by prompt index and component name (the sweep's prompts and components, all of which
    the estimates must cover)."""
    node = {name: c for c, name in enumerate(estimates.nodes)}
    missing = [name for name in sweep.components if name not in node]
    by_index = {p.index: p for p in estimates.prompts}
    absent = [p.index for p in sweep.prompts if p.index not in by_index]
    if missing or absent:
        raise ValueError(f"estimates lack components {missing} and prompts {absent} of the sweep")
    columns = [node[name] for name in sweep.components]
    prompts = sweep.prompts

    def magnitude(p: PromptMeasures) -> list[float]:
        if p.samples:
            return [float(np.mean([abs(s.total_effect) for s in runs])) for runs in p.samples]
        return [abs(v) for v in p.total_effect]

    return Paired(
        indices=[p.index for p in prompts],
        components=list(sweep.components),
        total_effect=np.asarray([p.total_effect for p in prompts], dtype=np.float64),
        abs_total_effect=np.asarray([magnitude(p) for p in prompts], dtype=np.float64),
        compensatory_effect=np.asarray([p.compensatory_effect for p in prompts], dtype=np.float64),
        norm_response=np.asarray([p.norm_response for p in prompts], dtype=np.float64),
        estimates={
            m: np.asarray([[by_index[p.index].values[m][c] for c in columns] for p in prompts], dtype=np.float64)
            for m in estimates.methods
        },
        compared_with=dict(estimates.estimated),
    )


@dataclass(frozen=True)
class ComponentError:
    """One component: the estimate's error against the exact total effect beside the Hydra measures, over prompts."""

    component: str
    method: str
    error_mean: float  # mean over prompts of estimate − exact (exact: TE, or |TE| for a magnitude)
    abs_error_mean: float
    total_effect_mean: float
    compensatory_effect_mean: float
    norm_response_mean: float
    error_vs_ce: Fit  # the error regressed on CE across prompts (slope 1: the miss is the compensation)
    error_ce_correlation: float | None  # Pearson's r across prompts


def error_fits(
    ce: np.ndarray, error: np.ndarray, *, y_name: str, seed: int, n_boot: int = N_BOOT,
    clusters: np.ndarray | None = None,
) -> list[Fit]:
    """Per component (columns of the (P, C) arrays): the error regressed on CE across prompts, least squares with
    the service's seeded percentile bootstrap of the prompts (worker/fit_statistics.py; one source draw).

    `clusters` (P,): rows resampled together, numbered 0 … G − 1 (per-position jobs: each pair's prompt); None:
    every row its own."""
    n, n_components = ce.shape
    groups = np.arange(n) if clusters is None else np.asarray(clusters, dtype=np.int64)
    n_clusters = int(groups.max()) + 1 if groups.size else 0
    weights = bootstrap_weights(groups, 1, seed, n_boot)
    boot_slope, boot_r2 = bootstrap_fits(weights, ce.T[:, None, :], error.T[:, None, :])
    fits = []
    for c in range(n_components):
        line = ols(ce[:, c], error[:, c])
        slope_ci = percentile_interval(boot_slope[:, c]) if line.slope is not None else None
        r2_ci = percentile_interval(boot_r2[:, c]) if line.r2 is not None else None
        fits.append(Fit(
            y=y_name, x="compensatory_effect", slope=line.slope, intercept=line.intercept, r2=line.r2, n=n,
            slope_ci_low=None if slope_ci is None else slope_ci[0],
            slope_ci_high=None if slope_ci is None else slope_ci[1],
            ci_level=CI_LEVEL, n_boot=n_boot,
            excludes_zero=excludes(slope_ci, 0.0), excludes_one=excludes(slope_ci, 1.0),
            slope_in_unit_interval=inside(slope_ci, 0.0, 1.0),
            r2_ci_low=None if r2_ci is None else r2_ci[0], r2_ci_high=None if r2_ci is None else r2_ci[1],
            n_clusters=n_clusters,
        ))
    return fits


def hydra_link(paired: Paired, method: str, seed: int = 0) -> list[ComponentError]:
    """Per component: how much of the estimate's miss the compensatory effect explains, across prompts."""
    error = paired.estimates[method] - paired.exact_for(method)
    ce = paired.compensatory_effect
    clusters = None
    if paired.positions is not None:  # (prompt, position) pairs: a prompt's pairs are resampled together
        clusters = np.unique(np.asarray(paired.indices), return_inverse=True)[1]
    fits = error_fits(ce, error, y_name=f"{method} − exact", seed=seed, clusters=clusters)
    return [
        ComponentError(
            component=name,
            method=method,
            error_mean=float(error[:, c].mean()),
            abs_error_mean=float(np.abs(error[:, c]).mean()),
            total_effect_mean=float(paired.total_effect[:, c].mean()),
            compensatory_effect_mean=float(ce[:, c].mean()),
            norm_response_mean=float(paired.norm_response[:, c].mean()),
            error_vs_ce=fits[c],
            error_ce_correlation=pearson(ce[:, c], error[:, c]),
        )
        for c, name in enumerate(paired.components)
    ]


@dataclass(frozen=True)
class AttributionSummary:
    agreement: list[Agreement]  # one per method
    cost: list[CostSummary]  # the exact engine first
    hydra: dict[str, list[ComponentError]]  # method → per component


def summarise_attribution(
    sweep: SweepResult,
    estimates: AttributionResult,
    exact_seconds_per_prompt: float,
    *,
    runs_per_component: int,
    noise_runs: int,
    k: int = DEFAULT_TOP_K,
    seed: int = 0,
) -> AttributionSummary:
    """Everything above for one job: `exact_seconds_per_prompt` is the fast engine's time for the same components
    (its clean passes excluded, as the estimates' costs exclude theirs: the two share them)."""
    paired = pair(sweep, estimates)
    exact = exact_cost(len(paired.components), runs_per_component, noise_runs, exact_seconds_per_prompt)
    return AttributionSummary(
        agreement=[
            agreement(m, paired.compared_with[m], paired.exact_for(m), paired.estimates[m], paired.components,
                      paired.indices, k=k)
            for m in estimates.methods
        ],
        cost=cost_table(estimates.cost, exact),
        hydra={m: hydra_link(paired, m, seed) for m in estimates.methods},
    )
