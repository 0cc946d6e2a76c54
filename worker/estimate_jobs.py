"""Attribution-patching estimates in an ablation job: computed beside a chunk's exact sweep, on the same prompts,
targets, resample sources and clean runs (worker/engine/attribution.py), and attached to its prompts' results.

Free of Redis and Celery, like worker/chunk_execution.py, which calls it. What a chunk's estimates cost is returned
per prompt, with the exact engine's time for the same components, so that the merge can weigh the chunks by their
prompts (worker/estimate_summary.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import numpy as np
from torch import nn

from hydra_ablate_client.vocabulary import EstimateName
from hydra_ablate_client.wire import EstimateCost, Estimates, JobSpec, PromptResult
from worker.attribution_summary import exact_cost
from worker.engine.attribution import MethodCost, run_attribution
from worker.engine.clean import CleanRunCache
from worker.engine.sweep import PhaseCallback, StopCheck
from worker.engine.types import SweepInputs, SweepResult, SweepSpec
from worker.job_runner import sweep_spec
from worker.model_cache import LoadedModel


def exact_sweep_spec(spec: JobSpec) -> SweepSpec:
    """The exact sweep's spec. With estimates and several ablated runs per component, every run's TE is kept:
    `atp_star` is a magnitude, compared with the mean over the runs of |TE| (not |mean TE|); the runs are dropped
    from the result again unless the job asked for them (`attach_estimates`)."""
    base = sweep_spec(spec)
    return replace(base, keep_samples=True) if spec.estimates and runs_per_component(spec) > 1 else base


class PhaseClock:
    """Passes the sweep's phases on and notes when the ablated runs start: the exact engine's own time, without the
    clean passes it shares with the estimates (as the estimates' costs leave them out too)."""

    def __init__(self, forward: PhaseCallback | None) -> None:
        self.forward = forward
        self.ablating_since: float | None = None

    def __call__(self, phase: str) -> None:
        if phase == "ablating" and self.ablating_since is None:
            self.ablating_since = time.perf_counter()
        if self.forward is not None:
            self.forward(phase)

    def seconds(self) -> float:
        return 0.0 if self.ablating_since is None else time.perf_counter() - self.ablating_since


@dataclass(frozen=True)
class ChunkEstimates:
    by_index: dict[int, Estimates]  # prompt index in the job → its estimates
    costs: list[EstimateCost]  # per prompt of this chunk: the exact engine first, then each method


def runs_per_component(spec: JobSpec) -> int:
    return spec.resample_samples * spec.source_seeds if spec.ablation == "resample" else 1


class _Estimated(Protocol):
    @property
    def nodes(self) -> list[str]: ...


EstimatedT_co = TypeVar("EstimatedT_co", bound=_Estimated, covariant=True)


class EstimateEngine(Protocol[EstimatedT_co]):
    """The engine's estimates of a sweep: `run_attribution` (final position) or `run_position_attribution`."""

    def __call__(
        self,
        model: nn.Module,
        spec: SweepSpec,
        inputs: SweepInputs,
        *,
        estimates: tuple[EstimateName, ...],
        clean_cache: CleanRunCache | None,
        should_stop: StopCheck | None,
    ) -> EstimatedT_co: ...


def run_chunk_estimates(
    engine: EstimateEngine[EstimatedT_co],
    loaded: LoadedModel,
    spec: JobSpec,
    inputs: SweepInputs,
    components: list[str],
    should_stop: StopCheck | None,
) -> EstimatedT_co:
    """`engine`'s estimates of the job's methods on the chunk's inputs, on the clean runs its exact sweep left in the
    model's cache; RuntimeError unless they are of the sweep's `components`, in its order."""
    result = engine(
        loaded.model,
        sweep_spec(spec),
        inputs,
        estimates=tuple(spec.estimates),
        clean_cache=loaded.clean_runs,
        should_stop=should_stop,
    )
    if result.nodes != components:
        raise RuntimeError(f"estimates of {result.nodes} for a sweep of {components}")
    return result


def estimate_chunk(
    loaded: LoadedModel,
    spec: JobSpec,
    inputs: SweepInputs,
    sweep: SweepResult,
    exact_seconds: float,
    *,
    should_stop: StopCheck | None = None,
) -> ChunkEstimates:
    """The estimates of the chunk's measured prompts (those of `sweep`), on the clean runs the sweep left in the
    model's cache. `exact_seconds`: the sweep's time from its first ablated run on."""
    result = run_chunk_estimates(run_attribution, loaded, spec, inputs, sweep.components, should_stop)
    measured = {m.index: m for m in sweep.prompts}
    if sorted(measured) != sorted(p.index for p in result.prompts):
        raise RuntimeError("the estimates measured other prompts than the exact sweep")
    by_index = {}
    for p in result.prompts:
        samples = measured[p.index].samples
        magnitude = (
            [float(np.mean([abs(s.total_effect) for s in runs])) for runs in samples]
            if samples
            else [abs(v) for v in measured[p.index].total_effect]
        )
        by_index[p.index] = Estimates(
            atp=p.values["atp"], atp_qkfix=p.values.get("atp_qkfix"), atp_star=p.values.get("atp_star"),
            abs_total_effect=magnitude,
        )
    costs = chunk_costs(spec, len(sweep.components), len(result.prompts), exact_seconds, result.cost)
    return ChunkEstimates(by_index=by_index, costs=costs)


def chunk_costs(
    spec: JobSpec, n_components: int, n_prompts: int, exact_seconds: float, methods: dict[str, MethodCost]
) -> list[EstimateCost]:
    """Per prompt of a chunk: the exact engine's cost (`exact_seconds` over the chunk's prompts), then each method's."""
    runs = runs_per_component(spec)
    noise = runs if spec.ablation == "resample" else 0
    exact = exact_cost(n_components, runs, noise, exact_seconds / max(n_prompts, 1))
    return [
        EstimateCost(method=method, model_evaluations=c.model_evaluations, forward_passes=c.forward_passes,
                     backward_passes=c.backward_passes, seconds=c.seconds, speedup=None)
        for method, c in {"exact": exact, **methods}.items()
    ]


def attach_estimates(prompts: Sequence[PromptResult], estimated: ChunkEstimates, keep_samples: bool) -> None:
    """Each prompt's estimates on its result; the runs kept only for the magnitudes dropped unless asked for."""
    for prompt in prompts:
        prompt.estimates = estimated.by_index[prompt.index]
        if not keep_samples:
            prompt.samples = None
