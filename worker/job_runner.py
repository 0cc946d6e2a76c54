"""Turns a resolved JobSpec into a JobResult: tokenise, run the engine, summarise, record provenance.

Free of Redis and Celery so that it can be tested and benchmarked on its own.
"""

from __future__ import annotations

import platform
import socket
import time
from importlib.metadata import PackageNotFoundError, version

import torch

from service.schemas import JobResult, JobSpec, PromptResult, Provenance
from worker.engine.sweep import ProgressCallback, StopCheck, run_sweep
from worker.engine.types import SweepInputs, SweepSpec
from worker.model_cache import LoadedModel
from worker.summary import summarise

ENGINE_NAME = "hooks-batched"
NEAR_TIE_GAP = {"float32": 1e-4, "float64": 1e-8}
REDUCED_PRECISION_NEAR_TIE_GAP = 0.05


class JobInputError(ValueError):
    """The job cannot run on this model (e.g. an answer that tokenises to nothing); reported as the job's error."""


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "gguf", "celery", "msgspec"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def _first_token(loaded: LoadedModel, text: str, what: str) -> int:
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise JobInputError(f"{what} {text!r} tokenises to no tokens")
    return int(ids[0])


def tokenise(loaded: LoadedModel, spec: JobSpec) -> SweepInputs:
    def encode(text: str) -> torch.Tensor:
        ids = loaded.tokenizer(text).input_ids
        if not ids:
            raise JobInputError(f"prompt {text!r} tokenises to no tokens")
        return torch.tensor(ids, dtype=torch.long, device=loaded.device)

    return SweepInputs(
        token_ids=[encode(p) for p in spec.prompts],
        target_ids=[_first_token(loaded, a, "answer") for a in spec.answers] if spec.answers else None,
        counterfactual_ids=(
            [_first_token(loaded, a, "counterfactual") for a in spec.counterfactuals] if spec.counterfactuals else None
        ),
        mean_reference_ids=[encode(p) for p in spec.mean_reference_prompts] if spec.mean_reference_prompts else None,
    )


def execute(
    job_id: str,
    spec: JobSpec,
    loaded: LoadedModel,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> JobResult:
    started = time.perf_counter()
    sweep_spec = SweepSpec(
        components=tuple(spec.components),
        ablation=spec.ablation,
        positions=spec.positions,
        metric=spec.metric,
        norm_scale=spec.norm_scale,
        resample_samples=spec.resample_samples,
        resample_from=spec.resample_from,
        seed=spec.seed,
    )
    sweep = run_sweep(loaded.model, sweep_spec, tokenise(loaded, spec), on_progress=on_progress, should_stop=should_stop)
    near_tie_gap = NEAR_TIE_GAP.get(loaded.dtype, REDUCED_PRECISION_NEAR_TIE_GAP)
    prompts = [
        PromptResult(
            prompt=text,
            target_id=m.target_id,
            target_token=loaded.tokenizer.decode([m.target_id]),
            clean_metric=m.clean_metric,
            top2_gap=m.top2_gap,
            near_tie=m.top2_gap < near_tie_gap,
            sources=m.sources,
            total_effect=m.total_effect,
            direct_effect=m.direct_effect,
            compensation=m.compensation,
            norm_response=m.norm_response,
            response=m.response,
            clean_direct_effect=m.clean_direct_effect,
        )
        for text, m in zip(spec.prompts, sweep.prompts, strict=True)
    ]
    provenance = Provenance(
        spec=spec,
        model_id=loaded.source.id,
        model_source=loaded.source.description,
        model_revision=loaded.revision,
        model_file_sha256=loaded.file_sha256,
        architecture=str(loaded.model.config.model_type),
        dtype=loaded.dtype,
        device=loaded.device,
        library_versions=_library_versions(),
        seed=spec.seed,
        engine=ENGINE_NAME,
        worker=socket.gethostname(),
        elapsed_s=time.perf_counter() - started,
    )
    return JobResult(
        id=job_id,
        model=spec.model,
        components=sweep.components,
        response_basis=sweep.response_basis,
        prompts=prompts,
        summary=summarise(sweep, near_tie_gap),
        provenance=provenance,
    )
