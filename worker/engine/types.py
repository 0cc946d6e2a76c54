"""Inputs and outputs of the ablation engine: plain tensors and lists, no Redis, no HTTP.

The definitions of every field are in docs/concepts/definitions.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The option lists are the service's (one definition, stdlib only: clients/python/hydra_ablate_client/vocabulary.py).
from hydra_ablate_client.vocabulary import (
    AblationKind,
    MeasurePositions,
    MetricName,
    NormScaleMode,
    PositionScope,
    ResampleFrom,
    ResampleSources,
    ResponseBasisName,
    TargetName,
)
from worker.engine.measures import compensatory_effect

__all__ = [
    "DrawMeasures",
    "PositionMeasures",
    "PositionSweepResult",
    "PromptMeasures",
    "SweepInputs",
    "SweepResult",
    "SweepSpec",
]


@dataclass(frozen=True)
class SweepSpec:
    """What to ablate and how to measure it; components are explicit names (attn.L, mlp.L, head.L.H)."""

    components: tuple[str, ...]
    ablation: AblationKind = "resample"
    positions: PositionScope = "final"
    metric: MetricName = "logit"
    norm_scale: NormScaleMode = "clean"
    resample_samples: int = 1
    resample_from: ResampleFrom = "next"
    # "different_target": each prompt's sources are prompts whose clean top token differs from its target.
    resample_sources: ResampleSources = "any"
    seed: int = 0
    # Independent draws of `resample_samples` sources per prompt, drawn with seeds seed, seed + 1, …: every measure
    # is averaged over all draws' runs, and each draw's own means are kept too (PromptMeasures.draws).
    source_seeds: int = 1
    keep_samples: bool = False  # also return every resample patch's TE, DE and ablated profile
    only_correct: bool = False  # measure only prompts whose clean top token is their target (`target_ids`)
    # Per-position measurement (worker/engine/position_sweep.py; docs/concepts/definitions.md, "Every position").
    measure_positions: MeasurePositions = "final"
    target: TargetName = "clean_top"  # given target_ids win over "clean_top"
    # Responses per layer component, or per head and MLP ("heads"): for final-position sweeps too.
    response_basis: ResponseBasisName = "layers"
    # Joint knockouts: each set of explicit component names is ablated together in one run and measured like one
    # component, named by its members joined with "+" (after `components` in the results).
    knockouts: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class SweepInputs:
    """Tokenised prompts (1-D LongTensors, no padding) and optional per-prompt targets."""

    token_ids: list[torch.Tensor]
    target_ids: list[int] | None = None
    counterfactual_ids: list[int] | None = None
    mean_reference_ids: list[torch.Tensor] | None = None  # prompts whose mean activation defines `mean` ablation
    # Measure only these prompts (a chunk of a larger job); the others still serve as resample sources and means.
    measure_indices: list[int] | None = None
    # Resample groups: prompt i takes its sources among the prompts of its own group (e.g. the same relation).
    resample_groups: list[int] | None = None


@dataclass
class PatchSample:
    """One ablated run (one resample source, or the single mean/zero run) of one prompt and component."""

    source: int | None
    total_effect: float
    direct_effect: float
    profile: list[float]  # Δ̃unembed(k, l): every layer component's direct effect in the ablated run (attn.L,
    # mlp.L, whatever the response basis)
    ablated_unembed_effect: float = 0.0  # Δ̃unembed(k, k) of this run, read with the clean final-norm scale


@dataclass
class DrawMeasures:
    """One draw's means (its `resample_samples` runs) of the measures the summary regresses; lists per component."""

    seed: int
    sources: list[int]
    total_effect: list[float]
    direct_effect: list[float]
    compensatory_effect: list[float]
    compensatory_effect_attn: list[float]  # CE's attention part: downstream attention responses summed
    compensatory_effect_mlp: list[float]
    norm_response: list[float]


@dataclass
class PromptMeasures:
    """Every measure for one prompt; lists over `SweepSpec.components` (outer) and the response basis (inner)."""

    target_id: int
    clean_metric: float
    top2_gap: float  # clean logit(top-1) − logit(top-2): small gaps flag near-tied targets
    total_effect: list[float]
    direct_effect: list[float]
    compensation: list[float]
    response: list[list[float]]  # [component][entry of the response basis]
    norm_response: list[float]
    clean_direct_effect: list[float]  # over the response basis
    sources: list[int] = field(default_factory=list)  # resample sources used for this prompt (empty otherwise)
    # The paper's measures (docs/concepts/definitions.md, "The paper's measures"); per component.
    unembed_effect: list[float] = field(default_factory=list)  # Δunembed of the ablated component (Eq. 10)
    compensatory_effect: list[float] = field(default_factory=list)  # CE (Eq. 33–34), norm excluded
    # Δ̃unembed(k, k): the ablated component's own write onto the target in the ablated run (clean final-norm
    # scale), mean over the runs: how much of Δunembed the ablation left in place (0 for a perfect ablation).
    ablated_unembed_effect: list[float] = field(default_factory=list)
    samples: list[list[PatchSample]] | None = None  # [component][patch], when `keep_samples`
    index: int = -1  # the prompt's index in the job (prompts may be left out by `only_correct`)
    # Soft-capped models (Gemma 2) only: TE of the same metric read on the capped logits; every other measure is
    # read on the pre-cap logits (docs/concepts/definitions.md, "Final-logit soft-capping"). None for other models.
    capped_total_effect: list[float] | None = None
    # With `source_seeds` > 1: each draw's own means, in seed order (None with a single draw).
    draws: list[DrawMeasures] | None = None


@dataclass
class SweepResult:
    components: list[str]
    response_basis: list[str]  # layers: attn.0, mlp.0, attn.1, ...; heads: head.0.0, ..., mlp.0, head.1.0, ...
    prompts: list[PromptMeasures]


@dataclass
class PositionMeasures:
    """Every measure of one prompt at each measured position (the last axis, P); C components, R basis entries."""

    positions: list[int]  # the measured positions, as indices into the tokens the model read
    target_ids: torch.Tensor  # (P,) long
    clean_metric: torch.Tensor  # (P,)
    top2_gap: torch.Tensor  # (P,) clean logit(top-1) − logit(top-2)
    total_effect: torch.Tensor  # (C, P)
    direct_effect: torch.Tensor  # (C, P)
    unembed_effect: torch.Tensor  # (C, P): the ablated component's clean direct effect onto the target
    ablated_unembed_effect: torch.Tensor  # (C, P): its own write onto the target in the ablated run (clean scale)
    compensation: torch.Tensor  # (C, P)
    response: torch.Tensor  # (C, R, P)
    norm_response: torch.Tensor  # (C, P)
    clean_direct_effect: torch.Tensor  # (R, P)
    sources: list[int] = field(default_factory=list)
    # Soft-capped models (Gemma 2) only: TE read on the capped logits at every position (C, P); None otherwise.
    capped_total_effect: torch.Tensor | None = None

    @property
    def compensatory_effect(self) -> torch.Tensor:
        """(C, P): the paper's CE at every position (worker/engine/measures.py, one definition for both engines)."""
        return compensatory_effect(self.response.movedim(1, -1))


@dataclass
class PositionSweepResult:
    components: list[str]
    response_basis: list[str]  # layers: attn.0, mlp.0, ...; heads: head.0.0, ..., mlp.0, head.1.0, ...
    prompts: list[PositionMeasures]
