"""The summary's `attribution` block: a job's estimates against its exact effects, from the merged prompt results.

The statistics are worker/attribution_summary.py's (agreement, cost table, the error regressed on CE); this module
only pairs the stored results (PromptResult.estimates beside total_effect, compensatory_effect and norm_response;
for a patching job PairResult.estimates beside the exact change of each patch) and weighs the chunks' per-prompt
(per-pair) costs by the prompts (pairs) each measured. Per-position jobs pair every (prompt, measured position)
instead, from the prompts' position columns (`paired_positions`): each pair is a row, the per-prompt statistics are
per pair, and a prompt's pairs are resampled together in the error-on-CE bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from hydra_ablate_client.wire import (
    AttributionSummary,
    EstimateAgreement,
    EstimateCost,
    EstimateError,
    Estimates,
    PairResult,
    PatchEstimates,
    PromptResult,
)
from worker.attribution_summary import DEFAULT_TOP_K, Paired, agreement, cost_table, hydra_link
from worker.engine.attribution import ESTIMATED
from worker.engine.attribution import MethodCost as EngineCost
from worker.position_summary import column


def _estimates(prompt: PromptResult) -> Estimates:
    if prompt.estimates is None:
        raise ValueError(f"prompt {prompt.index} of a job with estimates has none")
    return prompt.estimates


def methods_of(prompts: Sequence[PromptResult]) -> list[str]:
    """The methods every prompt carries, in the engine's order."""
    first = _estimates(prompts[0])
    return [m for m in ESTIMATED if getattr(first, m) is not None]


def paired(prompts: Sequence[PromptResult], components: Sequence[str]) -> Paired:
    """The (P, C) arrays of the exact measures and of every method's estimates, in result order."""
    methods = methods_of(prompts)
    rows = [_estimates(p) for p in prompts]

    def array(values: list[list[float]]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(len(prompts), len(components))

    return Paired(
        indices=[p.index for p in prompts],
        components=list(components),
        total_effect=array([p.total_effect for p in prompts]),
        abs_total_effect=array([e.abs_total_effect for e in rows]),
        compensatory_effect=array([p.compensatory_effect for p in prompts]),
        norm_response=array([p.norm_response for p in prompts]),
        estimates={m: array([getattr(e, m) for e in rows]) for m in methods},
        compared_with={m: ESTIMATED[m] for m in methods},
    )


def paired_positions(prompts: Sequence[PromptResult], components: Sequence[str]) -> Paired:
    """The (pairs, C) arrays of a per-position job: one row per (prompt, measured position), prompt-major."""
    first = prompts[0].positions
    if first is None or first.atp is None:
        raise ValueError(f"prompt {prompts[0].index} of a per-position job with estimates has no position estimates")
    methods = [m for m in ESTIMATED if getattr(first, m) is not None]
    n = len(components)
    kept = [p for p in prompts if p.positions is not None]

    def array(name: str) -> np.ndarray:
        parts = []
        for p in kept:
            assert p.positions is not None
            if getattr(p.positions, name) is None:
                raise ValueError(f"prompt {p.index} of a per-position job with estimates has no {name}")
            parts.append(column(p.positions, name, n).numpy().T)  # (P, C)
        return np.concatenate(parts, axis=0)

    return Paired(
        indices=[p.index for p in kept for _ in p.positions.positions],  # type: ignore[union-attr]
        components=list(components),
        total_effect=array("total_effect"),
        abs_total_effect=array("abs_total_effect"),
        compensatory_effect=array("compensatory_effect"),
        norm_response=array("norm_response"),
        estimates={m: array(m) for m in methods},
        compared_with={m: ESTIMATED[m] for m in methods},
        positions=[q for p in kept for q in p.positions.positions],  # type: ignore[union-attr]
    )


def merged_costs(chunks: Sequence[tuple[int, list[EstimateCost]]]) -> dict[str, EngineCost]:
    """Per method, the per-prompt cost averaged over the chunks weighted by their measured prompts."""
    weights: dict[str, float] = {}
    sums: dict[str, np.ndarray] = {}
    for n_prompts, costs in chunks:
        for c in costs:
            values = np.array([c.forward_passes, c.backward_passes, c.seconds], dtype=np.float64)
            sums[c.method] = sums.get(c.method, np.zeros(3)) + n_prompts * values
            weights[c.method] = weights.get(c.method, 0.0) + n_prompts
    return {
        method: EngineCost(*(float(v) for v in total / weights[method])) if weights[method] else EngineCost(0, 0, 0)
        for method, total in sums.items()
    }


def summarise_estimates(
    prompts: Sequence[PromptResult],
    components: Sequence[str],
    chunk_costs: Sequence[tuple[int, list[EstimateCost]]],
    *,
    seed: int = 0,
    k: int = DEFAULT_TOP_K,
) -> AttributionSummary:
    """Agreement per method, the cost table (the exact engine first) and, per method and component, the error beside
    CE and the norm's response with the error regressed on CE across prompts (the service's seeded bootstrap)."""
    per_position = any(p.positions is not None for p in prompts)
    pairs = paired_positions(prompts, components) if per_position else paired(prompts, components)
    methods = list(pairs.estimates)
    return AttributionSummary(
        methods=methods,
        agreement=_agreements(pairs, k),
        cost=_cost_rows(methods, chunk_costs),
        errors=[msgspec.convert(row, EstimateError, from_attributes=True)
                for m in methods for row in hydra_link(pairs, m, seed)],
    )


def _agreements(pairs: Paired, k: int) -> list[EstimateAgreement]:
    return [
        msgspec.convert(
            agreement(m, pairs.compared_with[m], pairs.exact_for(m), pairs.estimates[m], pairs.components,
                      pairs.indices, k=k, positions=pairs.positions),
            EstimateAgreement, from_attributes=True,
        )
        for m in pairs.estimates
    ]


def _cost_rows(methods: Sequence[str], chunk_costs: Sequence[tuple[int, list[EstimateCost]]]) -> list[EstimateCost]:
    costs = merged_costs(chunk_costs)
    exact = costs.pop("exact")
    return [msgspec.convert(row, EstimateCost, from_attributes=True)
            for row in cost_table({m: costs[m] for m in methods if m in costs}, exact)]


# --------------------------------------------------------------------------------------------------------------------
# Patching jobs
# --------------------------------------------------------------------------------------------------------------------


def _pair_estimates(pair: PairResult) -> PatchEstimates:
    if pair.estimates is None:
        raise ValueError(f"pair {pair.index} of a job with estimates has none")
    return pair.estimates


def patch_columns(pairs: Sequence[PairResult], sites: Sequence[str], positions: str) -> tuple[list[str], list[int]]:
    """The agreement's components of a patching job and, per pair, nothing but which position column each takes:
    the sites at the final position; with positions "all", every (site, position) that every pair has, named
    "site@position" (pairs of different lengths share their first positions)."""
    if positions != "all":
        return list(sites), [0]
    common = sorted(set.intersection(*(set(p.positions) for p in pairs))) if pairs else []
    return [f"{site}@{position}" for site in sites for position in common], common


def patch_paired(pairs: Sequence[PairResult], sites: Sequence[str], positions: str) -> Paired:
    """(P, C) arrays of a patching job: the exact change of the metric (patched − base) and its magnitude beside
    every method's estimate, C = sites (× positions). Patching has no compensatory effect or norm response: those
    arrays are NaN (and no error is regressed on them)."""
    names, columns = patch_columns(pairs, sites, positions)
    rows = [_pair_estimates(p) for p in pairs]
    methods = [m for m in ESTIMATED if getattr(rows[0], m) is not None]

    def flat(pair: PairResult, grid: list[list[float]]) -> list[float]:
        if positions != "all":
            return [row[0] for row in grid]
        where = [pair.positions.index(q) for q in columns]
        return [row[c] for row in grid for c in where]

    def array(values: list[list[float]]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(len(pairs), len(names))

    effect = array([flat(p, e.effect) for p, e in zip(pairs, rows, strict=True)])
    missing = np.full_like(effect, np.nan)
    return Paired(
        indices=[p.index for p in pairs],
        components=names,
        total_effect=effect,
        abs_total_effect=np.abs(effect),
        compensatory_effect=missing,
        norm_response=missing,
        estimates={m: array([flat(p, getattr(e, m)) for p, e in zip(pairs, rows, strict=True)]) for m in methods},
        compared_with={m: ESTIMATED[m] for m in methods},
    )


def summarise_patch_estimates(
    pairs: Sequence[PairResult],
    sites: Sequence[str],
    positions: str,
    chunk_costs: Sequence[tuple[int, list[EstimateCost]]],
    *,
    seed: int = 0,
    k: int = DEFAULT_TOP_K,
) -> AttributionSummary:
    """A patching job's estimates against its exact patches: agreement per method over pairs × sites (× positions),
    and the cost table per pair (the exact engine first). `errors` is empty: patching measures no compensatory
    effect to regress the miss on. `seed` is unused (no bootstrap), kept for the ablation summary's signature."""
    del seed
    paired_ = patch_paired(pairs, sites, positions)
    methods = list(paired_.estimates)
    return AttributionSummary(methods=methods, agreement=_agreements(paired_, k), cost=_cost_rows(methods, chunk_costs),
                              errors=[])
