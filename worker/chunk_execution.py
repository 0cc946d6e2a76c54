"""One chunk of a job (a contiguous range of its prompts) through the engine, and the merge of all chunks.

Free of Redis and Celery; the pieces (tokenisation, per-prompt results, provenance) are in worker/job_runner.py.
A job merged from chunks equals the job run in one piece (`execute`) up to float32 rounding (prompts batched
together share matrix products, so another split changes the last bits), because

- the engine measures only the chunk's prompts (`SweepInputs.measure_indices`) while every prompt of the job stays
  a resample source and part of the mean, and the resample pairing is drawn from the whole job's prompt count;
- floats travel through Redis as JSON, which msgspec writes as the shortest text that reads back to the same float;
- the summary is computed once, over all prompts, by the same `summarise`.

Prompts are tokenised lazily: a chunk tokenises only the prompts the engine touches (its own and their resample
sources, or every prompt for `mean` ablation over the job's own prompts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import cast

from hydra_ablate_client.wire import JobResult, JobSpec, PromptResult, Provenance
from service.core.chunk_book import ChunkResult
from worker.engine.position_sweep import run_position_sweep
from worker.engine.sweep import PhaseCallback, ProgressCallback, StopCheck, run_sweep
from worker.engine.types import PositionSweepResult, PromptMeasures, SweepResult
from worker.estimate_jobs import ChunkEstimates, PhaseClock, attach_estimates, estimate_chunk, exact_sweep_spec
from worker.estimate_summary import summarise_estimates
from worker.job_runner import (
    near_tie_gap,
    position_prompt_result,
    prompt_result,
    prompt_warnings,
    provenance,
    sweep_spec,
    tokenise_lazily,
)
from worker.model_cache import LoadedModel
from worker.patch_execution import execute_patch_chunk, merge_patch_chunks
from worker.position_estimates import PositionChunkEstimates, attach_position_estimates, estimate_position_chunk
from worker.position_summary import summarise_positions
from worker.summary import summarise
from worker.verify_jobs import merge_verified


def execute_chunk(
    job_id: str,
    spec: JobSpec,
    loaded: LoadedModel,
    index: int,
    start: int,
    stop: int,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    on_phase: PhaseCallback | None = None,
    batch_tokens: int | None = None,
) -> ChunkResult:
    """Prompts `start:stop` of the job, with every other prompt available as a source (see the module doc).

    `batch_tokens`: a fixed budget per batch in rows × prompt tokens (the worker's HYDRA_BATCH_TOKENS); None lets
    the engine derive it from the device (free CUDA memory and the model's size; 8192 on a CPU:
    worker/engine/memory.py)."""
    if spec.intervention == "patch":  # activation patching: its own engine and result (worker/patch_execution.py)
        return execute_patch_chunk(
            job_id, spec, loaded, index, start, stop, on_progress=on_progress, should_stop=should_stop,
            on_phase=on_phase,
        )
    if not 0 <= start < stop <= len(spec.prompts):
        raise ValueError(f"chunk {index} covers prompts {start}:{stop}, outside the job's {len(spec.prompts)}")
    started = time.perf_counter()
    measure = list(range(start, stop))
    gap = near_tie_gap(loaded)
    inputs = tokenise_lazily(loaded, spec, measure)
    estimated: ChunkEstimates | PositionChunkEstimates | None = None
    if spec.per_position:
        if on_phase is not None:  # the per-position engine reports no phases of its own
            on_phase("ablating")
        exact_started = time.perf_counter()
        sweep: SweepResult | PositionSweepResult = run_position_sweep(
            loaded.model,
            sweep_spec(spec),
            inputs,
            on_progress=on_progress,
            should_stop=should_stop,
            batch_tokens=batch_tokens,
            clean_cache=loaded.clean_runs,
        )
        if spec.estimates:  # the same prompts, targets, sources and clean runs, at every measured position
            assert isinstance(sweep, PositionSweepResult)
            estimated = estimate_position_chunk(
                loaded, spec, inputs, sweep, measure, time.perf_counter() - exact_started, should_stop=should_stop
            )
    else:
        clock = PhaseClock(on_phase)
        sweep = run_sweep(
            loaded.model,
            exact_sweep_spec(spec),
            inputs,
            on_progress=on_progress,
            should_stop=should_stop,
            batch_tokens=batch_tokens,
            on_phase=clock,
            clean_cache=loaded.clean_runs,
        )
        if spec.estimates:  # the same prompts, sources and clean runs: the estimates sit beside the exact values
            estimated = estimate_chunk(loaded, spec, inputs, sweep, clock.seconds(), should_stop=should_stop)
    if isinstance(sweep, PositionSweepResult):
        full = spec.position_responses == "full"
        prompts = [
            position_prompt_result(loaded, i, spec.prompts[i], m, gap, sweep.response_basis, full)
            for i, m in zip(measure, sweep.prompts, strict=True)
        ]
        if isinstance(estimated, PositionChunkEstimates):
            attach_position_estimates(prompts, estimated)
    else:
        # only_correct may leave prompts out: each result carries its index in the job.
        prompts = [
            prompt_result(loaded, spec.prompts[m.index], m, gap, prompt_warnings(loaded, spec, m.index))
            for m in sweep.prompts
        ]
        if isinstance(estimated, ChunkEstimates):
            attach_estimates(prompts, estimated, spec.keep_samples)
    return ChunkResult(
        index=index,
        start=start,
        stop=stop,
        components=sweep.components,
        response_basis=sweep.response_basis,
        near_tie_gap=gap,
        prompts=prompts,
        provenance=provenance(loaded, spec, started),
        estimate_costs=None if estimated is None else estimated.costs,
    )


class NoPromptKept(ValueError):
    """only_correct left out every prompt of the job: there is nothing to summarise (the job fails with this)."""


def _joined(values: Sequence[str]) -> str:
    return ",".join(dict.fromkeys(values))  # distinct, in chunk order


def merge_chunks(
    job_id: str,
    spec: JobSpec,
    chunks: Sequence[ChunkResult],
    *,
    before_summary: Callable[[list[PromptResult]], None] | None = None,
) -> JobResult:
    """The JobResult of the whole job from all its chunks (any order): prompts in order, one summary over all.

    Provenance is the first chunk's, with `worker` and `device` listing every distinct one used and `elapsed_s`
    the chunks' compute time summed. `before_summary` may amend the merged prompts before they are summarised (jobs
    with verify: worker/verify_jobs.py, which merges both phases through here).
    """
    if spec.intervention == "patch":
        return merge_patch_chunks(job_id, spec, chunks)
    if spec.verify is not None:
        return merge_verified(job_id, spec, chunks, merge_chunks)
    ordered = sorted(chunks, key=lambda c: c.index)
    if not ordered:
        raise ValueError(f"job {job_id} has no chunk results to merge")
    expected = 0
    for chunk in ordered:
        indices = [p.index for p in chunk.prompts]
        # only_correct leaves prompts out; otherwise a chunk holds every prompt of its range, in order.
        complete = indices == list(range(chunk.start, chunk.stop))
        inside = indices == sorted(set(indices)) and all(chunk.start <= i < chunk.stop for i in indices)
        if chunk.start != expected or not (complete or (spec.only_correct and inside)):
            raise ValueError(f"chunk {chunk.index} of job {job_id} covers prompts {chunk.start}:{chunk.stop}, "
                             f"expected to start at {expected} with {chunk.stop - chunk.start} prompts")
        expected = chunk.stop
    if expected != len(spec.prompts):
        raise ValueError(f"the chunks of job {job_id} cover {expected} of its {len(spec.prompts)} prompts")
    first = ordered[0]
    prompts = [p for chunk in ordered for p in chunk.prompts]
    if not prompts:
        raise NoPromptKept(
            f"only_correct kept none of the job's {len(spec.prompts)} prompts: the model's clean top token is never "
            "the first token of the answer"
        )
    if before_summary is not None:
        before_summary(prompts)
    # PromptResult carries every field summarise reads from PromptMeasures.
    sweep = SweepResult(
        components=first.components, response_basis=first.response_basis, prompts=cast(list[PromptMeasures], prompts)
    )
    # Prompts of a dataset are resampled by relation in the summary's bootstrap (its clusters).
    fields = spec.prompt_fields
    relations = None if fields is None or spec.per_position else [fields[p.index].relation for p in prompts]
    merged_provenance = Provenance(
        **{
            **{f: getattr(first.provenance, f) for f in first.provenance.__struct_fields__},
            "worker": _joined([c.provenance.worker for c in ordered]),
            "device": _joined([c.provenance.device for c in ordered]),
            "elapsed_s": sum(c.provenance.elapsed_s for c in ordered),
        }
    )
    summary = (
        summarise_positions(first.components, first.response_basis, prompts, first.near_tie_gap, seed=spec.seed)
        if spec.per_position
        else summarise(
            sweep, first.near_tie_gap, seed=spec.seed, n_candidates=len(spec.prompts),
            only_correct=spec.only_correct, relations=relations,
        )
    )
    if spec.estimates:
        summary.attribution = summarise_estimates(
            prompts, first.components, [(len(c.prompts), c.estimate_costs or []) for c in ordered], seed=spec.seed
        )
    return JobResult(
        id=job_id,
        model=spec.model,
        components=first.components,
        response_basis=first.response_basis,
        prompts=prompts,
        summary=summary,
        provenance=merged_provenance,
    )


def execute(
    job_id: str,
    spec: JobSpec,
    loaded: LoadedModel,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    batch_tokens: int | None = None,
) -> JobResult:
    """The whole job in one piece: one chunk covering every prompt, merged."""
    chunk = execute_chunk(
        job_id, spec, loaded, 0, 0, len(spec.prompts), on_progress=on_progress, should_stop=should_stop,
        batch_tokens=batch_tokens,
    )
    return merge_chunks(job_id, spec, [chunk])
