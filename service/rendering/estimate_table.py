"""What a job page shows of a job's attribution-patching estimates: per method its agreement with the exact effect
(rank correlations, recall of the exact top-k, mean |error|) beside its cost, the largest misses, how much of each
component's miss goes with the compensatory effect (the result's `errors`), and what a verification set or a
per-position job changes in how to read them.

One view model for every kind of job with estimates: a final-position ablation job (`summary.attribution`, rows
per prompt), a patching job (`patching.attribution`, rows per pair) and a per-position ablation job
(`summary.attribution` over (prompt, position) pairs, `EstimateAgreement.n_pairs` set). The page's template
(service/api/ui/templates/estimates.html.jinja) formats the numbers; nothing here recomputes a statistic, so the page
shows what the result carries, as `hydra-ablate result` does (cli/estimate_views.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hydra_ablate_client.wire import (
    AttributionSummary,
    EstimateAgreement,
    EstimateCost,
    EstimateError,
    EstimateMiss,
    JobResult,
    Verification,
)

MISSES_SHOWN = 5  # per method; the result carries up to 10 (the JSON download has them all)
ERRORS_SHOWN = 10  # components per method, by |mean error|; the result carries every component's
LABELS = {"atp": "AtP", "atp_qkfix": "AtP (QK fix)", "atp_star": "AtP*"}
# What each method is compared with (EstimateAgreement.compared_with), in words: an ablation job's total effect; a
# patching job's exact effect of the patch (patched − base metric), under the same two names.
ABLATION_TRUTH = {"total_effect": "total effect", "abs_total_effect": "|total effect|"}
PATCHING_TRUTH = {"total_effect": "effect of the patch", "abs_total_effect": "|effect of the patch|"}


@dataclass(frozen=True)
class MethodRow:
    label: str  # "AtP", "AtP*", …
    compared_with: str  # in words
    agreement: EstimateAgreement
    cost: EstimateCost | None  # per prompt (pair); None when the cost table lacks the method


@dataclass(frozen=True)
class MissRow:
    label: str  # the method's
    miss: EstimateMiss


@dataclass(frozen=True)
class ErrorRow:
    label: str  # the method's
    error: EstimateError


@dataclass(frozen=True)
class PerPosition:
    """A per-position job: the agreement's rows are (prompt, measured position) pairs."""

    n_pairs: int
    n_prompts: int
    n_components: int
    miss_positions: list[int]  # the measured positions of the misses shown, each once, in order


@dataclass(frozen=True)
class EstimateTable:
    unit: str  # what a row of the per-row statistics is: "prompt", "pair" or "(prompt, position) pair"
    item: str  # the misses' index column: "Prompt" or "Pair"
    k: int | None  # the top-k of the recalls, when every method shares it (it does: min(k, components))
    methods: list[MethodRow]
    exact_cost: EstimateCost | None  # the exact engine's, per prompt (pair)
    misses: list[MissRow]  # up to MISSES_SHOWN per method, method by method
    misses_shown: int  # the most misses shown per method
    misses_carried: int  # the most misses any method carries
    per_position: PerPosition | None
    verification: Verification | None  # jobs with verify: agreement and cost cover the verified components only
    # Per method, the components with the largest |mean error| (estimate − exact) beside TE, CE and the norm's
    # response, with the error regressed on CE; empty for patching jobs (no CE).
    errors: list[ErrorRow]
    errors_shown: int  # the most components shown per method
    errors_carried: int  # the components per method the result carries
    ci_level: float | None  # the slope intervals' level (the service's, one for every fit); None without errors


def attribution_of(result: JobResult) -> AttributionSummary | None:
    """The result's estimates block: a patching job's under `patching`, an ablation job's under `summary`."""
    return result.patching.attribution if result.patching is not None else result.summary.attribution


def largest_errors(errors: list[EstimateError], shown: int) -> list[EstimateError]:
    """Per method, in the result's method order, its `shown` components with the largest |mean error| (ties: the
    result's component order)."""
    methods = list(dict.fromkeys(e.method for e in errors))
    return [
        e
        for method in methods
        for e in sorted((e for e in errors if e.method == method), key=lambda e: -abs(e.error_mean))[:shown]
    ]


def estimate_table(
    result: JobResult, misses_shown: int = MISSES_SHOWN, errors_shown: int = ERRORS_SHOWN
) -> EstimateTable | None:
    """The page's view of the job's estimates; None for a job without them."""
    block = attribution_of(result)
    if block is None or not block.agreement:
        return None
    patching = result.patching is not None
    truth = PATCHING_TRUTH if patching else ABLATION_TRUTH
    costs = {c.method: c for c in block.cost}
    pairs = [a for a in block.agreement if a.n_pairs is not None]
    per_position = None
    if pairs:  # every method's rows are the same pairs; the first names them
        first = pairs[0]
        shown_positions = [m.position for a in pairs for m in a.largest_misses[:misses_shown] if m.position is not None]
        per_position = PerPosition(
            n_pairs=first.n_pairs or 0,
            n_prompts=first.n_prompts,
            n_components=first.n_components,
            miss_positions=sorted(set(shown_positions)),
        )
    ks = {a.k for a in block.agreement}
    carried = max(len(a.largest_misses) for a in block.agreement)
    per_method = Counter(e.method for e in block.errors)
    errors = largest_errors(block.errors, errors_shown)
    return EstimateTable(
        unit="(prompt, position) pair" if per_position else "pair" if patching else "prompt",
        item="Pair" if patching else "Prompt",
        k=ks.pop() if len(ks) == 1 else None,
        methods=[
            MethodRow(
                LABELS.get(a.method, a.method), truth.get(a.compared_with, a.compared_with), a, costs.get(a.method)
            )
            for a in block.agreement
        ],
        exact_cost=costs.get("exact"),
        misses=[
            MissRow(LABELS.get(a.method, a.method), m) for a in block.agreement for m in a.largest_misses[:misses_shown]
        ],
        misses_shown=min(misses_shown, carried),
        misses_carried=carried,
        per_position=per_position,
        verification=block.verification,
        errors=[ErrorRow(LABELS.get(e.method, e.method), e) for e in errors],
        errors_shown=min(errors_shown, max(per_method.values(), default=0)),
        errors_carried=max(per_method.values(), default=0),
        ci_level=errors[0].error_vs_ce.ci_level if errors else None,
    )
