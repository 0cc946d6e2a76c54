"""Resolve an activation-patching request (intervention "patch") into a JobSpec, and keep patching's fields out of
ablation requests.

Pure like service/core/resolve.py, which calls it: the pairs' token lengths and one-token answers need the model's
tokenizer and are checked after resolution (service/core/patch_tokens.py). The site rules mirror the engine's
(worker/engine/patching.py `model_site`, worker/engine/architecture.py `head_part_refusal`), so that a bad site fails
on submit rather than on a worker; the engine checks them again.
"""

from __future__ import annotations

import re

from msgspec import UNSET

from hydra_ablate_client.vocabulary import COMPONENT_PATTERN, DEFAULT_PAIR_EPSILON, parse_patch_site
from hydra_ablate_client.wire import JobRequest, JobSpec, ModelInfo
from service.core.errors import ValidationProblem
from service.core.estimate_options import check_patch_estimates, patch_estimate_values
from service.core.patch_knockouts import patch_knockouts
from service.core.settings import Settings

_COMPONENT = re.compile(COMPONENT_PATTERN)
_PATCH_ONLY = ("pairs", "pair_dataset", "direction", "epsilon")
# Request fields that only ablation jobs use: with intervention "patch" each is a 422 naming it. (`positions` and
# `metric` are shared: patching reads them as the patched positions and the metric.)
_ABLATION_ONLY = (
    "preset", "prompts", "dataset", "answers", "counterfactuals", "ablation", "norm_scale",
    "resample_samples", "resample_from", "resample_sources", "mean_reference", "source_seeds", "keep_samples",
    "only_correct", "resample_within", "texts", "corpus", "max_tokens", "target", "response_basis",
    "position_responses", "verify",
)
# The engine's head-part refusals (worker/engine/architecture.py): fused q/k/v projections, and QK-norms over the
# whole projection.
_FUSED_QKV = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX (Pythia)", "phi3": "Phi-3"}
_WHOLE_PROJECTION_QK_NORM = {"olmo2": "OLMo 2"}
DEFAULT_SITES = ("resid_pre",)  # every layer's residual stream, when no sites are given


def refuse_patch_fields(request: JobRequest) -> None:
    """An ablation job (intervention "ablate") takes no pairs or patching options, and no patching-only sites."""
    for name in _PATCH_ONLY:
        if getattr(request, name) is not UNSET:
            raise ValidationProblem(
                f"{name} is for activation patching: set intervention to 'patch' (this job ablates), or drop {name}",
                name,
            )
    if request.components is UNSET:
        return
    for index, name in enumerate(request.components):
        if _COMPONENT.match(name) is None:
            raise ValidationProblem(
                f"components[{index}] {name!r} is a patching site; an ablation job names attn.L, mlp.L or head.L.H "
                "(or a kind): set intervention to 'patch' with pairs, or use an ablation component",
                f"components[{index}]",
            )


def resolve_patch(request: JobRequest, info: ModelInfo, settings: Settings) -> JobSpec:
    """The spec of a patching job; ValidationProblem naming the field and what to change."""
    for name in _ABLATION_ONLY:
        if getattr(request, name) is UNSET:
            continue
        raise ValidationProblem(
            f"{name} is an ablation option; a patching job (intervention 'patch') takes pairs, components (its "
            f"sites), direction, positions, metric, epsilon and estimates: drop {name}, or set intervention to "
            "'ablate'",
            name,
        )
    if request.measure_positions is not UNSET and request.measure_positions != "final":
        raise ValidationProblem(
            "a patching job reads its metric at the final position; measure_positions "
            f"{request.measure_positions!r} is for ablation jobs: drop it (patch at every position with positions "
            "'all')",
            "measure_positions",
        )
    if request.pairs is not UNSET and request.pair_dataset is not UNSET:
        raise ValidationProblem("give pairs or pair_dataset, not both", "pair_dataset")
    if request.pairs is UNSET and request.pair_dataset is UNSET:
        raise ValidationProblem(
            "intervention 'patch' needs pairs: give pairs [{\"clean\": …, \"corrupted\": …, \"answer\": …, "
            "\"counterfactual\": …}, …] or pair_dataset {\"name\": \"ioi\", \"limit\": n}, or set intervention "
            "to 'ablate' with prompts",
            "pairs",
        )
    metric = "logit_diff" if request.metric is UNSET else request.metric
    if metric != "logit_diff":
        raise ValidationProblem(
            f"a patching job reads logit(answer) − logit(counterfactual): use metric 'logit_diff' (it is {metric!r})",
            "metric",
        )
    # A pair dataset is drawn on the model's tokenizer after resolution (service/core/patch_tokens.py): the spec
    # leaves its pairs empty until then.
    pairs = [] if request.pairs is UNSET else list(request.pairs)
    dataset = None if request.pair_dataset is UNSET else request.pair_dataset
    given_sets = [] if request.knockouts is UNSET else request.knockouts
    # With knockouts and no components, only the sets are patched (as ablation jobs ablate only their sets).
    names = list(DEFAULT_SITES) if request.components is UNSET and not given_sets else list(request.components or [])
    sites = patch_sites(names, info) if names or not given_sets else []
    knockouts = patch_knockouts(given_sets, sites, lambda name, field: _expand(name, info, field)[0])
    positions = "final" if request.positions is UNSET else request.positions
    estimates = check_patch_estimates([] if request.estimates is UNSET else request.estimates, knockouts=knockouts)
    _check_size(len(pairs) if dataset is None else dataset.limit, len(sites) + len(knockouts), positions, settings,
                patch_estimate_values(estimates))
    return JobSpec(
        model=info.id,
        prompts=[p.clean for p in pairs],
        answers=[p.answer for p in pairs],
        counterfactuals=[p.counterfactual for p in pairs],
        components=sites,
        knockouts=knockouts,
        ablation="resample",  # unused by patching; one run per pair and site in ablation_count
        positions=positions,
        metric="logit_diff",
        norm_scale="clean",
        resample_samples=1,
        resample_from="next",
        mean_reference_prompts=None,
        seed=0 if request.seed is UNSET else request.seed,
        intervention="patch",
        corrupted=[p.corrupted for p in pairs],
        direction="denoise" if request.direction is UNSET else request.direction,
        epsilon=DEFAULT_PAIR_EPSILON if request.epsilon is UNSET else request.epsilon,
        pair_dataset=dataset,
        estimates=estimates,
    )


def patch_sites(names: list[str], info: ModelInfo) -> list[str]:
    """The sites in the user's order, without duplicates, in canonical spelling; `resid_pre`, `attn`, `mlp` and
    `head` alone expand to every layer's (every head's) site, `head.L` to layer L's heads."""
    if not names:
        raise ValidationProblem(
            "nothing to patch: give components, the patching sites (e.g. ['resid_pre', 'head.1.0']), or knockouts, "
            "sets of sites patched together (e.g. [['head.1.0', 'head.2.1']])",
            "components",
        )
    sites: list[str] = []
    for index, name in enumerate(names):
        field = f"components[{index}]"
        sites += _expand(name, info, field)
    return list(dict.fromkeys(sites))


def _expand(name: str, info: ModelInfo, field: str) -> list[str]:
    if name in ("resid_pre", "attn", "mlp"):
        return [f"{name}.{layer}" for layer in range(info.n_layers)]
    if name == "head":
        return [f"head.{layer}.{h}" for layer in range(info.n_layers) for h in range(info.n_heads)]
    if re.fullmatch(r"head\.\d+", name):
        layer = _layer(name, int(name.split(".")[1]), info, field)
        return [f"head.{layer}.{h}" for h in range(info.n_heads)]
    try:
        parts = parse_patch_site(name)
    except ValueError:
        raise ValidationProblem(
            f"{field} {name!r} is not a patching site: use resid_pre.L, attn.L, mlp.L, head.L.H or "
            "head.L.H.q|k|v|pattern",
            field,
        ) from None
    layer = _layer(name, parts.layer, info, field)
    if parts.head is None:
        return [f"{parts.kind}.{layer}"]
    if not 0 <= parts.head < info.n_heads:
        raise ValidationProblem(
            f"site {name!r}: head {parts.head} is out of range: model {info.id} has {info.n_heads} heads per layer "
            f"(0–{info.n_heads - 1})",
            field,
        )
    if parts.part is not None:
        reason = _part_refusal(info, parts.part)
        if reason is not None:
            raise ValidationProblem(f"site {name!r} cannot be patched on model {info.id}: {reason}", field)
    return [f"head.{layer}.{parts.head}" + (f".{parts.part}" if parts.part else "")]


def _layer(name: str, layer: int, info: ModelInfo, field: str) -> int:
    if not 0 <= layer < info.n_layers:
        raise ValidationProblem(
            f"site {name!r}: layer {layer} is out of range: model {info.id} has {info.n_layers} layers "
            f"(0–{info.n_layers - 1})",
            field,
        )
    return layer


def _part_refusal(info: ModelInfo, part: str) -> str | None:
    """Why a head's q, k or v cannot be patched on this model (the engine's rules); None where it can."""
    if part == "pattern":
        return None
    if info.architecture in _FUSED_QKV:
        return (
            f"{_FUSED_QKV[info.architecture]} computes q, k and v in one fused projection; patch head.L.H (the "
            "head's output) instead"
        )
    if part in ("q", "k") and info.architecture in _WHOLE_PROJECTION_QK_NORM:
        return (
            f"{_WHOLE_PROJECTION_QK_NORM[info.architecture]} normalises the query and key projections over all "
            "heads together; patch head.L.H.v or head.L.H instead"
        )
    if part in ("k", "v") and info.n_kv_heads < info.n_heads:
        return (
            f"its keys and values are shared by groups of query heads ({info.n_heads} query heads, "
            f"{info.n_kv_heads} key/value heads), so no {part} belongs to one head; patch head.L.H.q or head.L.H "
            "instead"
        )
    return None


def _check_size(n_pairs: int, n_sites: int, positions: str, settings: Settings, estimate_values: int = 0) -> None:
    """Patched runs and result numbers under the server's limits (with positions 'all', every pair is assumed as
    long as the longest prompt the server takes)."""
    length = max(1, settings.max_prompt_tokens) if positions == "all" else 1
    runs = n_pairs * n_sites * length
    if runs > settings.max_ablations:
        raise ValidationProblem(
            f"too many patched runs: {n_pairs:,} pairs × {n_sites:,} sites"
            + (f" × up to {length} positions" if positions == "all" else "")
            + f" = {runs:,}, above this server's limit of {settings.max_ablations:,} per job; split the job or "
            "patch fewer sites",
            "pairs",
        )
    values = (2 + estimate_values) * runs
    if values > settings.max_result_values:
        raise ValidationProblem(
            f"the result would hold {values:,} numbers, above this server's limit of "
            f"{settings.max_result_values:,}; split the job into several with fewer pairs",
            "pairs",
        )

