"""Jobs with `verify`: estimates of every component first, then the exact ablation of a verification set only.

Free of Redis and Celery, like worker/chunk_execution.py; worker/tasks.py runs the two phases as chunks:

- phase 1, chunks 0 … n-1: `estimate_only_chunk`, the estimates of every component on the chunk's prompts (a few
  model evaluations per prompt: no exact sweep);
- the chunk that completes phase 1 picks the verification set (`choose_verified`: the top-k by |mean estimate| of
  `ranked_method` plus a seeded random sample, worker/attribution_summary.py's `verification_set`) and sends
- phase 2, chunks n … 2n-1 over the same prompt ranges: the ordinary exact chunk of `exact_spec`, the job narrowed to
  the verified components (with their estimates again, so that the agreement pairs each with its exact value);
- the merge (`merge_verified`) builds the result of phase 2 and adds every prompt's estimates of every component
  (from phase 1, which also replace phase 2's for the verified components: one set of numbers) and the
  verification block with both phases' costs.

A verified component's exact numbers equal those of a plain job of just those components: the resample sources
depend on the job's seed and prompts, not on which components are swept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np

from hydra_ablate_client.wire import (
    ComponentEstimates,
    EstimateCost,
    JobResult,
    JobSpec,
    PhaseCost,
    PromptResult,
    Verification,
)
from service.core.chunk_book import ChunkResult, PromptEstimates
from worker.attribution_summary import exact_cost, verification_set
from worker.engine.attribution import run_attribution
from worker.engine.sweep import PhaseCallback, StopCheck
from worker.estimate_jobs import runs_per_component
from worker.job_runner import near_tie_gap, provenance, sweep_spec, tokenise_lazily
from worker.model_cache import LoadedModel

METHODS = ("atp", "atp_qkfix", "atp_star")


def ranked_method(spec: JobSpec) -> str:
    """The estimate that ranks the components: `atp` (signed, |mean| taken), or `atp_star` when only it was asked."""
    return "atp" if "atp" in spec.estimates else "atp_star"


def exact_spec(spec: JobSpec, verified: Sequence[str]) -> JobSpec:
    """The job narrowed to its verified components: what each phase-2 chunk runs."""
    return msgspec.structs.replace(spec, components=list(verified), verify=None)


def estimate_only_chunk(
    job_id: str,
    spec: JobSpec,
    loaded: LoadedModel,
    index: int,
    start: int,
    stop: int,
    *,
    should_stop: StopCheck | None = None,
    on_phase: PhaseCallback | None = None,
) -> ChunkResult:
    """Phase 1: the estimates of every component for prompts `start:stop` (every prompt stays a source)."""
    if not 0 <= start < stop <= len(spec.prompts):
        raise ValueError(f"chunk {index} covers prompts {start}:{stop}, outside the job's {len(spec.prompts)}")
    started = time.perf_counter()
    if on_phase is not None:
        on_phase("clean_passes")  # the estimates are clean and noise passes plus one backward pass
    inputs = tokenise_lazily(loaded, spec, list(range(start, stop)))
    result = run_attribution(
        loaded.model, sweep_spec(spec), inputs, estimates=tuple(spec.estimates), clean_cache=loaded.clean_runs,
        should_stop=should_stop,
    )
    if result.nodes != spec.components:
        raise RuntimeError(f"estimates of {result.nodes} for a job of {spec.components}")
    estimated = [
        PromptEstimates(
            index=p.index,
            estimates=ComponentEstimates(
                atp=p.values["atp"], atp_qkfix=p.values.get("atp_qkfix"), atp_star=p.values.get("atp_star")
            ),
        )
        for p in result.prompts
    ]
    costs = [
        EstimateCost(method=method, model_evaluations=c.model_evaluations, forward_passes=c.forward_passes,
                     backward_passes=c.backward_passes, seconds=c.seconds, speedup=None)
        for method, c in result.cost.items()
    ]
    return ChunkResult(
        index=index, start=start, stop=stop, components=list(spec.components), response_basis=[],
        near_tie_gap=near_tie_gap(loaded), prompts=[], provenance=provenance(loaded, spec, started),
        estimate_costs=costs, estimated=estimated,
    )


def _rows(chunks: Sequence[ChunkResult]) -> list[PromptEstimates]:
    rows = [row for chunk in sorted(chunks, key=lambda c: c.index) for row in (chunk.estimated or [])]
    return sorted(rows, key=lambda r: r.index)


def mean_estimates(spec: JobSpec, estimate_chunks: Sequence[ChunkResult]) -> list[float]:
    """Per component, the mean over the measured prompts of the ranking estimate."""
    method = ranked_method(spec)
    values = [getattr(row.estimates, method) for row in _rows(estimate_chunks)]
    if not values:
        return [0.0] * len(spec.components)
    return [float(v) for v in np.asarray(values, dtype=np.float64).mean(axis=0)]


def choose_verified(spec: JobSpec, estimate_chunks: Sequence[ChunkResult]) -> list[str]:
    """The verification set's component names, in the job's component order."""
    if spec.verify is None:
        raise ValueError("a job without verify has no verification set")
    chosen = verification_set(mean_estimates(spec, estimate_chunks), spec.verify.top, spec.verify.random, spec.seed)
    return [spec.components[i] for i in chosen]


def split_phases(chunks: Sequence[ChunkResult]) -> tuple[list[ChunkResult], list[ChunkResult]]:
    """(phase-1 estimate chunks, phase-2 exact chunks), each in index order."""
    ordered = sorted(chunks, key=lambda c: c.index)
    return [c for c in ordered if c.estimated is not None], [c for c in ordered if c.estimated is None]


def attach_all_estimates(
    spec: JobSpec, estimate_chunks: Sequence[ChunkResult], verified: Sequence[str]
) -> Callable[[list[PromptResult]], None]:
    """What the merge does to the exact phase's prompts before it summarises them: each gets its estimates of every
    component, and its estimates of the verified components are phase 1's (the same engine on the same inputs)."""
    by_index = {row.index: row.estimates for row in _rows(estimate_chunks)}
    columns = [spec.components.index(name) for name in verified]

    def attach(prompts: list[PromptResult]) -> None:
        for prompt in prompts:
            every = by_index.get(prompt.index)
            if every is None:
                raise ValueError(f"prompt {prompt.index} has exact values but no phase-1 estimates")
            prompt.all_estimates = every
            if prompt.estimates is None:
                continue
            for method in METHODS:
                values = getattr(every, method)
                if values is not None and getattr(prompt.estimates, method) is not None:
                    setattr(prompt.estimates, method, [values[c] for c in columns])

    return attach


def _per_prompt_evaluations(chunks: Sequence[ChunkResult], methods: set[str]) -> float:
    """The chunks' per-prompt model evaluations of `methods`, weighted by each chunk's measured prompts."""
    total, weight = 0.0, 0
    for chunk in chunks:
        n = len(chunk.estimated if chunk.estimated is not None else chunk.prompts)
        total += n * sum(c.model_evaluations for c in chunk.estimate_costs or [] if c.method in methods)
        weight += n
    return total / weight if weight else 0.0


def verification_block(
    spec: JobSpec, estimate_chunks: Sequence[ChunkResult], exact_chunks: Sequence[ChunkResult], verified: list[str]
) -> Verification:
    if spec.verify is None:
        raise ValueError("a job without verify has no verification block")
    methods = {c.method for chunk in estimate_chunks for c in chunk.estimate_costs or []}
    runs = runs_per_component(spec)
    noise = runs if spec.ablation == "resample" else 0
    phases = [
        PhaseCost(phase="estimates", n_components=len(spec.components),
                  model_evaluations_per_prompt=_per_prompt_evaluations(estimate_chunks, methods),
                  seconds=sum(c.provenance.elapsed_s for c in estimate_chunks)),
        PhaseCost(phase="exact", n_components=len(verified),
                  model_evaluations_per_prompt=_per_prompt_evaluations(exact_chunks, {"exact"}),
                  seconds=sum(c.provenance.elapsed_s for c in exact_chunks)),
    ]
    return Verification(
        ranked_by=ranked_method(spec), top=spec.verify.top, random=spec.verify.random, seed=spec.seed,
        components=list(spec.components), mean_estimates=mean_estimates(spec, estimate_chunks), verified=verified,
        phases=phases,
        exact_all_model_evaluations_per_prompt=exact_cost(len(spec.components), runs, noise, 0.0).model_evaluations,
    )


def merge_verified(
    job_id: str,
    spec: JobSpec,
    chunks: Sequence[ChunkResult],
    merge: Callable[..., JobResult],
) -> JobResult:
    """The JobResult of a job with verify from both phases' chunks; `merge` is chunk_execution's merge_chunks."""
    estimate_chunks, exact_chunks = split_phases(chunks)
    if not estimate_chunks or not exact_chunks:
        raise ValueError(f"job {job_id} has {len(estimate_chunks)} estimate and {len(exact_chunks)} exact chunks")
    verified = exact_chunks[0].components
    narrowed = exact_spec(spec, verified)
    result = merge(job_id, narrowed, exact_chunks, before_summary=attach_all_estimates(spec, estimate_chunks,
                                                                                        verified))
    result.provenance.spec = spec  # the job as submitted, not its phase 2
    # Phase 2's chunks start from their own clock; the job's compute time is both phases'.
    result.provenance.elapsed_s = sum(c.provenance.elapsed_s for c in chunks)
    if result.summary.attribution is not None:
        result.summary.attribution.verified = list(verified)
        result.summary.attribution.verification = verification_block(spec, estimate_chunks, exact_chunks,
                                                                     list(verified))
    return result
