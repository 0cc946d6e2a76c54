"""Attribution-patching estimates in a per-position ablation job: computed beside a chunk's per-position sweep, on the
same prompts, targets, resample sources and clean runs (worker/engine/position_attribution.py), and attached to its
prompts' position columns.

The per-position counterpart of worker/estimate_jobs.py (which final-position jobs use), free of Redis and Celery
like worker/chunk_execution.py, which calls it. Each prompt's position columns get `atp` (and `atp_qkfix`,
`atp_star`) and `abs_total_effect` per (component, measured position); its per-prompt `estimates` hold the last
measured position, as every per-prompt list of a per-position result does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import torch

from hydra_ablate_client.wire import EstimateCost, Estimates, JobSpec, PromptResult
from worker.engine.position_attribution import PositionPromptEstimates, run_position_attribution
from worker.engine.sweep import StopCheck
from worker.engine.types import PositionSweepResult, SweepInputs
from worker.estimate_jobs import chunk_costs, run_chunk_estimates
from worker.job_runner import float32_bytes
from worker.model_cache import LoadedModel


@dataclass(frozen=True)
class PositionChunkEstimates:
    by_index: dict[int, tuple[PositionPromptEstimates, torch.Tensor]]  # prompt index → estimates, |TE| (C, P)
    costs: list[EstimateCost]  # per prompt of this chunk: the exact engine first, then each method


def estimate_position_chunk(
    loaded: LoadedModel,
    spec: JobSpec,
    inputs: SweepInputs,
    sweep: PositionSweepResult,
    measure: Sequence[int],
    exact_seconds: float,
    *,
    should_stop: StopCheck | None = None,
) -> PositionChunkEstimates:
    """The estimates of the chunk's prompts (`measure`, in the order of `sweep.prompts`), on the clean runs the sweep
    left in the model's cache. `exact_seconds`: the per-position sweep's time."""
    result = run_chunk_estimates(run_position_attribution, loaded, spec, inputs, sweep.components, should_stop)
    estimated = {p.index: p for p in result.prompts}
    by_index = {}
    for i, measures in zip(measure, sweep.prompts, strict=True):
        p = estimated.get(i)
        if p is None or p.positions != measures.positions or p.target_ids != measures.target_ids.tolist():
            raise RuntimeError(f"the estimates of prompt {i} measured other positions or targets than the sweep")
        magnitude = measures.abs_total_effect
        if magnitude is None:
            raise RuntimeError("the per-position sweep kept no |total_effect| for the estimates")
        by_index[i] = (p, magnitude)
    costs = chunk_costs(spec, len(sweep.components), len(result.prompts), exact_seconds, result.cost)
    return PositionChunkEstimates(by_index=by_index, costs=costs)


def attach_position_estimates(prompts: Sequence[PromptResult], estimated: PositionChunkEstimates) -> None:
    """Each prompt's estimates into its position columns, and its last measured position's into `estimates`."""
    for prompt in prompts:
        if prompt.positions is None:
            raise ValueError(f"prompt {prompt.index} of a per-position job has no position columns")
        p, magnitude = estimated.by_index[prompt.index]
        values = {m: p.values.get(m) for m in ("atp", "atp_qkfix", "atp_star")}
        prompt.positions = msgspec.structs.replace(
            prompt.positions,
            **{m: None if v is None else float32_bytes(v) for m, v in values.items()},
            abs_total_effect=float32_bytes(magnitude),
        )
        last = {m: None if v is None else v[:, -1].tolist() for m, v in values.items()}
        prompt.estimates = Estimates(
            atp=last["atp"] or [], atp_qkfix=last["atp_qkfix"], atp_star=last["atp_star"],
            abs_total_effect=magnitude[:, -1].tolist(),
        )
