"""Turn a JobRequest into a JobSpec: presets and defaults applied, prompts and components made explicit.

Pure (no Redis, no HTTP): given the advertised models it either returns the exact spec a worker will run or
raises ValidationProblem with a message that says what to change. Doing all of this before queueing means a
bad request fails in milliseconds instead of on a GPU an hour later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import UNSET

from hydra_ablate_client.vocabulary import ResampleSources, is_per_position, parse_component
from hydra_ablate_client.wire import CorpusRef, DatasetRef, JobRequest, JobSpec, ModelInfo
from service.core import corpora, datasets
from service.core.errors import ValidationProblem
from service.core.estimate_options import check_estimates, check_verify, estimate_values
from service.core.patch_resolve import refuse_patch_fields, resolve_patch
from service.core.settings import Settings
from service.core.source_draws import check_source_seeds

DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "components": ["attn", "mlp"],
    "ablation": "resample",
    "positions": "final",
    "metric": "logit",
    "norm_scale": "clean",
    "resample_samples": 1,
    "resample_from": "next",
    "resample_sources": "any",
    "seed": 0,
    "source_seeds": 1,
    "keep_samples": False,
    "only_correct": False,
    "resample_within": "job",
    "max_tokens": None,
    "measure_positions": "final",
    "target": "clean_top",
    "response_basis": "layers",
    "position_responses": "split",
}

# The Hydra-effect paper's setup (McGrath et al., 2023): resample ablation of every layer's attention and MLP at
# the final position, 15 random sources per prompt drawn from the dataset, centred logit of the clean top token,
# on every prompt, right or wrong (§2.5 measures all of Counterfact at each prompt's maximum-likelihood token;
# only_correct is a further analysis, not the paper's selection). Sources come from the whole job, as in
# the paper's App. A; `resample_within: "relation"` is available but cannot be the preset's on known_1000, whose
# relations P190 (1 prompt) and P138 (9) have fewer than 16 prompts.
PRESETS: dict[str, dict[str, Any]] = {
    "hydra": {
        "components": ["attn", "mlp"],
        "ablation": "resample",
        "resample_samples": 15,
        "resample_from": "random",
        "resample_within": "job",
        "positions": "final",
        "metric": "centered_logit",
        "only_correct": False,
    },
    # Rushing & Nanda 2024: every head resample-ablated at every position of natural text, measured at every
    # position with the true next token as target, direct effects with the clean final-norm scale, responses per
    # downstream head and MLP. Their metric is the centred logit: their code loads GPT-2 and Pythia into
    # TransformerLens with center_unembed=True, which subtracts W_U's mean over the vocabulary.
    "rushing_nanda": {
        "components": ["head"],
        "ablation": "resample",
        "resample_samples": 1,
        "resample_from": "random",
        "positions": "all",
        "measure_positions": "all",
        "target": "next_token",
        "metric": "centered_logit",
        "norm_scale": "clean",
        "response_basis": "heads",
        "max_tokens": 64,
    },
}
PRESET_DATASETS: dict[str, DatasetRef] = {"hydra": DatasetRef(name="known_1000")}
PRESET_CORPORA: dict[str, CorpusRef] = {"rushing_nanda": CorpusRef(name="known_1000_text")}
# Numbers per (prompt, position, component) in a per-position result, besides the optional full responses:
# total, direct, unembed, compensation, compensatory, heads, mlps, norm.
POSITION_COLUMNS = 8

_KIND_ORDER = {"attn": 0, "head": 1, "mlp": 2}  # within a layer: attention, its heads, then the MLP


def ablation_count(spec: JobSpec) -> int:
    """Ablated runs in a job: prompts × (components + knockout sets) × resample samples (one for mean and zero)."""
    samples = spec.resample_samples * spec.source_seeds if spec.ablation == "resample" else 1
    # With verify only the verification set is ablated: exactly top + random components (checked on submit).
    rows = spec.verify.top + spec.verify.random if spec.verify else len(spec.components) + len(spec.knockouts)
    return len(spec.prompts) * rows * samples


def resolve(
    request: JobRequest,
    models: Mapping[str, ModelInfo],
    settings: Settings,
    refused: Mapping[str, str] | None = None,
) -> JobSpec:
    """The spec a worker runs; raises ValidationProblem for anything that could not run as asked.

    `refused` maps models that workers were configured with but cannot decompose to the reason.
    """
    preset = PRESETS.get(request.preset, {}) if request.preset is not UNSET else {}

    def pick(name: str) -> Any:
        value = getattr(request, name)
        if value is not UNSET:
            return value
        return preset.get(name, DEFAULTS[name])

    info = _model(pick("model"), models, refused or {})
    if request.intervention == "patch":  # activation patching: its own fields and rules
        return resolve_patch(request, info, settings)
    refuse_patch_fields(request)
    prompts, answers, dataset, corpus = _prompts(request)
    n = len(prompts)
    answers = _per_prompt("answers", answers, n)
    counterfactuals = _per_prompt(
        "counterfactuals", None if request.counterfactuals is UNSET else list(request.counterfactuals), n
    )
    metric = pick("metric")
    _check_counterfactuals(metric, counterfactuals)

    ablation = pick("ablation")
    samples = _samples(request, ablation, pick("resample_samples"), n)
    options = {name: pick(name) for name in ("measure_positions", "target", "response_basis", "position_responses")}
    per_position = is_per_position(options["measure_positions"], options["target"])
    if per_position:
        _check_paper_options_final_only(pick("only_correct"), pick("keep_samples"), pick("resample_within"))
    only_correct, answers = _only_correct(pick("only_correct"), request.only_correct is UNSET, answers, dataset)
    resample_within = pick("resample_within")
    groups = _resample_groups(resample_within, ablation, dataset, samples)
    keep_samples = pick("keep_samples")
    mean_reference = _mean_reference(request, ablation)
    knockouts = _knockouts(request, info, per_position)
    # With knockouts and no components, only the sets are ablated: the default (or a preset's) every-layer sweep
    # would bury the sets among components nobody asked for.
    components = expand_components([] if knockouts and request.components is UNSET else pick("components"), info)
    _check_knockouts_against_components(knockouts, components)
    draws = check_source_seeds(pick("source_seeds"), ablation, pick("resample_from"), per_position)
    resample_sources = _resample_sources(pick("resample_sources"), ablation, per_position)
    estimates = check_estimates(
        [] if request.estimates is UNSET else request.estimates, per_position=per_position, knockouts=knockouts,
        resample_sources=resample_sources,
    )
    verify = check_verify(
        None if request.verify is UNSET else request.verify, estimates=estimates, n_components=len(components)
    )

    n_rows = len(components) + len(knockouts)  # a knockout set is measured like one component
    _check_ablation_count(n, n_rows, samples, draws, settings)
    max_tokens = pick("max_tokens")
    if per_position:
        _check_position_options(pick("positions"), metric, options, answers)
    if options["response_basis"] == "heads" and info.head_basis_refusal:
        raise ValidationProblem(info.head_basis_refusal, "response_basis")
    _check_result_size(n, n_rows, info, options, per_position, samples * draws, draws, keep_samples,
                       max_tokens or settings.max_prompt_tokens, settings, estimate_values(estimates))

    return JobSpec(
        model=info.id,
        prompts=prompts,
        answers=answers,
        counterfactuals=counterfactuals,
        components=components,
        ablation=ablation,
        positions=pick("positions"),
        metric=metric,
        norm_scale=pick("norm_scale"),
        resample_samples=samples,
        resample_from=pick("resample_from"),
        resample_sources=resample_sources,
        mean_reference_prompts=mean_reference,
        seed=pick("seed"),
        source_seeds=draws,
        preset=None if request.preset is UNSET else request.preset,
        dataset=dataset,
        prompt_fields=None if dataset is None else datasets.prompt_fields(dataset),
        keep_samples=keep_samples,
        only_correct=only_correct,
        resample_within=resample_within,
        resample_groups=groups,
        max_tokens=max_tokens,
        corpus=corpus,
        knockouts=knockouts,
        estimates=estimates,
        verify=verify,
        **options,
    )


def _resample_sources(value: ResampleSources, ablation: str, per_position: bool) -> ResampleSources:
    """`resample_sources` as given, or ValidationProblem where it cannot apply."""
    if value == "any":
        return value
    if ablation != "resample":
        raise ValidationProblem(
            f"resample_sources {value!r} only applies to ablation resample (this job's ablation is {ablation})",
            "resample_sources",
        )
    if per_position:
        raise ValidationProblem(
            f"resample_sources {value!r} compares each prompt's target with the sources' clean top token at the "
            "final position; per-position jobs have a target per position: use resample_sources 'any'",
            "resample_sources",
        )
    return value


def _check_counterfactuals(metric: str, counterfactuals: list[str] | None) -> None:
    """Counterfactuals go with metric logit_diff, and only with it."""
    if metric == "logit_diff" and counterfactuals is None:
        raise ValidationProblem(
            "metric logit_diff needs counterfactuals: one counterfactual answer per prompt", "counterfactuals"
        )
    if metric != "logit_diff" and counterfactuals is not None:
        raise ValidationProblem(
            f"counterfactuals are only used by metric logit_diff (this job's metric is {metric})", "counterfactuals"
        )


def _only_correct(
    only_correct: bool, not_given: bool, answers: list[str] | None, dataset: DatasetRef | None
) -> tuple[bool, list[str] | None]:
    """(only_correct, answers): selecting correct prompts needs an answer per prompt, the dataset's if none given."""
    if only_correct and answers is None and dataset is None and not_given:
        only_correct = False  # the preset selects correct answers only where there are answers to compare with
    if only_correct and answers is None:
        if dataset is None:
            raise ValidationProblem(
                "only_correct needs an answer per prompt (give answers, or use a dataset, whose answers are used)",
                "only_correct",
            )
        answers = datasets.select(dataset)[1]  # the clean top token is compared with each answer's first token
    return only_correct, answers


def _check_ablation_count(n: int, n_components: int, samples: int, draws: int, settings: Settings) -> None:
    total = n * n_components * samples * draws
    if total > settings.max_ablations:
        runs = f"{samples} samples" + (f" × {draws} source draws" if draws > 1 else "")
        raise ValidationProblem(
            f"too many ablations: {n:,} prompts × {n_components:,} components × {runs} = {total:,}, "
            f"above this server's limit of {settings.max_ablations:,} per job; split the job or ablate fewer "
            "components"
        )


def _check_result_size(
    n: int,
    n_components: int,
    info: ModelInfo,
    options: dict[str, Any],
    per_position: bool,
    runs: int,
    draws: int,
    keep_samples: bool,
    max_tokens: int,
    settings: Settings,
    estimates_per_pair: int = 0,
) -> None:
    """The numbers the result would hold must stay under the server's limit (a stored result must fit in Redis);
    `runs`: resample samples × source draws per pair."""
    if per_position:
        values = _position_values(n, n_components, info, options, max_tokens)
        what = f"{n:,} prompts × {n_components:,} components × up to {max_tokens} positions"
    else:
        # The response vector over the basis; the per-run profiles of keep_samples are per layer in either basis.
        per_pair = _basis_size(info, options) + 8 + (runs * (2 * info.n_layers + 3) if keep_samples else 0)
        per_pair += 7 * draws if draws > 1 else 0  # each draw's six means and its sources
        per_pair += estimates_per_pair
        values = n * n_components * per_pair
        what = (
            f"{n:,} prompts × {n_components:,} components × {per_pair} per pair"
            f"{', with keep_samples' if keep_samples else ''}"
        )
    if values > settings.max_result_values:
        raise ValidationProblem(
            f"the result would hold {values:,} numbers ({what}), above this server's limit of "
            f"{settings.max_result_values:,}; split the job into several with fewer prompts"
            + (", lower max_tokens or use position_responses 'split'" if per_position else "")
            + (" or leave keep_samples off" if keep_samples else "")
        )


def _resample_groups(within: str, ablation: str, dataset: DatasetRef | None, samples: int) -> list[int] | None:
    """Per prompt, the number of its relation (resample_within "relation"); every relation needs samples + 1."""
    if within == "job":
        return None
    if ablation != "resample":
        raise ValidationProblem(
            f"resample_within only applies to ablation resample (this job's ablation is {ablation})", "resample_within"
        )
    if dataset is None:
        raise ValidationProblem(
            "resample_within \"relation\" needs a dataset (its prompts carry their relation); give dataset instead "
            "of prompts, or use resample_within \"job\"",
            "resample_within",
        )
    relations = datasets.select_relations(dataset)
    numbers = {r: k for k, r in enumerate(sorted(set(relations)))}
    counts = {r: relations.count(r) for r in numbers}
    small = sorted(r for r, c in counts.items() if c < samples + 1)
    if small:
        listed = ", ".join(f"{r} ({counts[r]})" for r in small)
        raise ValidationProblem(
            f"resample_within \"relation\" with resample_samples {samples} needs {samples + 1} prompts per relation; "
            f"these relations have fewer: {listed}. Lower resample_samples, filter dataset.relation, or use "
            "resample_within \"job\"",
            "resample_within",
        )
    return [numbers[r] for r in relations]


def _model(model_id: str, models: Mapping[str, ModelInfo], refused: Mapping[str, str]) -> ModelInfo:
    if model_id in models:
        return models[model_id]
    if model_id in refused:
        raise ValidationProblem(f"model {model_id!r} cannot be ablated: {refused[model_id]}", "model")
    if not models:
        raise ValidationProblem(
            f"unknown model {model_id!r}: no models are available yet (no worker has advertised one)", "model"
        )
    raise ValidationProblem(f"unknown model {model_id!r}: available models are {', '.join(sorted(models))}", "model")


def _prompts(request: JobRequest) -> tuple[list[str], list[str] | None, DatasetRef | None, CorpusRef | None]:
    """Exactly one source of prompts (prompts, dataset, texts or corpus), after the preset; answers from the request
    or from the dataset."""
    dataset = request.dataset if request.dataset is not UNSET else None
    corpus = request.corpus if request.corpus is not UNSET else None
    given = [name for name in ("prompts", "dataset", "texts", "corpus") if getattr(request, name) is not UNSET]
    if len(given) > 1:
        raise ValidationProblem(f"give one of prompts, dataset, texts or corpus, not {' and '.join(given)}", given[1])
    if not given and request.preset is not UNSET:
        dataset = PRESET_DATASETS.get(request.preset)
        corpus = PRESET_CORPORA.get(request.preset)
    answers = None if request.answers is UNSET else list(request.answers)
    if request.prompts is not UNSET:
        return list(request.prompts), answers, None, None
    if request.texts is not UNSET:
        return list(request.texts), answers, None, None
    if corpus is not None:
        texts = corpora.select(corpus)
        if not texts:
            total = len(corpora.documents(corpus.name))
            raise ValidationProblem(
                f"corpus slice is empty: {corpus.name} has {total} documents and offset is {corpus.offset}", "corpus"
            )
        return texts, answers, None, corpus
    if dataset is None:
        raise ValidationProblem(
            "no prompts: give prompts (a list of strings), texts (documents), dataset (e.g. known_1000) or corpus "
            "(e.g. known_1000_text)",
            "prompts",
        )
    prompts, dataset_answers = datasets.select(dataset)
    if not prompts:
        raise ValidationProblem(_empty_slice(dataset), "dataset")
    if dataset.use_answers:
        if answers is not None:
            raise ValidationProblem("give answers or dataset.use_answers, not both", "answers")
        answers = dataset_answers
    return prompts, answers, dataset, None


def _check_paper_options_final_only(only_correct: bool, keep_samples: bool, resample_within: str) -> None:
    """The paper's prompt selection and per-patch data are defined for final-position jobs only."""
    for name, used in (
        ("only_correct", only_correct),
        ("keep_samples", keep_samples),
        ("resample_within", resample_within != "job"),
    ):
        if used:
            raise ValidationProblem(
                f"{name} is for final-position jobs; per-position jobs (measure_positions 'all' or target "
                "'next_token') do not support it",
                name,
            )


def _check_position_options(positions: str, metric: str, options: dict[str, str], answers: list[str] | None) -> None:
    """The per-position engine's rules (worker/engine/position_sweep.py checks them again)."""
    if positions != "all":
        raise ValidationProblem(
            "measure_positions 'all' and target 'next_token' ablate the component at every position: set "
            f"positions to 'all' (it is {positions!r})",
            "positions",
        )
    if metric == "logit_diff":
        raise ValidationProblem(
            "metric logit_diff has one counterfactual per prompt, not per position: use logit, centered_logit or "
            "logprob with per-position measures",
            "metric",
        )
    if answers is not None and options["target"] == "next_token":
        raise ValidationProblem("give answers or target 'next_token', not both", "target")
    if answers is not None and options["measure_positions"] == "all":
        raise ValidationProblem(
            "answers are one target per prompt: with measure_positions 'all' use target 'next_token' or "
            "'clean_top'",
            "answers",
        )


def _position_values(n: int, n_components: int, info: ModelInfo, options: dict[str, str], positions: int) -> int:
    """Numbers a per-position result holds at most (every prompt at `positions` tokens)."""
    basis = _basis_size(info, options)
    per_pair = POSITION_COLUMNS + (basis if options["position_responses"] == "full" else 0)
    return n * positions * (n_components * per_pair + basis + 4)


def _basis_size(info: ModelInfo, options: dict[str, str]) -> int:
    """Entries of the response basis: attn.L and mlp.L per layer, or every head and mlp.L."""
    return info.n_layers * (info.n_heads + 1 if options["response_basis"] == "heads" else 2)


def _empty_slice(ref: DatasetRef) -> str:
    available = len(datasets.select(DatasetRef(name=ref.name, relation=ref.relation))[0])
    where = ref.name if ref.relation is None else f"{ref.name} relation {ref.relation}"
    if available == 0:
        known = ", ".join(datasets.relations(ref.name))
        return f"dataset {where} has no prompts; its relations are {known}"
    return f"dataset slice is empty: {where} has {available} prompts and offset is {ref.offset}"


def _per_prompt(name: str, values: list[str] | None, n: int) -> list[str] | None:
    if values is not None and len(values) != n:
        raise ValidationProblem(
            f"{name} has {len(values)} entries but there are {n} prompts; give exactly one per prompt", name
        )
    return values


def _samples(request: JobRequest, ablation: str, samples: int, n: int) -> int:
    if ablation != "resample":
        if request.resample_samples is not UNSET and request.resample_samples != 1:
            raise ValidationProblem(
                f"resample_samples only applies to ablation resample (this job's ablation is {ablation})",
                "resample_samples",
            )
        return 1
    if n < 2:
        raise ValidationProblem(
            f"ablation resample needs at least 2 prompts (each prompt takes the replacement from another prompt); "
            f"got {n}. Use ablation mean or zero for a single prompt",
            "prompts",
        )
    if samples > n - 1:
        raise ValidationProblem(
            f"resample_samples {samples} is too many for {n} prompts: a prompt is never its own source, so at most "
            f"{n - 1} samples; give at least {samples + 1} prompts or lower resample_samples",
            "resample_samples",
        )
    return samples


def _mean_reference(request: JobRequest, ablation: str) -> list[str] | None:
    if request.mean_reference is UNSET:
        return None
    if ablation != "mean":
        raise ValidationProblem(
            f"mean_reference only applies to ablation mean (this job's ablation is {ablation})", "mean_reference"
        )
    prompts, _ = datasets.select(request.mean_reference)
    if not prompts:
        raise ValidationProblem(_empty_slice(request.mean_reference), "mean_reference")
    return prompts


def expand_components(names: Sequence[str], info: ModelInfo) -> list[str]:
    """Explicit component names in the user's order, without duplicates.

    The bare kinds `attn`, `mlp` and `head` expand together, at the place of the first of them, ordered by layer
    (attn.L, head.L.0…, mlp.L); `head.L` expands in place to every head of layer L.
    """
    expanded: list[str] = []
    kinds: list[tuple[int, int, int, str]] = []
    kinds_at: int | None = None
    for index, name in enumerate(names):
        kind, layer, head = parse_component(name)  # the schema checked the grammar
        numbers = [n for n in (layer, head) if n is not None]
        field = f"components[{index}]"
        if not numbers:
            if kinds_at is None:
                kinds_at = len(expanded)
            if kind == "head":
                kinds += [
                    (layer, _KIND_ORDER[kind], h, f"head.{layer}.{h}")
                    for layer in range(info.n_layers)
                    for h in range(info.n_heads)
                ]
            else:
                kinds += [(layer, _KIND_ORDER[kind], 0, f"{kind}.{layer}") for layer in range(info.n_layers)]
            continue
        _check_layer(name, numbers[0], info, field)
        if kind in ("attn", "mlp"):
            if len(numbers) != 1:
                raise ValidationProblem(
                    f"component {name!r} is not valid: {kind} takes one index, the layer ({kind}.L)", field
                )
            expanded.append(f"{kind}.{numbers[0]}")
        elif len(numbers) == 1:
            expanded += [f"head.{numbers[0]}.{h}" for h in range(info.n_heads)]
        else:
            if not 0 <= numbers[1] < info.n_heads:
                raise ValidationProblem(
                    f"component {name!r}: head {numbers[1]} is out of range: model {info.id} has "
                    f"{info.n_heads} heads per layer (0–{info.n_heads - 1})",
                    field,
                )
            expanded.append(f"head.{numbers[0]}.{numbers[1]}")
    if kinds_at is not None:
        expanded[kinds_at:kinds_at] = [name for *_, name in sorted(kinds)]
    return list(dict.fromkeys(expanded))


def _knockouts(request: JobRequest, info: ModelInfo, per_position: bool) -> list[list[str]]:
    """The request's knockout sets, each checked against the model (the engine's rules, worker/engine/components.py
    knockout_set, so that a bad set fails here rather than on the worker)."""
    if request.knockouts is UNSET or not request.knockouts:
        return []
    if per_position:
        raise ValidationProblem(
            "knockouts are measured at the final position: drop the per-position options (measure_positions 'all', "
            "target 'next_token') or the knockouts",
            "knockouts",
        )
    sets: list[list[str]] = []
    first_index: dict[frozenset[str], int] = {}
    for index, given in enumerate(request.knockouts):
        field = f"knockouts[{index}]"
        if not given:
            raise ValidationProblem(
                f"knockout set {index} is empty: name at least one component (attn.L, mlp.L or head.L.H)", field
            )
        members = [_knockout_member(name, index, info, field) for name in given]
        repeated = sorted(name for name, times in Counter(members).items() if times > 1)  # linear: sets can be long
        if repeated:
            raise ValidationProblem(
                f"knockout set {index} names {', '.join(repr(r) for r in repeated)} twice: name each component once",
                field,
            )
        layers_with_attn = {parse_component(name).layer for name in members if name.startswith("attn.")}
        inside = [
            name for name in members
            if (parts := parse_component(name)).kind == "head" and parts.layer in layers_with_attn
        ]
        if inside:
            raise ValidationProblem(
                f"knockout set {index} names {', '.join(inside)} and its attention layer: a head is part of attn.L, "
                "so ablating attn.L already ablates it; drop the head or the layer",
                field,
            )
        if info.post_norm:
            _check_post_norm_set(members, index, info, field)
        key = frozenset(members)
        if key in first_index:
            raise ValidationProblem(
                f"knockout sets {first_index[key]} and {index} name the same components: drop set {index}", field
            )
        first_index[key] = index
        sets.append(list(members))
    return sets


def _check_post_norm_set(members: list[str], index: int, info: ModelInfo, field: str) -> None:
    """In a post-norm block the norm mixes every head of a layer: with a member of an earlier layer, attn.L responds
    to it, and that response cannot be told apart from the member heads' own change (the engine refuses the same,
    worker/engine/sweep.py knockout_sets)."""
    parts = [parse_component(name) for name in members]
    first_layer = min(p.layer or 0 for p in parts)
    for name, p in zip(members, parts, strict=True):
        if p.kind == "head" and p.layer is not None and p.layer > first_layer:
            raise ValidationProblem(
                f"knockout set {index}: on model {info.id} a norm after attention mixes every head of a layer, so "
                f"attn.{p.layer}'s response to the set's earlier members cannot be separated from {name}'s own "
                f"change; knock out attn.{p.layer} instead of its heads, or put {name} in a set without earlier "
                "members",
                field,
            )


def _knockout_member(name: str, index: int, info: ModelInfo, field: str) -> str:
    """One member of knockout set `index`, an explicit component of the model, in its canonical spelling (attn.01
    is attn.1, as in `components`)."""
    try:
        parts = parse_component(name)
    except ValueError:  # the schema lets patching sites through (they make patching jobs' sets)
        raise ValidationProblem(
            f"knockout set {index}: {name!r} is a patching site; an ablation job's set names attn.L, mlp.L or "
            "head.L.H: set intervention to 'patch' with pairs, or use ablation components",
            field,
        ) from None
    if not parts.explicit or parts.layer is None:
        raise ValidationProblem(
            f"knockout set {index}: {name!r} is not one component; a set names explicit components: attn.L, mlp.L "
            "or head.L.H (give head.L's heads one by one)",
            field,
        )
    if not 0 <= parts.layer < info.n_layers:
        raise ValidationProblem(
            f"knockout set {index}: {name!r}: layer {parts.layer} is out of range: model {info.id} has "
            f"{info.n_layers} layers (0–{info.n_layers - 1})",
            field,
        )
    if parts.head is not None and not 0 <= parts.head < info.n_heads:
        raise ValidationProblem(
            f"knockout set {index}: {name!r}: head {parts.head} is out of range: model {info.id} has "
            f"{info.n_heads} heads per layer (0–{info.n_heads - 1})",
            field,
        )
    return f"head.{parts.layer}.{parts.head}" if parts.kind == "head" else f"{parts.kind}.{parts.layer}"


def _check_knockouts_against_components(knockouts: list[list[str]], components: list[str]) -> None:
    """At least one thing to ablate, and no set named like a component (results name every row once)."""
    if not components and not knockouts:
        raise ValidationProblem(
            "nothing to ablate: give components (e.g. ['attn', 'mlp']) or knockouts (e.g. [['attn.1', 'mlp.1']])",
            "components",
        )
    single = set(components)
    for index, members in enumerate(knockouts):
        if len(members) == 1 and members[0] in single:
            raise ValidationProblem(
                f"knockout set {index} has the one member {members[0]!r}, which components already ablate on its "
                "own: drop the set or the component",
                f"knockouts[{index}]",
            )


def _check_layer(name: str, layer: int, info: ModelInfo, field: str) -> None:
    if not 0 <= layer < info.n_layers:
        raise ValidationProblem(
            f"component {name!r}: layer {layer} is out of range: model {info.id} has {info.n_layers} layers "
            f"(0–{info.n_layers - 1})",
            field,
        )
