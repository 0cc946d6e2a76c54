"""A patching job (intervention "patch") through the engine: one chunk per range of pairs, and the merge.

Free of Redis and Celery, like worker/chunk_execution.py, which dispatches here. Pairs are independent (no pair is
another's source), so a chunk is just its pairs run by `run_patching`; the summary is computed once, over every
pair, at the merge. The pairs' clean and corrupted runs come from the model's clean-run cache
(worker/engine/clean.py) when an earlier chunk or job ran the same prompts. The engine's hooks are removed when it
returns or raises (worker/engine/hooks.py), so nothing stays registered on the cached model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
import torch

from hydra_ablate_client.wire import (
    EstimateCost,
    JobResult,
    JobSpec,
    PairResult,
    PatchEstimates,
    PatchingResult,
    PatchSummary,
    Provenance,
    Regression,
    Selection,
    Summary,
)
from service.core.chunk_book import ChunkResult
from worker.engine.attribution import MethodCost
from worker.engine.patch_attribution import PairEstimates, PatchAttributionResult, run_patch_attribution
from worker.engine.patching import PatchingCancelled, PatchPair, PatchSpec, patching_score, run_patching
from worker.engine.sweep import PhaseCallback, ProgressCallback, StopCheck, SweepCancelled
from worker.estimate_summary import summarise_patch_estimates
from worker.job_runner import JobInputError, provenance
from worker.model_cache import LoadedModel

ENGINE_NAME = "activation patching, resume-at-layer (worker/engine/patching.py)"
N_BOOT = 1000
CI_LEVEL = 0.95


def _one_token(loaded: LoadedModel, text: str, what: str, index: int) -> int:
    """The id of a one-token answer; JobInputError otherwise (the API refuses these on submit when it has the
    tokenizer)."""
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise JobInputError(
            f"pairs[{index}].{what} {text!r} is {len(ids)} tokens on this model; give a {what} that is one token"
        )
    return int(ids[0])


def patch_pairs(loaded: LoadedModel, spec: JobSpec, start: int, stop: int) -> list[PatchPair]:
    """Pairs start:stop of the job, tokenised as the worker tokenises prompts (with the model's special tokens)."""
    assert spec.corrupted is not None and spec.answers is not None and spec.counterfactuals is not None
    pairs = []
    for i in range(start, stop):
        clean = loaded.tokenizer(spec.prompts[i]).input_ids
        corrupted = loaded.tokenizer(spec.corrupted[i]).input_ids
        if len(clean) != len(corrupted):  # named by its index in the job (the engine counts within the chunk)
            raise JobInputError(
                f"pairs[{i}]: the clean prompt is {len(clean)} tokens long and the corrupted one {len(corrupted)}; "
                "patching aligns them position by position, so make them the same length"
            )
        pairs.append(
            PatchPair(
                clean_ids=torch.tensor(clean, dtype=torch.long, device=loaded.device),
                corrupted_ids=torch.tensor(corrupted, dtype=torch.long, device=loaded.device),
                answer_id=_one_token(loaded, spec.answers[i], "answer", i),
                counterfactual_id=_one_token(loaded, spec.counterfactuals[i], "counterfactual", i),
            )
        )
    return pairs


def patch_spec(spec: JobSpec) -> PatchSpec:
    return PatchSpec(
        sites=tuple(spec.components),
        direction=spec.direction,
        positions=spec.positions,
        metric="logit_diff",
        epsilon=spec.epsilon,
        knockouts=tuple(tuple(members) for members in spec.knockouts),  # reported after the sites, named "a+b"
    )


def execute_patch_chunk(
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
) -> ChunkResult:
    """Pairs `start:stop` of a patching job. Progress is reported in pairs × sites (the job's total), each pair's
    share spread over its patched positions."""
    if not 0 <= start < stop <= len(spec.prompts):
        raise ValueError(f"chunk {index} covers pairs {start}:{stop}, outside the job's {len(spec.prompts)}")
    started = time.perf_counter()
    pairs = patch_pairs(loaded, spec, start, stop)
    if on_phase is not None:
        on_phase("ablating")
    chunk_total = (stop - start) * (len(spec.components) + len(spec.knockouts))

    def progress(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(round(done / max(1, total) * chunk_total), chunk_total)

    exact_started = time.perf_counter()
    estimated: PatchAttributionResult | None = None
    try:
        result = run_patching(
            loaded.model, patch_spec(spec), pairs, on_progress=progress, should_stop=should_stop,
            cache=loaded.clean_runs,  # each prompt's pass once per worker, not once per chunk and job
        )
        exact_seconds = time.perf_counter() - exact_started
        if spec.estimates:
            estimated = run_patch_attribution(loaded.model, patch_spec(spec), pairs,
                                              estimates=tuple(spec.estimates), should_stop=should_stop)
    except PatchingCancelled as cancelled:
        raise SweepCancelled(str(cancelled)) from None  # the task's cancel path, as for ablation chunks
    assert spec.corrupted is not None and spec.answers is not None and spec.counterfactuals is not None
    results = [
        PairResult(
            index=start + k,
            clean=spec.prompts[start + k],
            corrupted=spec.corrupted[start + k],
            answer=spec.answers[start + k],
            counterfactual=spec.counterfactuals[start + k],
            answer_id=pair.answer_id,
            counterfactual_id=pair.counterfactual_id,
            clean_metric=measured.clean_metric,
            corrupted_metric=measured.corrupted_metric,
            flagged=measured.flagged,
            positions=measured.positions,
            patched_metric=measured.patched_metric,
            patching_score=measured.patching_score,
            clean_tokens=[str(loaded.tokenizer.decode([int(t)])) for t in pair.clean_ids.tolist()],
        )
        for k, (pair, measured) in enumerate(zip(pairs, result.pairs, strict=True))
    ]
    costs = None
    if estimated is not None:
        for pair_result, pair_estimates in zip(results, estimated.pairs, strict=True):
            pair_result.estimates = pair_estimates_of(pair_result, pair_estimates, spec.direction)
        costs = estimate_costs(results, estimated, exact_seconds)
    return ChunkResult(
        index=index,
        start=start,
        stop=stop,
        components=result.sites,
        response_basis=[],
        near_tie_gap=0.0,
        prompts=[],
        provenance=msgspec.structs.replace(provenance(loaded, spec, started), engine=ENGINE_NAME),
        pairs=results,
        estimate_costs=costs,
    )


def pair_estimates_of(pair: PairResult, estimated: PairEstimates, direction: str) -> PatchEstimates:
    """A pair's estimates beside its exact patches: the exact change (patched − base) and each method's estimate,
    and the estimated scores divided as the patching score is (null for a flagged pair, as the score is)."""
    base, source = (pair.corrupted_metric, pair.clean_metric) if direction == "denoise" else (
        pair.clean_metric, pair.corrupted_metric)
    gap = source - base

    def scores(grid: list[list[float]] | None, magnitude: bool) -> list[list[float | None]] | None:
        if grid is None:
            return None
        divisor = abs(gap) if magnitude else gap
        return [[None if pair.flagged else v / divisor for v in row] for row in grid]

    values = estimated.values
    return PatchEstimates(
        effect=[[v - base for v in row] for row in pair.patched_metric],
        atp=values["atp"],
        atp_qkfix=values.get("atp_qkfix"),
        atp_star=values.get("atp_star"),
        atp_score=scores(values["atp"], False) or [],
        atp_qkfix_score=scores(values.get("atp_qkfix"), False),
        atp_star_score=scores(values.get("atp_star"), True),
    )


def estimate_costs(
    pairs: list[PairResult], estimated: PatchAttributionResult, exact_seconds: float
) -> list[EstimateCost]:
    """Per pair of the chunk: the exact engine (the clean and corrupted runs and one patched run per site and
    position, as the paper counts activation patching) first, then each method."""
    n = max(len(pairs), 1)
    patched_runs = sum(len(p.patched_metric) * len(p.positions) for p in pairs) / n
    exact_row = {"exact": MethodCost(2.0 + patched_runs, 0.0, exact_seconds / n)}
    return [
        EstimateCost(method=method, model_evaluations=c.model_evaluations, forward_passes=c.forward_passes,
                     backward_passes=c.backward_passes, seconds=c.seconds, speedup=None)
        for method, c in {**exact_row, **estimated.cost}.items()
    ]


def _bootstrap_interval(scores: list[float], seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap of the mean over pairs (N_BOOT resamples, CI_LEVEL); None below two scores."""
    if len(scores) < 2:
        return None, None
    values = torch.tensor(scores, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(scores), (N_BOOT, len(scores)), generator=generator)
    means = values[draws].mean(dim=1)
    tail = (1 - CI_LEVEL) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(low), float(high)


def patch_summary(spec: JobSpec, sites: list[str], pairs: list[PairResult]) -> list[PatchSummary]:
    """Per site (and position, with positions "all"): the mean patching score with a bootstrap interval over the
    scored pairs, and the pooled score of the mean metrics over every pair that has the position."""
    columns: list[int | None] = [None]
    if spec.positions == "all":
        columns = [*sorted({p for pair in pairs for p in pair.positions})]
    summary = []
    for s, site in enumerate(sites):
        for position in columns:
            rows = [
                (pair, 0 if position is None else pair.positions.index(position))
                for pair in pairs
                if position is None or position in pair.positions
            ]
            if not rows:
                continue
            patched = [pair.patched_metric[s][c] for pair, c in rows]
            scores = [score for pair, c in rows if (score := pair.patching_score[s][c]) is not None]
            n = len(rows)
            clean = sum(pair.clean_metric for pair, _ in rows) / n
            corrupted = sum(pair.corrupted_metric for pair, _ in rows) / n
            low, high = _bootstrap_interval(scores, spec.seed)
            summary.append(
                PatchSummary(
                    site=site,
                    position=position,
                    n_pairs=n,
                    n_scored=len(scores),
                    patched_metric_mean=sum(patched) / n,
                    score_mean=sum(scores) / len(scores) if scores else None,
                    score_ci_low=low,
                    score_ci_high=high,
                    pooled_score=patching_score(sum(patched) / n, clean, corrupted, spec.direction, spec.epsilon),
                )
            )
    return summary


def _pairs_only_summary(n: int) -> Summary:
    """The ablation summary of a patching job: its counts, no components (PatchingResult holds the numbers)."""
    return Summary(
        n_prompts=n,
        selection=Selection(only_correct=False, n_candidates=n, n_kept=n),
        components=[],
        response_matrix=[],
        clean_direct_effect_mean=[],
        total_vs_direct=Regression(
            y="total_effect_mean", x="direct_effect_mean", slope=None, intercept=None, r2=None, n=0
        ),
        near_ties=0,
    )


def _joined(values: Sequence[str]) -> str:
    return ",".join(dict.fromkeys(values))  # distinct, in chunk order


def merge_patch_chunks(job_id: str, spec: JobSpec, chunks: Sequence[ChunkResult]) -> JobResult:
    """The JobResult of a patching job from all its chunks (any order): pairs in order, one summary over all."""
    ordered = sorted(chunks, key=lambda c: c.index)
    if not ordered:
        raise ValueError(f"job {job_id} has no chunk results to merge")
    expected = 0
    for chunk in ordered:
        indices = [p.index for p in chunk.pairs or []]
        if chunk.start != expected or indices != list(range(chunk.start, chunk.stop)):
            raise ValueError(f"chunk {chunk.index} of job {job_id} covers pairs {chunk.start}:{chunk.stop}, "
                             f"expected to start at {expected} with every pair of its range")
        expected = chunk.stop
    if expected != len(spec.prompts):
        raise ValueError(f"the chunks of job {job_id} cover {expected} of its {len(spec.prompts)} pairs")
    first = ordered[0]
    pairs = [pair for chunk in ordered for pair in chunk.pairs or []]
    merged_provenance = msgspec.structs.replace(
        first.provenance,
        worker=_joined([c.provenance.worker for c in ordered]),
        device=_joined([c.provenance.device for c in ordered]),
        elapsed_s=sum(c.provenance.elapsed_s for c in ordered),
    )
    assert isinstance(merged_provenance, Provenance)
    n = len(pairs)
    return JobResult(
        id=job_id,
        model=spec.model,
        components=first.components,
        response_basis=[],
        prompts=[],
        summary=_pairs_only_summary(n),
        provenance=merged_provenance,
        patching=PatchingResult(
            direction=spec.direction,
            positions=spec.positions,
            metric="logit_diff",
            epsilon=spec.epsilon,
            sites=first.components,
            pairs=pairs,
            summary=patch_summary(spec, first.components, pairs),
            n_flagged=sum(pair.flagged for pair in pairs),
            clean_metric_mean=sum(p.clean_metric for p in pairs) / n,
            corrupted_metric_mean=sum(p.corrupted_metric for p in pairs) / n,
            ci_level=CI_LEVEL,
            n_boot=N_BOOT,
            attribution=summarise_patch_estimates(
                pairs, first.components, spec.positions,
                [(len(c.pairs or []), c.estimate_costs or []) for c in ordered], seed=spec.seed,
            ) if spec.estimates else None,
        ),
    )
