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
PresetName = Literal["hydra", "rushing_nanda"]
MeasurePositions = Literal["final", "all"]
TargetName = Literal["clean_top", "next_token"]
ResponseBasisName = Literal["layers", "heads"]
PositionResponses = Literal["split", "full"]

Prompt = Annotated[str, Meta(min_length=1, max_length=4000)]
ComponentName = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^(attn|mlp|head)(\.\d+){0,2}(?![\s\S])")]


class DatasetRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A built-in prompt set, sliced; `relation` filters by Wikidata property (e.g. P36)."""

    name: Literal["known_1000"]
    limit: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    offset: Annotated[int, Meta(ge=0)] = 0
    relation: Annotated[str, Meta(pattern=r"^P\d+$")] | None = None
    use_answers: bool = False  # take the dataset's answers as targets instead of the clean top token


class CorpusRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A built-in natural-text corpus (documents, see service/corpora.py), sliced."""

    name: Literal["known_1000_text"]
    limit: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    offset: Annotated[int, Meta(ge=0)] = 0


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
    # Documents and per-position measurement (docs/definitions.md, "Every position").
    texts: Annotated[list[Prompt], Meta(min_length=1, max_length=100_000)] | UnsetType = UNSET
    corpus: CorpusRef | UnsetType = UNSET
    max_tokens: Annotated[int, Meta(ge=2, le=4096)] | UnsetType = UNSET
    measure_positions: MeasurePositions | UnsetType = UNSET
    target: TargetName | UnsetType = UNSET
    response_basis: ResponseBasisName | UnsetType = UNSET
    position_responses: PositionResponses | UnsetType = UNSET


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
    max_tokens: int | None = None  # texts are cut to their first max_tokens tokens (None: uncut)
    measure_positions: MeasurePositions = "final"
    target: TargetName = "clean_top"  # given answers win over clean_top
    response_basis: ResponseBasisName = "layers"
    position_responses: PositionResponses = "split"
    corpus: CorpusRef | None = None

    @property
    def per_position(self) -> bool:
        """Measured by the per-position engine (results carry `positions` columns)."""
        return self.measure_positions == "all" or self.target == "next_token" or self.response_basis == "heads"


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
    architecture: str  # the config's model_type, e.g. "gemma2"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    vocab_size: int
    parallel_blocks: bool
    source: str
    # Defaults keep the records of workers that predate these fields readable.
    family: str = ""  # e.g. "Gemma 2"
    dtype: str = "float32"  # what the worker runs the model in (HYDRA_DTYPE)
    device: str = "cpu"  # where (HYDRA_DEVICE), e.g. "cuda:0"
    device_name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3", or the CPU's model name
    final_logit_softcap: float | None = None  # Gemma 2: results then carry capped_total_effect too


class Regression(Struct, kw_only=True):
    """Least-squares fit y = slope·x + intercept; nulls when x has no spread."""

    slope: float | None
    intercept: float | None
    r2: float | None
    n: int


class PositionColumns(Struct, kw_only=True):
    """One prompt's per-position measures, as little-endian float32 arrays (base64 in JSON), row-major.

    `P` measured positions, `C` components, `R` response-basis entries. Arrays (C, P): total_effect, direct_effect,
    unembed_effect, compensation, compensatory_effect, response_heads (Σ of the downstream attention/head
    responses), response_mlps (Σ of the downstream MLP responses), norm_response. response (C, R, P) only with
    `position_responses: "full"`. clean_direct_effect (R, P). Decode with `numpy.frombuffer(x, "<f4")`.
    """

    positions: list[int]  # indices into the tokens the model read
    target_ids: list[int]
    clean_metric: bytes  # (P,)
    top2_gap: bytes  # (P,)
    total_effect: bytes
    direct_effect: bytes
    unembed_effect: bytes
    compensation: bytes
    compensatory_effect: bytes
    response_heads: bytes
    response_mlps: bytes
    norm_response: bytes
    clean_direct_effect: bytes
    response: bytes | None = None


class PromptResult(Struct, kw_only=True):
    prompt: str
    target_id: int
    target_token: str
    clean_metric: float
    top2_gap: float
    near_tie: bool
    sources: list[int]
    total_effect: list[float]
    direct_effect: list[float]
    compensation: list[float]
    norm_response: list[float]
    response: list[list[float]]
    clean_direct_effect: list[float]
    # Soft-capped models only (Gemma 2): TE read on the model's capped logits; the other measures are read on the
    # pre-cap logits (docs/definitions.md, "Final-logit soft-capping"). Null for every other model.
    capped_total_effect: list[float] | None = None
    # Per-position jobs: every measure per (position, component); the lists above hold the last measured position.
    positions: PositionColumns | None = None


class ComponentSummary(Struct, kw_only=True):
    component: str
    direct_effect_mean: float
    direct_effect_se: float
    total_effect_mean: float
    total_effect_se: float
    compensation_mean: float
    compensation_se: float
    compensation_attn_mean: float
    compensation_mlp_mean: float
    norm_response_mean: float
    compensation_vs_direct: Regression


class Quantiles(Struct, kw_only=True):
    p05: float
    p25: float
    p50: float
    p75: float
    p95: float


class SelfRepair(Struct, kw_only=True):
    """One component's self-repair over its top (position, token) pairs by direct effect (Rushing & Nanda 2024).

    Their sign: TE and DE are changes (ablated − clean), ours are drops (clean − ablated), so their self-repair
    TE − DE equals our compensation DE − TE. Pairs are the top `top_fraction` by our DE (their most negative DE).
    """

    component: str
    n_pairs: int
    direct_effect_threshold: float  # the smallest DE kept
    direct_effect_mean: float
    total_effect_mean: float
    self_repair_mean: float  # = compensation mean
    self_repair_se: float
    heads_mean: float  # downstream attention heads' part (attention layers with response_basis "layers")
    mlps_mean: float
    norm_mean: float
    norm_share: float | None  # norm_mean / self_repair_mean (None when that is 0)
    self_repair_fraction: float | None  # self_repair_mean / direct_effect_mean
    self_repair_quantiles: Quantiles


class Summary(Struct, kw_only=True):
    n_prompts: int
    components: list[ComponentSummary]
    response_matrix: list[list[float]]
    clean_direct_effect_mean: list[float]
    total_vs_direct: Regression
    near_ties: int
    # Per-position jobs: pairs are (prompt, position); near_ties counts pairs.
    n_pairs: int | None = None
    top_fraction: float | None = None
    self_repair: list[SelfRepair] | None = None


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
