"""A finished job's figures, drawn headless from its JobResult: pure functions, no I/O, no pyplot.

Figures are built on `matplotlib.figure.Figure` objects, never through pyplot, so rendering touches no global
figure manager or GUI backend; renders are still serialised by a lock, since matplotlib promises no thread safety
and drawing holds the GIL anyway. matplotlib is imported inside the drawing
functions: it costs about half a second, and the API, the worker and the CLI import this module for its names.

A figure's size is `width` × `height` pixels at `dpi` (default 1200 × 800 at 100 dpi, so 12 × 8 in): a PNG is
exactly that many pixels, an SVG or PDF that many inches (width / dpi) in points. Nothing crops it (no tight bounding
box); constrained layout fits the content inside that frame. Text is at least 8 pt (`MIN_FONT_PT`). Effects are in
the job's metric; for the paper's `centered_logit` the unit is "centred logit".

The paper's figures (McGrath et al. 2023: Fig. 1/3 `profile`, Fig. 2 `fig2`, Fig. 7 `fig7`, Fig. 8 `fig8`) are in
service/rendering/paper_figures.py; this module has the service's own four and the rendering. `estimates`,
`knockout_response` and `patching_grid` (the one figure of a patching job) have modules of their own.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from hydra_ablate_client.vocabulary import (
    FIGURE_MEDIA_TYPES,
    FIGURE_NAMES,
    FigureFormat,
    FigureName,
    is_knockout_name,
    parse_component,
)
from hydra_ablate_client.wire import JobResult
from service.rendering import estimate_figure, knockout_figure, paper_figures, patch_figure
from service.rendering.figure_style import (
    MIN_FONT_PT,
    RENDER_LOCK,
    FigureOptionError,
    kind_and_layer,
    knockout_note,
    layer_ticks,
    metric_unit,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
WIDTH_PX, HEIGHT_PX = 1200, 800
FIGSIZE_IN = (WIDTH_PX / DPI, HEIGHT_PX / DPI)
MIN_PX, MAX_PX = 400, 4000
MIN_DPI, MAX_DPI = 50, 400
PAPER_FIGURES: frozenset[FigureName] = frozenset({"profile", "fig2", "fig7", "fig8"})  # final-position jobs only

FIGURE_DESCRIPTIONS: dict[FigureName, str] = {
    "te_vs_de": "per-prompt total vs direct effect of every component, y = x and the TE-on-DE fit (slope, R²)",
    "layer_effects": "mean DE, TE, the paper's compensatory effect CE and the norm's part per layer (± SE)",
    "response_heatmap": "mean downstream response: attention, head and MLP ablations apart, × responding layer (with "
    "`response_basis: \"heads\"` × responding head: the head → head matrix), plus the final norm's part; robust "
    "symmetric colour limits",
    "erasure": "mean clean direct effect of every layer component (negative: erasure), and the late MLPs' response "
    "to attention ablations regressed on the ablated layer's Δunembed",
    "profile": "the paper's Fig. 1/3 for one prompt (`prompt`) and ablated component (`component`): clean "
    "per-layer Δunembed, the ablated run's, and one faint line per resample patch (needs keep_samples)",
    "fig2": "the paper's Fig. 2: Δunembed and the ablation's drop per layer, the drop against Δunembed per prompt "
    "(points outside the axes counted on the panel), their correlation across prompts and the share of prompts with "
    "Δunembed > drop",
    "fig7": "the paper's Fig. 7: CE against Δunembed for attention (coloured by depth), the best-fitting layer, MLP "
    "layers, and slope (95% bootstrap interval) and R² per layer",
    "fig8": "the paper's Fig. 8: CE's attention part and MLP part regressed on Δunembed, per attention layer",
    "self_repair": "per-position jobs: each component's self-repair over its top 2% pairs by direct effect against "
    "its layer, with the per-layer mean and its interval (Rushing & Nanda Fig. 1), and per layer the parts done by "
    "heads, MLPs and the norm, with the norm's share of the direct effect",
    "estimates": "jobs with `estimates`: every attribution-patching estimate (AtP against the total effect, AtP* "
    "against its magnitude) against the exact value per prompt and component, coloured by the compensatory effect, "
    "with each method's rank correlation and top-k recall; on a patching job per pair, site and patched position "
    "against the exact patch's effect, coloured by site kind",
    "knockout_response": "jobs with `knockouts`: per knockout set (the first four), every component's mean response "
    "to the set's ablation (its direct effect ablated − clean) with 95% intervals over prompts, members marked: "
    "which components take over",
    "patching_grid": "patching jobs: the mean patching score per site, a layer × position heatmap per site kind "
    "(positions all, the clean prompt's tokens on the x axis) or a layer × head grid for heads and a layer × kind "
    "grid for resid_pre/attn/mlp (positions final); the pooled score where no pair was scored",
}
# Which figures draw which results: a patching job's result has no prompts × components to draw from, and an ablation
# result no patching scores. `estimates` draws both kinds, when the job has estimates.
PATCHING_FIGURES: tuple[FigureName, ...] = ("patching_grid",)
ABLATION_FIGURES: tuple[FigureName, ...] = tuple(name for name in FIGURE_NAMES if name not in PATCHING_FIGURES)
BOTH_KINDS: tuple[FigureName, ...] = ("estimates",)

# A knockout set (several components ablated together) gets a marker of its own, coloured by its deepest member.
KIND_MARKERS = {"attn": "o", "mlp": "s", "head": "^", "knockout": "X"}
KIND_COLOURS = {"attn": "tab:blue", "mlp": "tab:orange"}
_RASTERIZE_ABOVE = 5000  # scatter points; past this an SVG of vector dots gets heavy, so dots become an image


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def robust_bound(values: Iterable[float], quantile: float = 0.99) -> float:
    """A symmetric colour limit: the `quantile` of |values| (so one outlier does not wash the map out), > 0."""
    import numpy as np

    finite = np.abs(np.array(_finite(values), dtype=float))
    finite = finite[finite > 0]
    if finite.size == 0:
        return 1.0
    return float(np.quantile(finite, quantile))


def _limits(values: list[float]) -> tuple[float, float]:
    """A padded range that always includes 0, so y = x and the fit cross the origin visibly."""
    lo, hi = min([0.0, *values]), max([0.0, *values])
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def _te_vs_de(fig: Figure, result: JobResult) -> None:
    """The paper's headline plot: points below y = x are effects the rest of the network repaired."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    metric = metric_unit(result)
    parsed = [kind_and_layer(name) for name in result.components]
    max_layer = max((layer for _, layer in parsed), default=0)
    cmap, norm = colormaps["viridis"], Normalize(0, max(max_layer, 1))
    rasterized = len(result.prompts) * len(result.components) > _RASTERIZE_ABOVE
    all_values: list[float] = []
    for kind, marker in KIND_MARKERS.items():
        columns = [c for c, (k, _) in enumerate(parsed) if k == kind]
        if not columns:
            continue
        xs = [p.direct_effect[c] for c in columns for p in result.prompts]
        ys = [p.total_effect[c] for c in columns for p in result.prompts]
        layers = [parsed[c][1] for c in columns for _ in result.prompts]
        ax.scatter(
            xs,
            ys,
            c=layers,
            cmap=cmap,
            norm=norm,
            marker=marker,
            s=22,
            alpha=0.55,
            linewidths=0,
            rasterized=rasterized,
            zorder=2,
        )
        means = [result.summary.components[c] for c in columns]
        ax.scatter(
            [m.direct_effect_mean for m in means],
            [m.total_effect_mean for m in means],
            c=[parsed[c][1] for c in columns],
            cmap=cmap,
            norm=norm,
            marker=marker,
            s=110,
            edgecolors="black",
            linewidths=1.2,
            zorder=4,
        )
        if kind == "knockout":  # a set's name is the only way to tell which members it ablated
            for m in means:
                ax.annotate(m.component, (m.direct_effect_mean, m.total_effect_mean), textcoords="offset points",
                            xytext=(6, 6), fontsize=MIN_FONT_PT, color="black", zorder=5)
        all_values += _finite(xs) + _finite(ys)
    lo, hi = _limits(all_values)
    ax.plot([lo, hi], [lo, hi], color="0.35", linestyle="--", linewidth=1, zorder=1)
    fit = result.summary.total_vs_direct
    if fit.slope is not None and fit.intercept is not None:
        ax.plot(
            [lo, hi],
            [fit.slope * lo + fit.intercept, fit.slope * hi + fit.intercept],
            color="tab:red",
            linewidth=2,
            zorder=3,
        )
        r2 = "—" if fit.r2 is None else f"{fit.r2:.3f}"
        text = (
            f"TE ≈ {fit.slope:.3f}·DE {fit.intercept:+.3f}\nslope {fit.slope:.3f}, R² {r2}\n"
            f"fit across {fit.n} component means"
        )
    else:
        text = f"no fit: the {fit.n} component mean DEs have no spread"
    ax.text(
        0.02,
        0.98,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=MIN_FONT_PT + 3,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"},
    )
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"direct effect ({metric})")
    ax.set_ylabel(f"total effect ({metric})")
    spec = result.provenance.spec
    ax.set_title(
        f"{result.model}: total vs direct effect ({spec.ablation} ablation, {result.summary.n_prompts} prompts)"
    )
    ax.grid(True, alpha=0.3)
    present = {kind for kind, _ in parsed}
    handles = [
        Line2D([], [], marker=m, linestyle="", color="0.4", label="knockout set" if k == "knockout" else k)
        for k, m in KIND_MARKERS.items()
        if k in present
    ]
    handles += [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="black",
            markersize=10,
            label="component mean",
        ),
        Line2D([], [], color="0.35", linestyle="--", label="y = x (no compensation)"),
        Line2D([], [], color="tab:red", linewidth=2, label="fit of mean TE on mean DE"),
    ]
    ax.legend(handles=handles, loc="lower right")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()


def _layer_panel(ax: Axes, result: JobResult, kind: str) -> None:
    import numpy as np

    rows = sorted(
        (
            (kind_and_layer(s.component)[1], s)
            for s in result.summary.components
            if kind_and_layer(s.component)[0] == kind
        ),
        key=lambda row: row[0],
    )
    ax.set_title(f"{kind} ablated")
    ax.axhline(0, color="0.3", linewidth=0.8)
    if not rows:
        ax.text(0.5, 0.5, f"no {kind} components were ablated", transform=ax.transAxes, ha="center", va="center",
                color="0.4")
        return
    x = np.array([layer for layer, _ in rows], dtype=float)
    width = 0.2
    series = (
        ("Δunembed (paper's x)", "tab:purple", [s.unembed_effect_mean for _, s in rows],
         [s.unembed_effect_se for _, s in rows]),
        ("drop: total effect", "tab:green", [s.total_effect_mean for _, s in rows],
         [s.total_effect_se for _, s in rows]),
        ("CE (downstream layers)", "tab:red", [s.compensatory_effect_mean for _, s in rows],
         [s.compensatory_effect_se for _, s in rows]),
        ("final norm's part", "0.55", [s.norm_response_mean for _, s in rows], [0.0 for _ in rows]),
    )
    for offset, (label, colour, means, ses) in zip((-1.5 * width, -0.5 * width, 0.5 * width, 1.5 * width), series,
                                                   strict=True):
        ax.bar(x + offset, means, width, yerr=ses, color=colour, label=label, capsize=1.5,
               error_kw={"elinewidth": 0.7, "ecolor": "0.2"})
    # Ablation efficacy over the Δunembed bar: what the ablated layer still writes onto the target after ablation.
    kept = [(layer, s, s.ablated_unembed_effect_mean) for layer, s in rows if s.ablated_unembed_effect_mean is not None]
    if kept:
        ax.scatter([layer - 1.5 * width for layer, _, _ in kept], [own for _, _, own in kept],
                   marker="_", s=90, linewidths=2.2, color="black", zorder=3,
                   label="own write left after ablation")
        for layer, s, own in kept:
            if s.weak_ablation:
                top = max(s.unembed_effect_mean, own)
                ax.annotate("weak", (layer - 1.5 * width, top), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=MIN_FONT_PT, color="black")
    layer_ticks(ax, [int(layer) for layer in x])
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.2 * (high - low))  # room above the bars for the legend and the "weak" labels
    ax.legend(loc="upper left", ncols=5 if kept else 4, fontsize=MIN_FONT_PT + 1)
    ax.grid(True, axis="y", alpha=0.3)


def _layer_effects(fig: Figure, result: JobResult) -> None:
    """Where the repair happens by depth; heads are left out because per-head bars would not fit a layer axis."""
    axes = fig.subplots(2, 1, sharex=True)
    unit = metric_unit(result)
    for ax, kind in zip(axes, ("attn", "mlp"), strict=True):
        _layer_panel(ax, result, kind)
        ax.set_ylabel(f"mean over prompts ({unit})")
    axes[-1].set_xlabel("ablated layer")
    heads = sum(1 for name in result.components if kind_and_layer(name)[0] == "head")
    title = (f"{result.model}: mean Δunembed, drop (TE), the paper's compensatory effect and the norm's part per "
             f"layer (± SE, {result.summary.n_prompts} prompts)")
    threshold = result.summary.efficacy_threshold
    if threshold is not None:
        title += (f"\nblack dash: the ablated layer's own write left after ablation; \"weak\": it removed less than "
                  f"{threshold:.0%} of Δunembed")
    if heads:
        title += f"\n{heads} head components not shown here (see te_vs_de)"
    if knockout_note(result):
        title += f"\n{knockout_note(result)}"
    fig.suptitle(title)


def _heat_ticks(ax: Axes, axis: str, labels: list[str]) -> None:
    """Every label while they fit, else every second or fourth; many heads (layer.head): each layer's first head,
    every few layers."""
    n = len(labels)
    step = 1 if n <= 16 else (2 if n <= 32 else (4 if n <= 64 else math.ceil(n / 16)))
    candidates = list(range(n))
    if n > 32 and any(label.endswith(".0") for label in labels):  # heads: start each tick at a layer's head 0
        candidates = [i for i, label in enumerate(labels) if label.endswith(".0")]
        step = max(1, math.ceil(len(candidates) / 16))
    positions = candidates[::step]
    shown = [labels[i] for i in positions]
    if axis == "x":
        ax.set_xticks(positions, shown, rotation=90 if any("." in label for label in shown) and n > 8 else 0)
    else:
        ax.set_yticks(positions, shown)
    ax.tick_params(axis="both", labelsize=MIN_FONT_PT + 1)


def _heat_entry(name: str) -> tuple[str, int, int, str]:
    """(kind, layer, head, tick label) of a component or basis entry: layers by number, heads as layer.head."""
    parts = parse_component(name)
    layer, head = parts.layer or 0, parts.head or 0
    return parts.kind, layer, head, f"{layer}.{head}" if parts.kind == "head" else str(layer)


# Rows and columns of the response heatmap: what was ablated, what responds (attention layers or their heads).
_HEAT_ROW_NAMES = {"attn": "attn layer", "head": "head (layer.head)", "mlp": "mlp layer"}


def _response_heatmap(fig: Figure, result: JobResult) -> None:
    """Which components respond to each ablation, attention, head and MLP ablations apart; each row plus its norm
    cell sums to that component's compensation. With the head basis the attention columns are every head (layer.head),
    so head ablations give the head → head response matrix. Colour limits: the 99th percentile of |value|,
    symmetric."""
    import numpy as np

    if not result.summary.response_matrix:
        _no_data(fig.add_subplot(), "this per-position job stored only the heads / MLPs / norm split "
                 "(position_responses 'split'):\nsee the self_repair figure, or run with position_responses 'full'")
        return
    matrix = np.array(result.summary.response_matrix, dtype=float).reshape(
        len(result.components), len(result.response_basis)
    )
    norm_column = np.array([s.norm_response_mean for s in result.summary.components], dtype=float)
    parsed = [None if is_knockout_name(name) else _heat_entry(name) for name in result.components]
    basis = [_heat_entry(name) for name in result.response_basis]
    heads_basis = any(entry[0] == "head" for entry in basis)
    bound = robust_bound([*matrix.ravel().tolist(), *norm_column.tolist()])
    present = [kind for kind in ("attn", "head", "mlp") if any(p is not None and p[0] == kind for p in parsed)]
    row_kinds = present or ["attn", "mlp"]
    grid = fig.add_gridspec(len(row_kinds), 3, width_ratios=[12, 12, 1])
    unit = metric_unit(result)
    image = None
    for row, ablated_kind in enumerate(row_kinds):
        rows = sorted((p[1], p[2], c) for c, p in enumerate(parsed) if p is not None and p[0] == ablated_kind)
        for col, responding in enumerate(("attn", "mlp", "norm")):
            ax = fig.add_subplot(grid[row, col])
            if not rows:
                ax.set_axis_off()
                if col == 0:
                    ax.text(0.5, 0.5, f"no {ablated_kind} ablations", ha="center", va="center", color="0.4")
                continue
            if responding == "norm":
                values = norm_column[[c for _, _, c in rows]][:, None]
                cols: list[int] = [0]
            else:
                kinds = ("attn", "head") if responding == "attn" else ("mlp",)
                cols = [d for d, entry in enumerate(basis) if entry[0] in kinds]
                values = matrix[np.ix_([c for _, _, c in rows], cols)]
            image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
            if responding == "norm":
                ax.set_xticks([0], ["norm"])
                ax.set_yticks([])
                ax.tick_params(axis="both", labelsize=MIN_FONT_PT + 1)
            else:
                _heat_ticks(ax, "x", [basis[d][3] for d in cols])
                if col == 0:
                    _heat_ticks(ax, "y", [cast(tuple[str, int, int, str], parsed[c])[3] for _, _, c in rows])
                    ax.set_ylabel(f"ablated {_HEAT_ROW_NAMES[ablated_kind]}")
                else:
                    ax.set_yticks([])
                what = "head (layer.head)" if responding == "attn" and heads_basis else f"{responding} layer"
                ax.set_xlabel(f"responding {what}")
            if row == 0:
                titles = {"attn": "head responses" if heads_basis else "attention responses", "mlp": "MLP responses",
                          "norm": "norm"}
                ax.set_title(titles[responding])
    if image is not None:
        fig.colorbar(image, ax=fig.axes, label=f"mean response ({unit}); colour clipped at ±{bound:.3g}",
                     extend="both", shrink=0.9)
    note = knockout_note(result)
    fig.suptitle(f"{result.model}: mean downstream response to each ablation ({unit}); "
                 "row + norm = compensation; CE = row sum" + (f"\n{note}" if note else ""))


def _no_data(ax: Axes, message: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)


def _self_repair(fig: Figure, result: JobResult) -> None:
    """Rushing & Nanda's Fig. 1: each component's self-repair (our DE − TE, their TE − DE) against its layer, with
    the per-layer trend (the mean over the layer's components and its interval); and per layer who repairs: the
    downstream heads, MLPs and the final norm, with their norm share of the direct effect (clip(norm / DE, 0, 1)
    per pair, averaged: R&N's "LayerNorm … up to 30% of the direct effect")."""
    repair = result.summary.self_repair
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1])
    if not repair:
        _no_data(left, "no self-repair summary: not a per-position job")
        right.set_axis_off()
        return
    unit = metric_unit(result)
    top = f"top {100 * (result.summary.top_fraction or 0):.0f}%"
    markers = {"head": "o", "attn": "s", "mlp": "^"}
    trends = result.summary.self_repair_layers or []
    for kind in dict.fromkeys(r.kind for r in repair):
        mine = [r for r in repair if r.kind == kind]
        # A small deterministic spread within a layer keeps heads of one layer apart.
        offsets = {r.component: (i % 5 - 2) * 0.06 for i, r in enumerate(mine)}
        left.scatter([r.layer + offsets[r.component] for r in mine], [r.self_repair_mean for r in mine],
                     s=16, marker=markers.get(kind, "o"), color=KIND_COLOURS.get(kind, "tab:purple"), alpha=0.7,
                     edgecolors="none", label=f"{kind}s: one per component")
        trend = sorted((t for t in trends if t.kind == kind), key=lambda t: t.layer)
        if trend:
            xs = [t.layer for t in trend]
            left.plot(xs, [t.self_repair_mean for t in trend], color="black", linewidth=1.4,
                      label=f"per-layer mean ({kind}s)")
            lows = [t.ci_low if t.ci_low is not None else float("nan") for t in trend]
            highs = [t.ci_high if t.ci_high is not None else float("nan") for t in trend]
            left.fill_between(xs, lows, highs, color="0.5", alpha=0.25, linewidth=0, label="95% interval of the mean")
    left.axhline(0, color="grey", linewidth=0.5)
    layer_ticks(left, sorted({r.layer for r in repair}))
    left.set_xlabel("layer of the ablated component")
    left.set_ylabel(f"self-repair over its {top} pairs ({unit})")
    left.set_title("self-repair per component against layer (their Fig. 1); > 0: repaired")
    left.legend(loc="upper left", fontsize="small")

    layers = sorted({r.layer for r in repair})
    parts = {layer: [r for r in repair if r.layer == layer] for layer in layers}
    # Per layer, the mean over its components of each part: stacked bars, positive parts above zero and negative
    # ones below, so a part that works against the repair shows as such; the dot is the self-repair.
    above = [0.0] * len(layers)
    below = [0.0] * len(layers)
    for label, colour, get in (("heads", "tab:blue", lambda r: r.heads_mean), ("MLPs", "tab:orange",
                               lambda r: r.mlps_mean), ("norm", "tab:green", lambda r: r.norm_mean)):
        values = [sum(get(r) for r in parts[layer]) / len(parts[layer]) for layer in layers]
        bottoms = [a if v >= 0 else b for v, a, b in zip(values, above, below, strict=True)]
        right.bar(layers, values, bottom=bottoms, color=colour, label=label, width=0.8)
        above = [a + max(v, 0.0) for a, v in zip(above, values, strict=True)]
        below = [b + min(v, 0.0) for b, v in zip(below, values, strict=True)]
    totals = [sum(r.self_repair_mean for r in parts[layer]) / len(parts[layer]) for layer in layers]
    right.plot(layers, totals, "o", color="black", markersize=4, label="self-repair (sum)")
    right.axhline(0, color="grey", linewidth=0.5)
    layer_ticks(right, layers)
    right.set_xlabel("layer of the ablated component")
    right.set_ylabel(f"mean over the layer's components ({unit})")
    shares = []
    for layer in layers:
        known = [r.norm_share for r in parts[layer] if r.norm_share is not None]
        shares.append(sum(known) / len(known) if known else float("nan"))
    share_axis = right.twinx()
    share_axis.plot(layers, shares, "D", color="tab:green", markeredgecolor="black", markersize=5)
    share_axis.set_ylim(0, 1)
    share_axis.set_ylabel("norm share of the direct effect (◆): clip(norm / DE, 0, 1)")
    right.set_title("who repairs, per layer (◆: the norm's share, R&N's measure)")
    right.legend(loc="upper left", fontsize="small")
    fig.suptitle(f"{result.model}: self-repair over each component's {top} pairs by direct effect ({unit})")


def _erasure(fig: Figure, result: JobResult) -> None:
    """What each layer writes onto the target in the clean run (negative late MLPs: erasure), and how much less they
    erase when an attention layer that promotes the target is ablated (the erasure regressions)."""
    from matplotlib.patches import Patch

    ax, ax_fit = fig.subplots(2, 1)
    width = 0.4
    basis, values, names = _per_layer_clean_effects(result)
    heads_basis = any(name.startswith("head.") for name in result.response_basis)
    for offset, kind in ((-width / 2, "attn"), (width / 2, "mlp")):
        points = [(layer, v) for (k, layer), v in zip(basis, values, strict=True) if k == kind]
        if not points:
            continue
        bars = ax.bar([layer + offset for layer, _ in points], [v for _, v in points], width,
                      color=KIND_COLOURS[kind])
        for bar, (_, height) in zip(bars, points, strict=True):
            if height < 0:
                bar.set_edgecolor("crimson")
                bar.set_linewidth(1.4)
                bar.set_hatch("///")
    negatives = [(v, name, k, layer) for name, (k, layer), v in zip(names, basis, values, strict=True) if v < 0]
    if negatives:
        worst, name, kind, layer = min(negatives)
        x = layer + (-width / 2 if kind == "attn" else width / 2)
        ax.annotate(f"{name}: {worst:+.3f}", xy=(x, worst), xytext=(0, -14), textcoords="offset points",
                    ha="center", va="top", color="crimson", fontsize=MIN_FONT_PT + 2)
    ax.axhline(0, color="0.3", linewidth=0.8)
    layers = sorted({layer for _, layer in basis})
    layer_ticks(ax, layers)
    unit = metric_unit(result)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean clean Δunembed ({unit})")
    ax.set_title(f"what each layer writes onto the target in the clean run ({len(negatives)} negative: erasure)")
    # A fixed legend: one patch per kind and the erasure hatch, in a corner the bars rarely reach.
    attention = "attention (its heads summed)" if heads_basis else "attention"
    handles = [Patch(facecolor=KIND_COLOURS["attn"], label=attention),
               Patch(facecolor=KIND_COLOURS["mlp"], label="MLP"),
               Patch(facecolor="white", edgecolor="crimson", hatch="///", label="negative: erases the target")]
    ax.legend(handles=handles, loc="upper left", ncols=3, framealpha=0.9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.15)

    n_layers = len(layers)
    late = [f"mlp.{layer}" for layer in layers[-4:]]
    fits = [e for e in (result.summary.erasure or []) if e.mlp in late]
    for mlp, colour in zip(late, ("tab:olive", "tab:cyan", "tab:pink", "tab:brown"), strict=False):
        points = sorted((kind_and_layer(e.ablated)[1], e.fit.slope) for e in fits if e.mlp == mlp and e.fit.slope
                        is not None)
        if points:
            ax_fit.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=colour,
                        label=f"{mlp} response")
    ax_fit.axhline(0, color="0.3", linewidth=0.8)
    ax_fit.set_xlabel("ablated attention layer")
    ax_fit.set_ylabel("slope on the ablated layer's Δunembed\n(centred-logit change per unit)" if unit ==
                      "centred logit" else f"slope ({unit} per {unit})")
    ax_fit.set_title("erasure regressions: a late MLP's response on the ablated attention layer's Δunembed "
                     "(positive: it erases less)")
    if fits:
        ax_fit.legend(loc="upper left", ncols=4, framealpha=0.9)
    else:
        why = "not computed for per-position jobs" if result.summary.erasure is None else "no attention ablations"
        ax_fit.text(0.5, 0.5, f"{why}: no erasure regressions", transform=ax_fit.transAxes,
                    ha="center", va="center", color="0.4")
    ax_fit.set_xlim(-0.5, n_layers - 0.5)
    layer_ticks(ax_fit, layers)
    ax_fit.grid(True, alpha=0.3)
    note = knockout_note(result)
    fig.suptitle(f"{result.model}: erasure ({result.summary.n_prompts} prompts)" + (f"\n{note}" if note else ""))


def _per_layer_clean_effects(result: JobResult) -> tuple[list[tuple[str, int]], list[float], list[str]]:
    """(kind, layer), mean clean direct effect and name per layer component; with the head basis a layer's
    attention is its heads summed (the output projection's bias, no head's, apart), named attn.L heads."""
    basis = [kind_and_layer(name) for name in result.response_basis]
    values = list(result.summary.clean_direct_effect_mean)
    if not any(kind == "head" for kind, _ in basis):
        return basis, values, list(result.response_basis)
    summed: dict[tuple[str, int], float] = {}
    for (kind, layer), value in zip(basis, values, strict=True):
        key = ("attn" if kind == "head" else kind, layer)
        summed[key] = summed.get(key, 0.0) + value
    keys = list(summed)
    return keys, [summed[k] for k in keys], [f"attn.{layer} heads" if k == "attn" else f"{k}.{layer}"
                                             for k, layer in keys]


def _drawers() -> dict[str, Callable[..., None]]:
    return {
        "te_vs_de": _te_vs_de,
        "layer_effects": _layer_effects,
        "response_heatmap": _response_heatmap,
        "erasure": _erasure,
        "self_repair": _self_repair,
        "profile": paper_figures.profile,
        "fig2": paper_figures.fig2,
        "fig7": paper_figures.fig7,
        "fig8": paper_figures.fig8,
        "estimates": estimate_figure.draw,
        "knockout_response": knockout_figure.draw,
        "patching_grid": patch_figure.draw,
    }


def applicable_figures(result: JobResult) -> tuple[FigureName, ...]:
    """The figures `render` draws for this result (the others are a FigureOptionError that names these): a patching
    job's own, and `estimates` where it was run with estimates."""
    if result.patching is None:
        return ABLATION_FIGURES
    return PATCHING_FIGURES + (BOTH_KINDS if estimate_figure.has_estimates(result) else ())


def shown_figures(result: JobResult) -> tuple[FigureName, ...]:
    """The figures worth showing inline (the web job page): the applicable ones, less knockout_response for a job
    without knockout sets (it would only say how to ask for them) and profile for a job with the head basis (it
    draws per-layer outputs: a 400 that says so)."""
    has_sets = any(is_knockout_name(name) for name in result.components)
    heads_basis = any(name.startswith("head.") for name in result.response_basis)
    left_out = {*(() if has_sets else ("knockout_response",)), *(("profile",) if heads_basis else ())}
    return tuple(name for name in applicable_figures(result) if name not in left_out)


def check_applicable(result: JobResult, name: FigureName) -> None:
    """FigureOptionError, naming the figures that apply, for a figure that does not draw this kind of result."""
    applicable = applicable_figures(result)
    if name in applicable:
        return
    if result.patching is not None:
        if name in BOTH_KINDS:
            raise FigureOptionError(f"figure {name!r} draws a job's attribution-patching estimates; this patching job "
                                    'has none: submit it with "estimates": ["atp", "atp_star"]. Its figures are '
                                    f"{', '.join(applicable)}")
        raise FigureOptionError(f"figure {name!r} draws an ablation result; this is a patching job: its figures are "
                                f"{', '.join(applicable)}")
    raise FigureOptionError(f"figure {name!r} draws a patching job (intervention 'patch'); this is an ablation job: "
                            f"its figures are {', '.join(applicable)}")


def check_size(width: int, height: int, dpi: int) -> None:
    if not (MIN_PX <= width <= MAX_PX and MIN_PX <= height <= MAX_PX):
        raise FigureOptionError(f"width and height must be {MIN_PX}–{MAX_PX} px (got {width} × {height})")
    if not MIN_DPI <= dpi <= MAX_DPI:
        raise FigureOptionError(f"dpi must be {MIN_DPI}–{MAX_DPI} (got {dpi})")


def render(
    result: JobResult,
    name: FigureName,
    fmt: FigureFormat = "png",
    *,
    width: int = WIDTH_PX,
    height: int = HEIGHT_PX,
    dpi: int = DPI,
    prompt: int | None = None,
    component: str | None = None,
) -> bytes:
    """One figure as PNG (exactly width × height px), SVG or PDF bytes; CPU-bound, so callers run it off the
    event loop. `prompt` (a position in result.prompts) and `component` choose the profile figure's example."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawers = _drawers()
    if name not in drawers:
        raise ValueError(f"unknown figure {name!r}; figures are {', '.join(FIGURE_NAMES)}")
    if fmt not in FIGURE_MEDIA_TYPES:
        raise ValueError(f"figure format must be png, svg or pdf, not {fmt!r}")
    check_size(width, height, dpi)
    check_applicable(result, name)
    if name in PAPER_FIGURES and result.provenance.spec.per_position:
        raise FigureOptionError(
            f"figure {name!r} is not available for per-position jobs: the paper's figures are drawn from the "
            "final-position statistics across prompts (see self_repair, te_vs_de and layer_effects)"
        )
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else ({"CreationDate": None} if fmt == "pdf" else None)
    style = {"font.size": MIN_FONT_PT + 2, "axes.titlesize": MIN_FONT_PT + 3, "axes.labelsize": MIN_FONT_PT + 2,
             "xtick.labelsize": MIN_FONT_PT + 1, "ytick.labelsize": MIN_FONT_PT + 1, "legend.fontsize": MIN_FONT_PT + 1,
             "figure.titlesize": MIN_FONT_PT + 4}
    with RENDER_LOCK, matplotlib.rc_context(cast(Any, style)):
        fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        if name == "profile":
            drawers[name](fig, result, prompt=prompt, component=component)
        else:
            drawers[name](fig, result)
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()
