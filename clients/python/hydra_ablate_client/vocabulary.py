"""The service's words, defined once: every option list, the component-name grammar and the per-position rule.

Standard library only, so every side imports it: the API's wire types (hydra_ablate_client.wire), the engine
(worker/engine/), the worker, the figures, the CLI's choices and the clients derive theirs from these (option
lists through typing.get_args). A new option list goes here, under the one name everyone uses.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple, get_args

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "running")
TERMINAL_STATES: tuple[JobState, ...] = tuple(s for s in get_args(JobState) if s not in ACTIVE_STATES)
AblationKind = Literal["resample", "mean", "zero"]
PositionScope = Literal["final", "all"]
MetricName = Literal["logit", "centered_logit", "logprob", "logit_diff"]
NormScaleMode = Literal["clean", "ablated"]
ResampleFrom = Literal["next", "random"]
# Which prompts may be resample sources: any other prompt of the job (or relation), or only those whose clean top
# token differs from the prompt's target (docs/concepts/definitions.md, "Resample sources").
ResampleSources = Literal["any", "different_target"]
ResampleWithin = Literal["job", "relation"]
PresetName = Literal["hydra", "rushing_nanda"]
MeasurePositions = Literal["final", "all"]
TargetName = Literal["clean_top", "next_token"]
ResponseBasisName = Literal["layers", "heads"]
PositionResponses = Literal["split", "full"]
# Attribution-patching estimates beside the exact effects (docs/concepts/attribution.md): AtP, AtP* (QK fix, GradDrop).
EstimateName = Literal["atp", "atp_star"]
DatasetName = Literal["known_1000"]
CorpusName = Literal["known_1000_text"]
FigureName = Literal[
    "te_vs_de", "layer_effects", "response_heatmap", "erasure", "self_repair", "profile", "fig2", "fig7", "fig8",
    "estimates", "knockout_response", "patching_grid",
]
FIGURE_NAMES: tuple[FigureName, ...] = get_args(FigureName)
FigureFormat = Literal["png", "svg", "pdf"]
FIGURE_MEDIA_TYPES: dict[FigureFormat, str] = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}
ExportFormat = Literal["json", "msgpack", "csv", "parquet"]
# What a fit's bootstrap resamples: prompts one by one, or whole dataset relations (clusters of prompts); a
# per-position summary resamples documents.
BootstrapUnit = Literal["prompt", "relation"]
ResamplingUnit = Literal["prompt", "relation", "document"]
# Where a served model's weights come from, as the open model list shows it: never a file-system path.
ModelSourceKind = Literal["builtin", "local", "hub"]
# Where a job is: queued → loading_model → clean_passes → ablating → merging → finished. A chunked job's phase only
# moves forward, so parallel chunks never make it jump back.
JobPhase = Literal["queued", "loading_model", "clean_passes", "ablating", "merging", "finished"]
JOB_PHASES: tuple[JobPhase, ...] = get_args(JobPhase)

# --- component names ------------------------------------------------------------------------------------------

ComponentKind = Literal["attn", "mlp", "head"]
# A component name as a request may write it: a kind (every one of that kind), `head.L` (every head of layer L),
# or an explicit name `attn.L`, `mlp.L`, `head.L.H`. The API's schema validates with this very pattern.
COMPONENT_PATTERN = r"^(attn|mlp|head)(\.\d+){0,2}(?![\s\S])"
_COMPONENT = re.compile(COMPONENT_PATTERN)


class ComponentParts(NamedTuple):
    """A component name's parts: ("head", 3, 5) for head.3.5, ("attn", 12, None) for attn.12, ("mlp", None, None)
    for the bare kind."""

    kind: str
    layer: int | None
    head: int | None

    @property
    def explicit(self) -> bool:
        """One component: attn.L, mlp.L or head.L.H (not a kind, not head.L, not attn.L.H)."""
        return self.layer is not None and (self.head is not None) == (self.kind == "head")


def parse_component(name: str) -> ComponentParts:
    """The parts of a component name (COMPONENT_PATTERN); ValueError for a name outside the grammar."""
    if _COMPONENT.match(name) is None:
        raise ValueError(f"bad component name {name!r}: use attn.L, mlp.L or head.L.H")
    kind, *numbers = name.split(".")
    layer = int(numbers[0]) if numbers else None
    head = int(numbers[1]) if len(numbers) > 1 else None
    return ComponentParts(kind, layer, head)


# --- activation patching: sites, directions, knockout sets ----------------------------------------------------

# denoise: the corrupted run with the clean activation patched in; noise: the clean run with the corrupted one.
PatchDirection = Literal["denoise", "noise"]
PatchMetric = Literal["logit_diff"]
# A patching site: `resid_pre.L` (the residual stream entering block L), `attn.L`, `mlp.L` (what they write),
# `head.L.H` (the head's output, its slice of the output projection's input) and `head.L.H.q|k|v|pattern`.
PATCH_SITE_PATTERN = r"^((resid_pre|attn|mlp)\.\d+|head\.\d+\.\d+(\.(q|k|v|pattern))?)(?![\s\S])"
_PATCH_SITE = re.compile(PATCH_SITE_PATTERN)
# Pairs whose clean and corrupted metrics differ by less than this (in logits) get no patching score by default
# (the engine's PAIR_EPSILON, worker/engine/patching.py).
DEFAULT_PAIR_EPSILON = 1e-3
# Built-in paired datasets of patching jobs (service/core/ioi_pairs.py: indirect-object identification).
PairDatasetName = Literal["ioi"]
# What a job does to each component: ablate it (the default), or patch it between a clean and a corrupted prompt.
Intervention = Literal["ablate", "patch"]
# What a request's `components` may name: an ablation component (COMPONENT_PATTERN), a patching site
# (PATCH_SITE_PATTERN) or `resid_pre` (every layer's); which apply depends on the job's intervention, checked on
# submit.
COMPONENT_OR_SITE_PATTERN = (
    r"^((attn|mlp|head)(\.\d+){0,2}|resid_pre(\.\d+)?|head\.\d+\.\d+\.(q|k|v|pattern))(?![\s\S])"
)
# A knockout set is named by its members joined with "+", in the order given: "attn.3+head.5.1".
KNOCKOUT_SEPARATOR = "+"


class PatchSite(NamedTuple):
    """A patching site's parts: ("head", 3, 5, "q") for head.3.5.q, ("resid_pre", 2, None, None) for resid_pre.2."""

    kind: str
    layer: int
    head: int | None
    part: str | None


def parse_patch_site(name: str) -> PatchSite:
    """The parts of a patching site name (PATCH_SITE_PATTERN); ValueError for a name outside the grammar."""
    if _PATCH_SITE.match(name) is None:
        raise ValueError(
            f"bad patching site {name!r}: use resid_pre.L, attn.L, mlp.L, head.L.H or head.L.H.q|k|v|pattern"
        )
    kind, *rest = name.split(".")
    head = int(rest[1]) if len(rest) > 1 else None
    part = rest[2] if len(rest) > 2 else None
    return PatchSite(kind, int(rest[0]), head, part)


def knockout_name(members: list[str] | tuple[str, ...]) -> str:
    """The component name of a knockout set: its members joined with '+' ("attn.3+head.5.1")."""
    return KNOCKOUT_SEPARATOR.join(members)


def is_knockout_name(name: str) -> bool:
    """Whether a result's component is a knockout set ("attn.3+head.5.1"); a one-member set is named like its
    member and counts as that component."""
    return KNOCKOUT_SEPARATOR in name


def knockout_members(name: str) -> list[str]:
    """The members of a knockout set's name, in order (a plain component name: itself)."""
    return name.split(KNOCKOUT_SEPARATOR)


def component_columns(name: str) -> ComponentParts:
    """(kind, layer, head) of a result's component as tables write them: a knockout set of several members has
    kind "knockout" and no layer or head (its members span layers; its name lists them)."""
    if is_knockout_name(name):
        return ComponentParts("knockout", None, None)
    return parse_component(name)


# --- the per-position rule ------------------------------------------------------------------------------------


def is_per_position(measure_positions: str, target: str) -> bool:
    """Whether a job is measured by the per-position engine (its results carry `positions` columns): any
    per-position option away from the final-position defaults. `response_basis` applies to both engines."""
    return measure_positions == "all" or target == "next_token"
