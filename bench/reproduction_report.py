"""The reproduction pages, written from the stored summaries alone: every number and count in their prose is
computed here from docs/results/reproduction/*_summary.json, none is typed.

    python bench/reproduction_report.py          # rewrite the pages and the README's reproduction block
    python bench/reproduction_report.py --check  # exit 1 if a page differs from what the summaries give

bench/render_reproduction.py draws the figures (from the raw results) and calls this at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_ablate_client.wire import ComponentSummary, Fit, Resampling, SelfRepair, SelfRepairLayer, Summary

OUT = ROOT / "docs" / "results" / "reproduction"
PAGES = ROOT / "docs" / "results"
README = ROOT / "README.md"
README_START, README_END = "<!-- reproduction: start -->", "<!-- reproduction: end -->"

# The paper's model has 32 layers: its claims are placed on our layers by relative depth, layer l of n ≈ 32·l/n.
PAPER_LAYERS = 32
PAPER_SLOPE_FROM = 13  # "a slope of less than one at all layers past layer 13" (Fig. 7d)
PAPER_R2_LAYER, PAPER_R2 = 23, 0.92  # Fig. 7b
# "~70% restored" in the middle layers: we call it agreement when the median middle-layer slope lies within these.
SEVENTY_BAND = (0.6, 0.8)
MIDDLE = (1 / 3, 2 / 3)  # the middle layers: relative depth in [1/3, 2/3)


@dataclass(frozen=True)
class ModelFacts:
    """What the summaries do not say about a model and its weights."""

    slug: str
    alias: str
    title: str
    setup: str  # the model and its weights, against the paper's


MODELS = (
    ModelFacts(
        "gemma",
        "gemma-3-270m",
        "Gemma-3-270M",
        "Gemma-3-270M is a pretrained base model like the paper's (not instruction-tuned), but 270M parameters and 18 "
        "layers (4 query heads, 1 KV head, head dimension 256, a 262k vocabulary, tied embeddings, Gemma 3's norms "
        "before and after each block) against a 7B model of 32 layers; its weights come from a Q4_K_M GGUF file "
        "de-quantised to float32, so the quantisation error stays in the weights.",
    ),
    ModelFacts(
        "smollm2",
        "smollm2-135m",
        "SmolLM2-135M",
        "SmolLM2-135M-Instruct is instruction-tuned, 135M parameters and 30 layers (9 query heads, 3 KV heads) "
        "against a 7B base model of 32 layers; its weights come from a Q4_1 GGUF file de-quantised to float32.",
    ),
)
RUN_TITLES = {
    "all_seeds": "all prompts, random sources (the paper's setup)",
    "correct": "correctly answered prompts, random sources",
    "different_target": "sources with another top token",
}


@dataclass(frozen=True)
class Run:
    name: str
    document: dict[str, object]
    summary: Summary

    @cached_property  # read once per table row and per finding: built once
    def by_name(self) -> dict[str, ComponentSummary]:
        return {c.component: c for c in self.summary.components}

    @property
    def n_layers(self) -> int:
        return sum(1 for c in self.summary.components if c.component.startswith("attn."))


def load_run(slug: str, name: str) -> Run | None:
    path = OUT / f"hydra_{slug}_{name}_summary.json"
    if not path.exists():
        return None
    document = json.loads(path.read_text())
    return Run(name, document, msgspec.convert(document["summary"], Summary))


# --- formatting ----------------------------------------------------------------------------------------------------


def num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return "0.00" if text == "-0.00" else text.replace("-", "−")


def interval(low: float | None, high: float | None) -> str:
    return f"[{num(low)}, {num(high)}]"


def slope_text(fit: Fit | None) -> str:
    if fit is None or fit.slope is None:
        return "–"
    return f"{num(fit.slope)} {interval(fit.slope_ci_low, fit.slope_ci_high)}"


def r2_text(fit: Fit | None) -> str:
    if fit is None or fit.r2 is None:
        return "–"
    return f"{num(fit.r2)} {interval(fit.r2_ci_low, fit.r2_ci_high)}"


def share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%".replace("-", "−")


def p_text(value: float | None) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 1e-3 else num(value, 3)


def names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"


def count_of(part: Sequence[object], whole: Sequence[object]) -> str:
    return f"{len(part)} of {len(whole)}"


# --- what a layer is, against the paper ------------------------------------------------------------------------------


def paper_layer(layer: int, n_layers: int) -> float:
    return PAPER_LAYERS * layer / n_layers


def past_paper_13(layer: int, n_layers: int) -> bool:
    return paper_layer(layer, n_layers) > PAPER_SLOPE_FROM


def is_middle(layer: int, n_layers: int) -> bool:
    return MIDDLE[0] <= layer / n_layers < MIDDLE[1]


def paper_claim(layer: int, n_layers: int) -> str:
    claims = []
    if past_paper_13(layer, n_layers):
        claims.append("0 < slope < 1")
    if round(PAPER_R2_LAYER * n_layers / PAPER_LAYERS) == layer:
        claims.append(f"R² {PAPER_R2}")
    if is_middle(layer, n_layers):
        claims.append("slope ≈ 0.7")
    return "; ".join(claims) or "–"


def has_downstream(name: str, n_layers: int) -> bool:
    """Every component but the last MLP has a downstream layer (its CE is 0 by construction)."""
    return name != f"mlp.{n_layers - 1}"


def unit_interval(fit: Fit | None) -> bool:
    """The paper's "slope below 1": the whole interval in (0, 1)."""
    return interval_reading(fit) == "in (0, 1)"


def interval_reading(fit: Fit | None) -> str:
    """Where the slope's whole interval lies: in (0, 1), above 1, below 0, or which bound it contains."""
    if fit is None or fit.slope_ci_low is None or fit.slope_ci_high is None:
        return "no fit"
    low, high = fit.slope_ci_low, fit.slope_ci_high
    if 0 < low and high < 1:
        return "in (0, 1)"
    if low > 1:
        return "above 1"
    if high < 0:
        return "below 0"
    return "contains " + " and ".join(
        bound for bound, inside in (("0", low <= 0 <= high), ("1", low <= 1 <= high)) if inside
    )


def overlap(a: Fit | None, b: Fit | None) -> bool:
    if a is None or b is None or None in (a.slope_ci_low, a.slope_ci_high, b.slope_ci_low, b.slope_ci_high):
        return True
    return not (a.slope_ci_high < b.slope_ci_low or b.slope_ci_high < a.slope_ci_low)  # type: ignore[operator]


# --- tables --------------------------------------------------------------------------------------------------------


def layer_table(runs: dict[str, Run], kind: str) -> list[str]:
    """One row per layer of one kind: the paper's claim at that depth, then per run the ablation's efficacy beside
    the slope of CE on Δunembed, with R² and the Holm-adjusted permutation p-value for the paper's setup."""
    main = runs["all_seeds"]
    others = [name for name in ("different_target", "correct") if name in runs]
    header = (
        "| layer | ≈ paper layer | the paper (Fig. 7) | Δunembed | removed by the ablation | slope of CE on Δunembed "
        "[95% CI] | where | R² [95% CI] | p (Holm) |"
        + "".join(f" {RUN_TITLES[name]}: removed · slope [95% CI] |" for name in others)
    )
    lines = [header, "|---:|---:|---|---:|---:|---|---|---|---:|" + "---|" * len(others)]
    n = main.n_layers
    for layer in range(n):
        name = f"{kind}.{layer}"
        c = main.by_name.get(name)
        if c is None:
            continue
        fit = c.ce_vs_unembed
        weak = " ⚠" if c.weak_ablation else ""
        row = (
            f"| {layer} | {paper_layer(layer, n):.1f} | {paper_claim(layer, n) if kind == 'attn' else '–'} | "
            f"{num(c.unembed_effect_mean)} | {share(c.unembed_removed_share)}{weak} | {slope_text(fit)} | "
            f"{interval_reading(fit) if has_downstream(name, n) else 'no downstream layer'} | {r2_text(fit)} | "
            f"{p_text(fit.permutation_p_holm if fit else None)} |"
        )
        for other in others:
            o = runs[other].by_name.get(name)
            row += (
                " – |"
                if o is None
                else f" {share(o.unembed_removed_share)}{' ⚠' if o.weak_ablation else ''} · "
                f"{slope_text(o.ce_vs_unembed)} |"
            )
        lines.append(row)
    return lines


# --- verdicts ------------------------------------------------------------------------------------------------------


def verdict(part: int, whole: int) -> str:
    if whole == 0:
        return "cannot be compared (no layer)"
    if part == whole:
        return "agrees"
    if part == 0:
        return "does not agree"
    return f"agrees at {part} of {whole} layers only"


def attention(run: Run) -> list[ComponentSummary]:
    return [c for c in run.summary.components if c.component.startswith("attn.")]


def layer_of(c: ComponentSummary) -> int:
    return int(c.component.split(".")[1])


def hydra_findings(model: ModelFacts, runs: dict[str, Run]) -> list[str]:
    main = runs["all_seeds"]
    n = main.n_layers
    threshold = main.summary.efficacy_threshold or 0.5
    attn = attention(main)
    late = [c for c in attn if past_paper_13(layer_of(c), n)]
    late_ok = [c.component for c in late if unit_interval(c.ce_vs_unembed)]
    late_strong = [c for c in late if c.weak_ablation is False]
    late_strong_ok = [c.component for c in late_strong if unit_interval(c.ce_vs_unembed)]
    exceptions = [f"{c.component} ({interval_reading(c.ce_vs_unembed)})" for c in late if c.component not in late_ok]
    weak = [c.component for c in main.summary.components if c.weak_ablation]
    removed = [c.unembed_removed_share for c in attn if c.unembed_removed_share is not None]
    lines = []

    lines.append(
        f"- *The premise, Δ̃unembed(k, k) ≈ 0* (§2.5.1–2.5.2: the resample ablation removes the ablated layer's write "
        f"onto the target): the ablation removed less than {share(threshold)} of the clean Δunembed at "
        f"{count_of(weak, main.summary.components)} components ({names(weak)}); over the attention layers the median "
        f"share removed is {share(statistics.median(removed) if removed else None)}. A weak ablation pushes the slope "
        "toward 0 whether or not anything repairs; the table marks such layers ⚠."
    )
    if "different_target" in runs:
        other = runs["different_target"]
        o_attn = attention(other)
        o_removed = [c.unembed_removed_share for c in o_attn if c.unembed_removed_share is not None]
        o_weak = [c.component for c in other.summary.components if c.weak_ablation]
        o_late_ok = [c.component for c in o_attn if past_paper_13(layer_of(c), n) and unit_interval(c.ce_vs_unembed)]
        lines.append(
            '- *Sources with another top token* (`resample_sources: "different_target"`, not the paper\'s choice; '
            f"{other.summary.n_prompts:,} prompts): the median share removed over the attention layers becomes "
            f"{share(statistics.median(o_removed) if o_removed else None)}, {len(o_weak)} components stay below "
            f"{share(threshold)} ({names(o_weak)}), and {count_of(o_late_ok, late)} attention layers past the paper's "
            "layer 13 have a slope interval in (0, 1)."
            + (
                f" Its prompts are the first {other.summary.n_prompts:,}, the random-source run's all "
                f"{main.summary.n_prompts:,}: the two differ in prompts as well as in sources."
                if other.summary.n_prompts != main.summary.n_prompts
                else ""
            )
        )
    lines.append(
        f"- *A slope below 1 at every attention layer past layer 13* (Fig. 7d; here the layers past relative depth "
        f"13/32, attn.{layer_of(late[0]) if late else '–'}–{n - 1}): **{verdict(len(late_ok), len(late))}** with the "
        f"whole 95% interval in (0, 1) ({count_of(late_ok, late)}; not: {names(exceptions)}). Among those layers whose "
        f"ablation removed at least {share(threshold)} of Δunembed: {count_of(late_strong_ok, late_strong)}."
    )
    fitted = [c for c in attn if c.ce_vs_unembed and c.ce_vs_unembed.r2 is not None]
    best = max(fitted, key=lambda c: c.ce_vs_unembed.r2 or 0.0) if fitted else None  # type: ignore[union-attr]
    paper_r2_layer = round(PAPER_R2_LAYER * n / PAPER_LAYERS)
    at = main.by_name.get(f"attn.{paper_r2_layer}")
    reaching = [c.component for c in fitted if (c.ce_vs_unembed.r2_ci_high or 0) >= PAPER_R2]  # type: ignore[union-attr]
    most = [c.component for c in fitted if (c.ce_vs_unembed.r2_ci_low or 0) > 0.5]  # type: ignore[union-attr]
    if best is not None and at is not None:
        reading = (
            "agrees"
            if reaching
            else f"partly: the fit explains most of the variance (R² interval above 0.5) at {names(most)}, but no "
            f"layer's R² interval reaches {PAPER_R2}"
            if most
            else "does not agree"
        )
        lines.append(
            f"- *A fit that explains most of the variance* (Fig. 7b: R² {PAPER_R2} at layer {PAPER_R2_LAYER} of 32, "
            f"≈ attn.{paper_r2_layer} here): **{reading}**. attn.{paper_r2_layer}'s R² is "
            f"{r2_text(at.ce_vs_unembed)}; the best attention layer is {best.component}, {r2_text(best.ce_vs_unembed)}."
        )
    middle = [c for c in attn if is_middle(layer_of(c), n) and c.ce_vs_unembed and c.ce_vs_unembed.slope is not None]
    if middle:
        slopes = [float(c.ce_vs_unembed.slope) for c in middle]  # type: ignore[union-attr,arg-type]
        median = statistics.median(slopes)
        inside = SEVENTY_BAND[0] <= median <= SEVENTY_BAND[1]
        lines.append(
            f"- *About 70% restored in the middle layers* (the conclusion; this slope): **"
            f"{'agrees' if inside else 'does not agree'}**. Over the middle third of the attention layers "
            f"(attn.{layer_of(middle[0])}–{layer_of(middle[-1])}) the slopes run from {num(min(slopes))} to "  # type: ignore[type-var]
            f"{num(max(slopes))}, median {num(median)} (agreement: a median within {SEVENTY_BAND[0]}–"  # type: ignore[type-var]
            f"{SEVENTY_BAND[1]}); the ablation is weak at {count_of([c for c in middle if c.weak_ablation], middle)} "
            "of these layers."
        )
    significant = [c.component for c in attn if c.ce_vs_unembed and (c.ce_vs_unembed.permutation_p_holm or 1) < 0.05]
    lines.append(
        f"- *Is there a relation at all?* The slope differs from a null with Δunembed shuffled across prompts at "
        f"{count_of(significant, attn)} attention layers (permutation test, Holm-adjusted over the job's components, "
        "p < 0.05)."
    )
    corr = [c.unembed_drop_correlation for c in attn if c.unembed_drop_correlation is not None]
    exceeds = [c.unembed_exceeds_drop_share for c in attn if c.unembed_exceeds_drop_share is not None]
    if corr and exceeds:
        lines.append(
            f"- *Fig. 2, Δunembed against the drop*: across prompts the correlation per attention layer runs from "
            f"{num(min(corr))} to {num(max(corr))} (median {num(statistics.median(corr))}); the share of prompts "
            f"whose Δunembed exceeds the drop runs from {share(min(exceeds))} to {share(max(exceeds))}. The paper "
            "shows these per layer in its Fig. 2 without a single number to compare; they are not a measure of repair "
            "on their own (a weak ablation also leaves the drop below Δunembed)."
        )
    downstream = [c for c in attn if c.ce_attn_vs_unembed and c.ce_mlp_vs_unembed and layer_of(c) < n - 1]
    halves = (
        [c for c in downstream if layer_of(c) < n // 2],
        [c for c in downstream if layer_of(c) >= n // 2],
    )

    def mlp_better(group: list[ComponentSummary]) -> list[str]:
        return [
            c.component
            for c in group
            if (c.ce_mlp_vs_unembed.r2 or 0) > (c.ce_attn_vs_unembed.r2 or 0)  # type: ignore[union-attr]
        ]

    early_mlp, late_mlp = mlp_better(halves[0]), mlp_better(halves[1])
    early_share = len(early_mlp) / max(len(halves[0]), 1)
    late_share = len(late_mlp) / max(len(halves[1]), 1)
    fig8 = (
        "agrees" if late_share > early_share
        else "partly: the MLP part is the better predictor in both halves, without a rise with depth"
        if min(early_share, late_share) > 0.5
        else "does not agree"
    )
    lines.append(
        f"- *Fig. 8, which part of CE becomes the better predictor with depth* (the paper: the MLP part): CE's MLP "
        f"part has the larger R² on Δunembed at {count_of(early_mlp, halves[0])} attention layers of the first half "
        f"and {count_of(late_mlp, halves[1])} of the second: **{fig8}** (R² point estimates, no interval on their "
        "difference)."
    )
    lines += erasure_findings(main)
    mean_ce = [c for c in main.summary.components if has_downstream(c.component, n)]
    negative = [c.component for c in mean_ce if c.compensatory_effect_mean + 2 * c.compensatory_effect_se < 0]
    positive = [c.component for c in mean_ce if c.compensatory_effect_mean - 2 * c.compensatory_effect_se > 0]
    lines.append(
        f"- *Mean CE* (not the paper's statistic): below 0 by more than 2 standard errors at "
        f"{count_of(negative, mean_ce)} components with a downstream layer, above 0 at {len(positive)}: on average "
        f"the downstream layers {'amplify' if len(negative) > len(positive) else 'repair'} the resample ablation more "
        "often than they "
        f"{'repair' if len(negative) > len(positive) else 'amplify'} it, while the slope measures how CE moves with "
        "Δunembed across prompts."
    )
    if "correct" in runs:
        corr_run = runs["correct"]
        apart = [c.component for c in attn if not overlap(c.ce_vs_unembed, corr_run.by_name[c.component].ce_vs_unembed)]
        corr_late_ok = [
            c.component for c in attention(corr_run) if past_paper_13(layer_of(c), n) and unit_interval(c.ce_vs_unembed)
        ]
        lines.append(
            f"- *The correctly answered prompts* ({corr_run.summary.n_prompts:,} of "
            f"{main.summary.n_prompts:,}, a further analysis, not the paper's setup): {count_of(corr_late_ok, late)} "
            f"attention layers past the paper's layer 13 have a slope interval in (0, 1); the two prompt sets' slope "
            f"intervals do not overlap at {count_of(apart, attn)} attention layers ({names(apart)})"
            + (": there, which prompts are measured changes the slope." if apart else ".")
        )
    return lines


def erasure_findings(run: Run) -> list[str]:
    n = run.n_layers
    mlps = [c for c in run.summary.components if c.component.startswith("mlp.")]
    late = [c for c in mlps if layer_of(c) >= 2 * n // 3]
    erasing = [c for c in late if c.unembed_effect_mean + 2 * c.unembed_effect_se < 0]
    if not erasing or not run.summary.erasure:
        return [
            f"- *Late MLPs erase the top token*: **does not agree**: none of the last third's MLPs "
            f"(mlp.{layer_of(late[0]) if late else '–'}–{n - 1}) writes clearly below 0 onto the target in the "
            "clean run."
        ]
    strongest = min(erasing, key=lambda c: c.unembed_effect_mean)
    fits = [e for e in run.summary.erasure if e.mlp == strongest.component and e.fit.slope is not None]
    less = [e for e in fits if (e.fit.slope or 0) > 0]
    slopes = [e.fit.slope for e in fits]
    return [
        f"- *Late MLPs erase the top token* (the paper's erasure): {count_of(erasing, late)} MLPs of the last third "
        "write below 0 onto the target in the clean run by more than 2 standard errors "
        f"({names([c.component for c in erasing])}); "
        f"the strongest, {strongest.component}, writes {num(strongest.unembed_effect_mean)}. *And erase less when an "
        f"upstream attention layer that promotes it is ablated*: regressed on the ablated attention layer's Δunembed, "
        f"{strongest.component}'s response has a positive slope for {count_of(less, fits)} upstream attention layers "
        f"(median {num(statistics.median(slopes) if slopes else None)} centred logit per unit; point estimates, "  # type: ignore[type-var]
        "without intervals): "
        f"**{'agrees' if len(less) * 2 > len(fits) else 'does not agree'}** by that count."
    ]


def dataset_limit(run: Run) -> int | None:
    request = run.document.get("request")
    dataset = request.get("dataset") if isinstance(request, dict) else None
    return dataset.get("limit") if isinstance(dataset, dict) else None


def run_commands(model: ModelFacts, runs: dict[str, Run]) -> list[str]:
    commands = []
    for name, run in runs.items():
        if name == "correct":
            continue
        limit = dataset_limit(run)
        commands.append(
            f"python bench/reproduce_hydra.py --model {model.alias} --runs {name}"
            + (f" --limit {limit}" if limit else "")
        )
    return commands


def run_lines(model: ModelFacts, runs: dict[str, Run]) -> list[str]:
    main = runs["all_seeds"]
    spec = main.document["spec"]
    assert isinstance(spec, dict)
    lines = []
    for name, run in runs.items():
        doc = run.document
        if name == "correct":
            lines.append(
                f"- **{RUN_TITLES[name]}**: the {run.summary.n_prompts} prompts of that run whose clean top token is "
                "the first token of the known_1000 answer, summarised by the service's own summary code from that "
                "run's per-prompt results (the same sources, so no new job)."
            )
            continue
        n_prompts = run.summary.n_prompts
        runs_per_prompt = int(spec["resample_samples"]) * int(spec.get("source_seeds", 1))  # type: ignore[call-overload]
        ablated = n_prompts * len(run.summary.components) * runs_per_prompt
        limit = dataset_limit(run)
        scope = f"on the first {limit:,} prompts of known_1000, sources drawn among them: " if limit else ""
        lines.append(
            f"- **{RUN_TITLES[name]}**: {scope}{n_prompts:,} prompts × {len(run.summary.components)} components × "
            f"{runs_per_prompt} patches = {ablated:,} ablated runs in {float(doc['elapsed_s']):,.0f} s of job time "  # type: ignore[arg-type]
            f"on a 2-core CPU; request `{json.dumps(doc['request'])}`."
        )
    return lines


def figure_lines(model: ModelFacts, runs: dict[str, Run]) -> list[str]:
    """Links to the figures drawn for the runs this page shows (bench/render_reproduction.py)."""
    titles = {"fig2": "Fig. 2", "fig7": "Fig. 7", "fig8": "Fig. 8", "erasure": "erasure"}
    links = [
        f"[{titles[name]}, {RUN_TITLES[run]}](reproduction/{name}_{model.slug}_{run}.png)"
        for run in runs
        for name in titles
        if (OUT / f"{name}_{model.slug}_{run}.png").exists()
    ]
    lines = ["Figures (1200 × 800):", "", f"![Fig. 7](reproduction/fig7_{model.slug}_all_seeds.png)", ""]
    lines += [" · ".join(links), ""]
    if (OUT / f"profile_{model.slug}.png").exists():
        lines += [
            "Fig. 1/3, one prompt's per-layer direct effects in the clean run and the ablated one, one faint line per "
            "resample patch (a `keep_samples` job on the correctly answered prompts among the first 60): where the "
            "faint lines keep the ablated layer's own write, the ablation did not remove it.",
            "",
            f"![Fig. 1/3](reproduction/profile_{model.slug}.png)",
            "",
        ]
    return lines


def hydra_page(model: ModelFacts, runs: dict[str, Run]) -> str:
    main = runs["all_seeds"]
    n = main.n_layers
    resampling = main.summary.resampling or Resampling(unit="prompt", n_units=0, n_boot=0, ci_level=0.95, seed=0)
    provenance = main.document["provenance"]
    assert isinstance(provenance, dict)
    sha = str(provenance.get("model_file_sha256") or "")[:12]
    seeds = main.summary.source_seeds or []
    lines = [
        f"# The Hydra effect on {model.title}",
        "",
        "<!-- Written by bench/reproduction_report.py from the summaries in reproduction/; do not edit by hand. -->",
        "",
        f"The setup of McGrath et al. (2023) run through the service (API → Redis → Celery worker) on {model.title}.",
        "",
        "**What was run.** The `hydra` preset over known_1000 (resample ablation of every attention and MLP layer at "
        "the final position, effects averaged over 15 patches, the centred logit of each prompt's clean top token, "
        f"the clean norm scale), with the 15 sources of each prompt drawn as {len(seeds)} independent seeded draws of "
        f"3 (seeds {names([str(s) for s in seeds])}), so that the bootstrap can redraw sources:",
        "",
        *run_lines(model, runs),
        "",
        f"Intervals: {resampling.ci_level:.0%} percentile bootstrap, {resampling.n_boot:,} resamples of the "
        f"{resampling.n_units} {resampling.unit}s (known_1000's relations, resampled whole) with the source draw "
        "redrawn per prompt; p: a permutation test of the slope (Δunembed shuffled across prompts), Holm-adjusted over "
        "the job's components. The model file's SHA-256 begins "
        f"`{sha}`; the summaries with their full provenance are beside the figures: "
        + ", ".join(f"[{name}](reproduction/hydra_{model.slug}_{name}_summary.json)" for name in runs)
        + ".",
        "",
        "**The paper's statistic** per ablated layer, across prompts: the least-squares slope of the compensatory "
        "effect CE (Eq. 33–34: the downstream layers' changes of direct effect, the final norm excluded) on the "
        "ablated layer's clean unembedding impact Δunembed (Eq. 10); 1 is full compensation, 0 none. Beside it, the "
        "ablation's efficacy: the share of Δunembed the ablation removed, 1 − mean Δ̃unembed(k, k) / mean Δunembed "
        f"(⚠: below {share(main.summary.efficacy_threshold)}). The paper's 32 layers are placed on ours by relative "
        f"depth; the paper gives per-layer values only as plots (Fig. 7d), so its column holds what its text states.",
        "",
        "**Attention layers ablated**",
        "",
        *layer_table(runs, "attn"),
        "",
        "**MLP layers ablated**",
        "",
        *layer_table(runs, "mlp"),
        "",
        "**Beside the paper** (the paper's setup: all prompts, the argmax target, random sources):",
        "",
        *hydra_findings(model, runs),
        "",
        f"**Setup differences.** {model.setup} The prompts are the paper's kind (known_1000: 1,209 Counterfact "
        "subject–relation prompts); the paper measured all of Counterfact. Layers compare by relative depth only "
        f"(our {n} layers against its 32).",
        "",
        "Regenerate: "
        + "; ".join(f"`{command}`" for command in run_commands(model, runs))
        + " (each starts its own stack), then `python bench/render_reproduction.py` (figures from the raw results, "
        "which stay out of git, then these pages).",
        "",
        *figure_lines(model, runs),
    ]
    return "\n".join(lines)


# --- Rushing & Nanda -----------------------------------------------------------------------------------------------


def rn_page(model: ModelFacts, document: dict[str, object]) -> str:
    summary = msgspec.convert(document["summary"], Summary)
    repair: list[SelfRepair] = summary.self_repair or []
    layers: list[SelfRepairLayer] = summary.self_repair_layers or []
    n_layers = 1 + max((r.layer for r in repair), default=0)
    half = n_layers // 2
    late = [r for r in repair if r.layer >= half]
    fractions = [r.self_repair_fraction for r in repair if r.self_repair_fraction is not None]
    repairs = [r for r in repair if r.self_repair_ci_low is not None and r.self_repair_ci_low > 0]
    anti = [r for r in repair if r.self_repair_ci_high is not None and r.self_repair_ci_high < 0]
    over = [r for r in repair if r.over_correction_ci_low is not None and r.over_correction_ci_low > 0.5]
    norm = [r for r in repair if r.norm_share is not None]
    norm_max = max(norm, key=lambda r: r.norm_share or 0.0) if norm else None
    norm_30 = [r for r in norm if (r.norm_share_ci_low or 0) >= 0.3]

    def mean_of(items: Sequence[SelfRepair], get: Callable[[SelfRepair], float | None]) -> float | None:
        values = [v for v in (get(r) for r in items) if v is not None]
        return statistics.fmean(values) if values else None

    rows = [
        "| layer | heads | self-repair, mean over heads [95% CI] | R&N direct effect | norm share of DE | "
        "heads' share | MLPs' share |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for trend in layers:
        heads = [r for r in repair if r.layer == trend.layer]
        rows.append(
            f"| {trend.layer} | {trend.n_components} | {num(trend.self_repair_mean, 3)} "
            f"{interval(trend.ci_low, trend.ci_high)} | {num(mean_of(heads, lambda r: r.unembed_effect_mean), 3)} | "
            f"{num(mean_of(heads, lambda r: r.norm_share))} | {num(mean_of(heads, lambda r: r.heads_share))} | "
            f"{num(mean_of(heads, lambda r: r.mlps_share))} |"
        )
    late_repair = sum(r.self_repair_mean for r in late)
    late_de = sum(r.unembed_effect_mean for r in late)
    late_ratio = late_repair / late_de if late_de else float("nan")
    lines = [
        f"# Self-repair at every position on {model.title}",
        "",
        "<!-- Written by bench/reproduction_report.py from the summaries in reproduction/; do not edit by hand. -->",
        "",
        f"The [per-position protocol](../guides/per-position.md) of Rushing & Nanda (2024) on {model.title}: the "
        f"`rushing_nanda` preset exactly, on the first {document['documents']} documents of `known_1000_text`, cut to "
        f"{document['max_tokens']} tokens: {summary.n_pairs:,} (document, position) pairs; every head resample-ablated "
        "at every position, measured at every position with the true next token as the target and the centred logit "
        "(their TransformerLens models centre the unembedding); per head the top "
        f"{100 * (summary.top_fraction or 0):.0f}% of pairs by the head's direct effect as they define it (its clean "
        f"write onto the next token with the clean final-norm scale), {repair[0].n_pairs if repair else 0} pairs per "
        f"head. {float(document['elapsed_s']):,.0f} s on a 2-core CPU "  # type: ignore[arg-type]
        f"(`python bench/reproduce_rushing_nanda.py --model {model.alias} --documents {document['documents']} "
        f"--max-tokens {document['max_tokens']}`). Intervals: 95% bootstrap over documents. Sign: self-repair is their "
        "ΔTE − ΔDE, our DE − TE (drops clean − ablated).",
        "",
        f"![self-repair per head against layer](reproduction/self_repair_{model.slug}.png)",
        "",
        "Per layer: the mean over its heads (their Fig. 1's trend) and the mean over its heads of R&N's clipped shares "
        "of the direct effect, clip(part / DE, 0, 1) per pair:",
        "",
        *rows,
        "",
        "Beside their findings (GPT-2 and Pythia, 160M and up, on open web text; here "
        f"{model.title} on short encyclopaedic sentences):",
        "",
        f"- *Self-repair exists and is imperfect*: **{'agrees' if 0 < late_ratio < 1 else 'does not agree'}** "
        f"in layers {half}–{n_layers - 1}, where the heads' summed self-repair is {num(late_ratio)} of their summed "
        f"direct effect; over every head the median self-repair is "
        f"{num(statistics.median(fractions) if fractions else None)} of the head's direct effect, and "
        f"{count_of(repairs, repair)} heads have a self-repair interval above 0, {len(anti)} below 0 (early heads "
        "whose ablation moves the output more than their direct write: indirect effects, not repair).",
        f"- *Noisy, sometimes over-correcting*: {count_of(over, repair)} heads over-correct (self-repair above the "
        "direct effect) on more than half of their top pairs, the whole interval of that share above one half.",
        f"- *LayerNorm repairs up to ~30% of the direct effect*: **"
        f"{'agrees' if not norm_30 else f'larger here at {len(norm_30)} heads'}**. The norm's clipped share of the "
        f"direct effect, per head, reaches {num(norm_max.norm_share if norm_max else None)} "
        f"({norm_max.component if norm_max else '–'}, "
        f"{interval(*((norm_max.norm_share_ci_low, norm_max.norm_share_ci_high) if norm_max else (None, None)))}"
        f"); {count_of(norm_30, norm)} heads have a share whose interval lies at or above 0.30. Like is compared with "
        "like: the same clipped per-pair ratio over the same top 2% by the same direct effect. Where a head's direct "
        "effect is near 0 the per-pair ratios clip at 0 or 1, so the shares of heads with small direct effects say "
        "little.",
        "",
        "What this does not show: their copy-suppression analysis (IOI on GPT-2 small) has no counterpart here, and "
        f"{document['documents']} documents give {repair[0].n_pairs if repair else 0} pairs per head, so per-head "
        "means are noisy; more documents need only `--documents`.",
        "",
    ]
    return "\n".join(lines)


# --- the README's block --------------------------------------------------------------------------------------------


def readme_block(hydra: dict[str, dict[str, Run]]) -> str:
    lines = [README_START, "Reproductions through the service, every count computed from the stored summaries:", ""]
    for model in MODELS:
        runs = hydra.get(model.slug)
        if not runs:
            continue
        main = runs["all_seeds"]
        n = main.n_layers
        late = [c for c in attention(main) if past_paper_13(layer_of(c), n)]
        ok = [c for c in late if unit_interval(c.ce_vs_unembed)]
        weak = [c for c in main.summary.components if c.weak_ablation]
        lines.append(
            f"- [The Hydra effect on {model.title}](docs/results/hydra-{model.slug}.md), all "
            f"{main.summary.n_prompts:,} known_1000 prompts, the paper's setup: the CE-on-Δunembed slope's interval "
            f"lies in (0, 1) at {count_of(ok, late)} attention layers past the paper's layer 13; the ablation removed "
            f"less than {share(main.summary.efficacy_threshold)} of Δunembed at "
            f"{count_of(weak, main.summary.components)} components."
        )
        if (OUT / f"rushing_nanda_{model.slug}_summary.json").exists():
            lines.append(
                f"- [Self-repair at every position on {model.title}](docs/results/rushing-nanda-{model.slug}.md) "
                "(Rushing & Nanda's protocol)."
            )
    lines.append(README_END)
    return "\n".join(lines)


def pages() -> dict[Path, str]:
    """Every page this module writes, with its text."""
    written: dict[Path, str] = {}
    hydra: dict[str, dict[str, Run]] = {}
    for model in MODELS:
        runs = {name: run for name in RUN_TITLES if (run := load_run(model.slug, name)) is not None}
        if "all_seeds" in runs:
            hydra[model.slug] = runs
            written[PAGES / f"hydra-{model.slug}.md"] = hydra_page(model, runs)
        rn = OUT / f"rushing_nanda_{model.slug}_summary.json"
        if rn.exists():
            written[PAGES / f"rushing-nanda-{model.slug}.md"] = rn_page(model, json.loads(rn.read_text()))
    readme = README.read_text()
    start, end = readme.find(README_START), readme.find(README_END)
    if start >= 0 and end > start:
        written[README] = readme[:start] + readme_block(hydra) + readme[end + len(README_END) :]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a page differs from what the summaries give")
    args = parser.parse_args()
    stale = []
    for path, text in pages().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        raise SystemExit(
            "pages differ from the summaries (run python bench/reproduction_report.py): " + ", ".join(stale)
        )


if __name__ == "__main__":
    main()
