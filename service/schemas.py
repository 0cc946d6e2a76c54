"""The API's wire types (msgspec Structs): one source of truth for the API, the worker and the clients.

No torch here: the worker imports these to encode results; the API imports them to validate and serve.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
AblationKind = Literal["resample", "mean", "zero"]
PositionScope = Literal["final", "all"]
MetricName = Literal["logit", "centered_logit", "logprob", "logit_diff"]
NormScaleMode = Literal["clean", "ablated"]
ResampleFrom = Literal["next", "random"]
PresetName = Literal["hydra"]
ResampleWithin = Literal["job", "relation"]

Prompt = Annotated[str, Meta(min_length=1, max_length=4000)]
ComponentName = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^(attn|mlp|head)(\.\d+){0,2}(?![\s\S])")]


class DatasetRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A built-in prompt set, sliced; `relation` filters by Wikidata property (e.g. P36)."""

    name: Literal["known_1000"]
    limit: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    offset: Annotated[int, Meta(ge=0)] = 0
    relation: Annotated[str, Meta(pattern=r"^P\d+$")] | None = None
    use_answers: bool = False  # take the dataset's answers as targets instead of the clean top token


class JobRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """A job as submitted; unset fields come from the preset, then from the defaults."""

    preset: PresetName | UnsetType = UNSET
    model: Annotated[str, Meta(min_length=1, max_length=512)] | UnsetType = UNSET
    prompts: Annotated[list[Prompt], Meta(min_length=1, max_length=100_000)] | UnsetType = UNSET
    dataset: DatasetRef | UnsetType = UNSET
    answers: list[Prompt] | UnsetType = UNSET
    counterfactuals: list[Prompt] | UnsetType = UNSET
    components: Annotated[list[ComponentName], Meta(min_length=1, max_length=100_000)] | UnsetType = UNSET
    ablation: AblationKind | UnsetType = UNSET
    positions: PositionScope | UnsetType = UNSET
    metric: MetricName | UnsetType = UNSET
    norm_scale: NormScaleMode | UnsetType = UNSET
    resample_samples: Annotated[int, Meta(ge=1, le=64)] | UnsetType = UNSET
    resample_from: ResampleFrom | UnsetType = UNSET
    mean_reference: DatasetRef | UnsetType = UNSET
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] | UnsetType = UNSET
    # Return every resample patch's TE, DE and ablated per-layer profile (PromptResult.samples).
    keep_samples: bool | UnsetType = UNSET
    # Measure only prompts whose clean top token is the first token of their answer (the paper's selection).
    only_correct: bool | UnsetType = UNSET
    # Draw resample sources from the whole job, or from the prompts of the same dataset relation.
    resample_within: ResampleWithin | UnsetType = UNSET


class JobSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    """A job fully resolved: explicit prompts and component names, every option set. What the worker runs."""

    model: str
    prompts: list[str]
    answers: list[str] | None
    counterfactuals: list[str] | None
    components: list[str]
    ablation: AblationKind
    positions: PositionScope
    metric: MetricName
    norm_scale: NormScaleMode
    resample_samples: int
    resample_from: ResampleFrom
    mean_reference_prompts: list[str] | None
    seed: int
    preset: PresetName | None = None
    dataset: DatasetRef | None = None
    keep_samples: bool = False
    only_correct: bool = False
    resample_within: ResampleWithin = "job"
    resample_groups: list[int] | None = None  # per prompt, its relation's number (resample_within "relation")


class Progress(Struct):
    done: int
    total: int


class JobStatus(Struct, kw_only=True):
    id: str
    status: JobState
    model: str
    progress: Progress
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    owner: str | None = None  # the name of the API key that submitted the job ("local" with auth off)
    # What recovery did to a job that is still active (e.g. a chunk sent again after its worker vanished).
    note: str | None = None


class JobPage(Struct, kw_only=True):
    items: list[JobStatus]
    total: int
    offset: int
    limit: int


class ModelInfo(Struct, kw_only=True):
    id: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    vocab_size: int
    parallel_blocks: bool
    source: str


class Regression(Struct, kw_only=True):
    """Least-squares fit y = slope·x + intercept across prompts, labelled with what it regresses on what; nulls
    when x has no spread."""

    y: str  # the regressed quantity (a PromptResult field, or a part of one)
    x: str
    slope: float | None
    intercept: float | None
    r2: float | None
    n: int


class Fit(Regression, kw_only=True):
    """A Regression with a seeded percentile-bootstrap interval for the slope (prompts resampled with replacement)."""

    slope_ci_low: float | None
    slope_ci_high: float | None
    ci_level: float
    n_boot: int
    excludes_zero: bool | None  # the interval lies entirely above or below 0
    excludes_one: bool | None  # ... 1 (below 1: the repair is partial, the paper's Fig. 7d claim)


class PatchSample(Struct, kw_only=True):
    """One ablated run of one prompt and component (one resample source; the single run for mean and zero)."""

    source: int | None
    total_effect: float
    direct_effect: float
    profile: list[float]  # Δ̃unembed(k, l): every layer component's direct effect in this ablated run


class PromptResult(Struct, kw_only=True):
    index: int  # the prompt's position in the job's prompts (only_correct leaves some out)
    prompt: str
    target_id: int
    target_token: str
    clean_metric: float
    top2_gap: float
    near_tie: bool
    sources: list[int]
    total_effect: list[float]
    direct_effect: list[float]
    compensation: list[float]  # = compensatory_effect + norm_response, exactly
    norm_response: list[float]
    response: list[list[float]]
    clean_direct_effect: list[float]
    unembed_effect: list[float]  # the paper's Δunembed of the ablated component (Eq. 10)
    compensatory_effect: list[float]  # the paper's CE (Eq. 33–34): Σ downstream responses, norm excluded
    samples: list[list[PatchSample]] | None = None  # [component][patch], with keep_samples


class ComponentSummary(Struct, kw_only=True):
    component: str
    direct_effect_mean: float
    direct_effect_se: float
    total_effect_mean: float
    total_effect_se: float
    compensation_mean: float
    compensation_se: float
    compensation_attn_mean: float  # mean of CE's attention part (Σ downstream attention responses)
    compensation_mlp_mean: float  # mean of CE's MLP part
    norm_response_mean: float
    compensation_vs_direct: Regression  # compensation (CE + norm) on DE, across prompts
    unembed_effect_mean: float
    unembed_effect_se: float
    compensatory_effect_mean: float
    compensatory_effect_se: float
    # Fig. 7: CE on the paper's x (Δunembed) and on DE; Fig. 8: CE's attention and MLP parts on the same x's.
    ce_vs_unembed: Fit
    ce_vs_direct: Fit
    ce_attn_vs_unembed: Fit
    ce_mlp_vs_unembed: Fit
    ce_attn_vs_direct: Fit
    ce_mlp_vs_direct: Fit
    # Fig. 2: Pearson correlation across prompts of Δunembed with the drop (TE), and the share with Δunembed > TE.
    unembed_drop_correlation: float | None
    unembed_exceeds_drop_share: float


class ErasureFit(Struct, kw_only=True):
    """For an ablated attention layer: one downstream MLP's response regressed on the layer's Δunembed."""

    ablated: str
    mlp: str
    clean_direct_effect_mean: float  # the MLP's mean clean direct effect (negative: it erases the target)
    response_mean: float
    fit: Regression


class Selection(Struct, kw_only=True):
    """Which prompts the summary covers."""

    only_correct: bool
    n_candidates: int  # prompts in the job
    n_kept: int  # prompts measured (all, or those whose clean top token is the answer's first token)


class Summary(Struct, kw_only=True):
    n_prompts: int
    selection: Selection
    components: list[ComponentSummary]
    response_matrix: list[list[float]]
    clean_direct_effect_mean: list[float]
    total_vs_direct: Regression  # mean TE on mean DE, across components
    near_ties: int
    erasure: list[ErasureFit]


class Provenance(Struct, kw_only=True):
    spec: JobSpec
    model_id: str
    model_source: str
    model_revision: str | None
    model_file_sha256: str | None
    architecture: str
    dtype: str
    device: str
    library_versions: dict[str, str]
    seed: int
    engine: str
    worker: str
    elapsed_s: float


class JobResult(Struct, kw_only=True):
    id: str
    model: str
    components: list[str]
    response_basis: list[str]
    prompts: list[PromptResult]
    summary: Summary
    provenance: Provenance


def encode(value: object) -> bytes:
    return msgspec.json.encode(value)


# Documents of the API's own endpoints and errors (added for the OpenAPI schema; the worker does not use them).


class FieldError(Struct, kw_only=True):
    """One malformed field of a request, as reported by request parsing."""

    message: str
    key: str | None = None
    source: str | None = None


class ProblemDetails(Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details: every error response (`application/problem+json`)."""

    status: int
    title: str
    detail: str
    type: str | None = None
    instance: str | None = None
    field: str | None = None  # 422: the request field to change
    errors: list[FieldError] | None = None  # 400: every malformed field


class Health(Struct, kw_only=True):
    status: Literal["ok"]


class Readiness(Struct, kw_only=True):
    status: Literal["ready"]
    redis: bool
    workers: int
