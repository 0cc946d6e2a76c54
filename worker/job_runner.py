"""The pieces every run of a job shares: tokenising a JobSpec for the engine, per-prompt results, provenance.

Free of Redis and Celery. `worker/chunk_execution.py` runs a job (or a chunk of it) with these and merges chunks.
"""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import cast

import torch

from hydra_ablate_client.wire import JobSpec, PatchSample, PositionColumns, PromptResult, Provenance, SourceDraw
from worker.engine.errors import InputError
from worker.engine.types import PositionMeasures, PromptMeasures, SweepInputs, SweepSpec
from worker.model_cache import LoadedModel

ENGINE_NAME = "resume-at-layer (worker/engine/ablated_runs.py)"
NEAR_TIE_GAP = {"float32": 1e-4, "float64": 1e-8}
REDUCED_PRECISION_NEAR_TIE_GAP = 0.05


class JobInputError(InputError):
    """The job cannot run on this model (e.g. an answer that tokenises to nothing); reported as the job's error."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "gguf", "celery", "msgspec"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def first_token(loaded: LoadedModel, text: str, what: str) -> int:
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise JobInputError(f"{what} {text!r} tokenises to no tokens")
    return int(ids[0])


@dataclass
class _Lazy(Sequence):  # type: ignore[type-arg]
    """A list whose items are computed on first access (the engine reads only the prompts it needs)."""

    texts: list[str]
    make: Callable[[str], object]
    _cache: dict[int, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int | slice) -> object:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index not in self._cache:
            self._cache[index] = self.make(self.texts[index])
        return self._cache[index]


def tokenise_lazily(loaded: LoadedModel, spec: JobSpec, measure: list[int]) -> SweepInputs:
    """The job's SweepInputs over every prompt (tokenised on first use), measuring only `measure`."""

    def encode(text: str) -> torch.Tensor:
        ids = loaded.tokenizer(text).input_ids
        if spec.max_tokens is not None:
            ids = ids[: spec.max_tokens]  # documents are cut to their first max_tokens tokens
        if not ids:
            raise JobInputError(f"prompt {text!r} tokenises to no tokens")
        return torch.tensor(ids, dtype=torch.long, device=loaded.device)

    answers = spec.answers
    counterfactuals = spec.counterfactuals
    return SweepInputs(
        token_ids=cast(list[torch.Tensor], _Lazy(spec.prompts, encode)),
        target_ids=(
            cast(list[int], _Lazy(answers, lambda a: first_token(loaded, a, "answer"))) if answers else None
        ),
        counterfactual_ids=(
            cast(list[int], _Lazy(counterfactuals, lambda a: first_token(loaded, a, "counterfactual")))
            if counterfactuals
            else None
        ),
        mean_reference_ids=[encode(p) for p in spec.mean_reference_prompts] if spec.mean_reference_prompts else None,
        measure_indices=measure,
        resample_groups=spec.resample_groups if spec.resample_within == "relation" else None,
    )


def sweep_spec(spec: JobSpec) -> SweepSpec:
    return SweepSpec(
        components=tuple(spec.components),
        ablation=spec.ablation,
        positions=spec.positions,
        metric=spec.metric,
        norm_scale=spec.norm_scale,
        resample_samples=spec.resample_samples,
        resample_from=spec.resample_from,
        resample_sources=spec.resample_sources,
        seed=spec.seed,
        source_seeds=spec.source_seeds,
        keep_samples=spec.keep_samples,
        only_correct=spec.only_correct,
        measure_positions=spec.measure_positions,
        target=spec.target,
        response_basis=spec.response_basis,
        knockouts=tuple(tuple(members) for members in spec.knockouts),
    )


def near_tie_gap(loaded: LoadedModel) -> float:
    return NEAR_TIE_GAP.get(loaded.dtype, REDUCED_PRECISION_NEAR_TIE_GAP)


def truncation_warning(loaded: LoadedModel, text: str, what: str) -> str | None:
    """Targets are single tokens: say so when `text` tokenises to more, naming the token that is measured."""
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= 1:
        return None
    return (
        f"{what} {text!r} tokenises to {len(ids)} tokens; only its first token "
        f"{loaded.tokenizer.decode([int(ids[0])])!r} (id {int(ids[0])}) is measured"
    )


def prompt_warnings(loaded: LoadedModel, spec: JobSpec, index: int) -> list[str]:
    """What the numbers of prompt `index` do not show (see PromptResult.warnings)."""
    found = []
    for what, texts in (("answer", spec.answers), ("counterfactual", spec.counterfactuals)):
        if texts:
            warning = truncation_warning(loaded, texts[index], what)
            if warning is not None:
                found.append(warning)
    return found


def token_text(loaded: LoadedModel, token_id: int) -> str:
    """One token's text. `decode` of one id sequence is a str (transformers types it `str | list[str]`, the list
    being what a batch of sequences gives)."""
    return cast(str, loaded.tokenizer.decode([token_id]))


def prompt_result(
    loaded: LoadedModel, text: str, m: PromptMeasures, gap: float, warnings: list[str] | None = None
) -> PromptResult:
    """One prompt's measures as the API serves them."""
    return PromptResult(
        index=m.index,
        prompt=text,
        target_id=m.target_id,
        target_token=token_text(loaded, m.target_id),
        clean_metric=m.clean_metric,
        top2_gap=m.top2_gap,
        near_tie=m.top2_gap < gap,
        sources=m.sources,
        total_effect=m.total_effect,
        direct_effect=m.direct_effect,
        compensation=m.compensation,
        norm_response=m.norm_response,
        response=m.response,
        clean_direct_effect=m.clean_direct_effect,
        unembed_effect=m.unembed_effect,
        compensatory_effect=m.compensatory_effect,
        ablated_unembed_effect=m.ablated_unembed_effect,
        samples=None
        if m.samples is None
        else [
            [PatchSample(source=s.source, total_effect=s.total_effect, direct_effect=s.direct_effect, profile=s.profile,
                         ablated_unembed_effect=s.ablated_unembed_effect)
             for s in patches]
            for patches in m.samples
        ],
        capped_total_effect=m.capped_total_effect,
        warnings=warnings or [],
        draws=None
        if m.draws is None
        else [
            SourceDraw(
                seed=d.seed, sources=d.sources, total_effect=d.total_effect, direct_effect=d.direct_effect,
                compensatory_effect=d.compensatory_effect, compensatory_effect_attn=d.compensatory_effect_attn,
                compensatory_effect_mlp=d.compensatory_effect_mlp, norm_response=d.norm_response,
            )
            for d in m.draws
        ],
    )


def float32_bytes(values: torch.Tensor) -> bytes:
    """Little-endian float32, row-major: how per-position arrays travel and are stored."""
    return values.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()


def position_prompt_result(
    loaded: LoadedModel,
    index: int,
    text: str,
    m: PositionMeasures,
    gap: float,
    basis: list[str],
    full_responses: bool,
) -> PromptResult:
    """One prompt's per-position measures as the API serves them; the per-prompt lists hold the last position."""
    is_mlp = torch.tensor([name.startswith("mlp.") for name in basis])
    heads = m.response[:, ~is_mlp].sum(dim=1)
    mlps = m.response[:, is_mlp].sum(dim=1)
    last = int(m.target_ids[-1])
    return PromptResult(
        index=index,
        prompt=text,
        target_id=last,
        target_token=token_text(loaded, last),
        clean_metric=float(m.clean_metric[-1]),
        top2_gap=float(m.top2_gap[-1]),
        near_tie=bool(m.top2_gap[-1] < gap),
        sources=m.sources,
        total_effect=m.total_effect[:, -1].tolist(),
        direct_effect=m.direct_effect[:, -1].tolist(),
        compensation=m.compensation[:, -1].tolist(),
        norm_response=m.norm_response[:, -1].tolist(),
        response=[],  # per position in `positions` (split, or full with position_responses "full")
        clean_direct_effect=m.clean_direct_effect[:, -1].tolist(),
        unembed_effect=m.unembed_effect[:, -1].tolist(),
        compensatory_effect=m.compensatory_effect[:, -1].tolist(),
        ablated_unembed_effect=m.ablated_unembed_effect[:, -1].tolist(),
        capped_total_effect=None if m.capped_total_effect is None else m.capped_total_effect[:, -1].tolist(),
        positions=PositionColumns(
            positions=m.positions,
            target_ids=m.target_ids.tolist(),
            clean_metric=float32_bytes(m.clean_metric),
            top2_gap=float32_bytes(m.top2_gap),
            total_effect=float32_bytes(m.total_effect),
            direct_effect=float32_bytes(m.direct_effect),
            unembed_effect=float32_bytes(m.unembed_effect),
            compensation=float32_bytes(m.compensation),
            compensatory_effect=float32_bytes(m.compensatory_effect),
            response_heads=float32_bytes(heads),
            response_mlps=float32_bytes(mlps),
            norm_response=float32_bytes(m.norm_response),
            clean_direct_effect=float32_bytes(m.clean_direct_effect),
            response=float32_bytes(m.response) if full_responses else None,
            capped_total_effect=None if m.capped_total_effect is None else float32_bytes(m.capped_total_effect),
            ablated_unembed_effect=float32_bytes(m.ablated_unembed_effect),
        ),
    )


def provenance(loaded: LoadedModel, spec: JobSpec, started: float) -> Provenance:
    """What it takes to reproduce a run: the spec, the exact model, the software, the machine."""
    return Provenance(
        spec=spec,
        model_id=loaded.source.id,
        model_source=loaded.source.description,
        model_revision=loaded.revision,
        model_file_sha256=loaded.file_sha256,
        architecture=str(loaded.model.config.model_type),
        dtype=loaded.dtype,
        device=loaded.device,
        library_versions=library_versions(),
        seed=spec.seed,
        engine=ENGINE_NAME,
        worker=socket.gethostname(),
        elapsed_s=time.perf_counter() - started,
        model_about=loaded.source.about,
        model_licence=loaded.source.licence,
    )
