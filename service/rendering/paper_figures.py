"""The Hydra-effect paper's figures (McGrath et al. 2023), drawn from a JobResult with the paper's measures.

Fig. 1/3 `profile`: one prompt, one ablated component: the clean per-layer Δunembed, the ablated run's, and one
faint line per resample patch. Fig. 2 `fig2`: Δunembed against the ablation's drop per layer. Fig. 7 `fig7`: the
compensatory effect (CE) against Δunembed. Fig. 8 `fig8`: CE's attention and MLP parts. Sign conventions are the
service's (docs/concepts/definitions.md): the drop is clean − ablated (the paper's −Δablate), CE and responses
are ablated − clean, as in the paper. Only whole-layer components (attn.L, mlp.L) enter these figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra_ablate_client.vocabulary import is_knockout_name, knockout_members
from hydra_ablate_client.wire import ComponentSummary, Fit, JobResult, PromptResult
from service.rendering.figure_style import (
    MIN_FONT_PT,
    FigureOptionError,
    kind_and_layer,
    knockout_note,
    layer_ticks,
    metric_unit,
    note_outside,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_RASTERIZE_ABOVE = 3000


def _by_kind(result: JobResult, kind: str) -> list[tuple[int, int, ComponentSummary]]:
    """(layer, column, summary) of the ablated whole-layer components of one kind, by layer."""
    rows = []
    for c, summary in enumerate(result.summary.components):
        k, layer = kind_and_layer(summary.component)
        if k == kind and summary.component == f"{kind}.{layer}":
            rows.append((layer, c, summary))
    return sorted(rows, key=lambda row: row[0])


def _knockout_line(result: JobResult) -> str:
    """The paper's figures are per layer: a second title line saying that knockout sets are left out."""
    note = knockout_note(result)
    return f"\n{note}" if note else ""


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _n_layers(result: JobResult) -> int:
    return sum(1 for name in result.response_basis if name.startswith("mlp."))  # one MLP per layer, either basis


def _unit_label(result: JobResult, what: str) -> str:
    return f"{what} ({metric_unit(result)})"


# --- Fig. 1/3 --------------------------------------------------------------------------------------------------------


def _default_component(result: JobResult, p: int) -> int:
    """The attention component with the largest Δunembed on this prompt (the paper shows a layer that matters)."""
    prompt = result.prompts[p]
    columns = [
        c for c, name in enumerate(result.components) if name.startswith("attn.") and not is_knockout_name(name)
    ] or list(
        range(len(result.components))
    )
    return max(columns, key=lambda c: prompt.unembed_effect[c])


def profile(fig: Figure, result: JobResult, *, prompt: int | None = None, component: str | None = None) -> None:
    """Fig. 1/3: clean Δunembed(l), the mean ablated Δ̃unembed(k, l), and one faint line per patch."""
    import numpy as np

    if not result.prompts:
        raise FigureOptionError("the job has no prompts to draw")
    if any(name.startswith("head.") for name in result.response_basis):
        raise FigureOptionError(
            "figure 'profile' draws per-layer outputs, and this job's responses are per head (response_basis "
            "'heads'): run it with response_basis 'layers' for this figure, or see response_heatmap"
        )
    p = 0 if prompt is None else prompt
    if not 0 <= p < len(result.prompts):
        raise FigureOptionError(f"prompt must be 0–{len(result.prompts) - 1} (a position in the result's prompts)")
    if component is None:
        k = _default_component(result, p)
    elif component in result.components:
        k = result.components.index(component)
    else:
        raise FigureOptionError(f"component {component!r} was not ablated in this job")
    row = result.prompts[p]
    basis = [kind_and_layer(name) for name in result.response_basis]
    clean = np.array(row.clean_direct_effect)
    patches = row.samples[k] if row.samples is not None else None
    if patches:
        lines = np.array([patch.profile for patch in patches])
        mean = lines.mean(axis=0)
    else:
        lines = np.empty((0, len(basis)))
        # Without samples, the mean ablated profile in clean-scale mode: clean + response, and the ablated
        # component's own output replaced (its clean value minus its DE).
        mean = clean + np.array(row.response[k])
        name = result.components[k]
        if name in result.response_basis:
            slot = result.response_basis.index(name)
            mean[slot] = clean[slot] - row.direct_effect[k]
        elif is_knockout_name(name):
            # A set's DE is its members' together, not each member's: their own slots are left undrawn (NaN).
            for member in knockout_members(name):
                if member in result.response_basis:
                    mean[result.response_basis.index(member)] = np.nan
    ablated_layers = sorted({kind_and_layer(member)[1] for member in knockout_members(result.components[k])})
    axes = fig.subplots(1, 2, sharey=True)
    unit = metric_unit(result)
    for ax, kind in zip(axes, ("attn", "mlp"), strict=True):
        cols = [d for d, (kd, _) in enumerate(basis) if kd == kind]
        layers = [basis[d][1] for d in cols]
        for line in lines:
            ax.plot(layers, line[cols], color="tab:red", alpha=0.18, linewidth=0.8)
        ax.plot(layers, clean[cols], color="black", linewidth=2, marker="o", markersize=3, label="clean Δunembed")
        ax.plot(layers, mean[cols], color="tab:red", linewidth=2, linestyle="--", marker="s", markersize=3,
                label="ablated Δ̃unembed (mean over patches)")
        for ablated_layer in ablated_layers:
            ax.axvline(ablated_layer, color="0.4", linestyle=":", linewidth=1.2)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_title(f"{'attention' if kind == 'attn' else 'MLP'} layers")
        ax.set_xlabel("layer")
        layer_ticks(ax, layers)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_unit_label(result, "unembedding impact Δunembed"))
    from matplotlib.lines import Line2D

    handles, _ = axes[0].get_legend_handles_labels()
    if len(lines):
        handles.append(Line2D([], [], color="tab:red", alpha=0.35, label=f"one resample patch ({len(lines)})"))
    else:
        handles.append(Line2D([], [], color="white", label="no per-patch data: run the job with keep_samples"))
    handles.append(Line2D([], [], color="0.4", linestyle=":", label=f"ablated: {result.components[k]}"))
    axes[0].legend(handles=handles, loc="upper left")
    fig.suptitle(
        f"{result.model}: per-layer unembedding impact, clean and with {result.components[k]} ablated\n"
        f"prompt {row.index}: {row.prompt!r} → {row.target_token!r}; drop {row.total_effect[k]:+.2f}, "
        f"Δunembed {row.unembed_effect[k]:+.2f}, CE {row.compensatory_effect[k]:+.2f} {unit}"
        + _efficacy_line(result, row, k)
    )


def _efficacy_line(result: JobResult, row: PromptResult, k: int) -> str:
    """The ablation's efficacy: this prompt's Δ̃unembed(k, k) against its Δunembed, and the job's removed share."""
    own = row.ablated_unembed_effect[k] if row.ablated_unembed_effect else None
    if own is None:
        return ""
    text = f"\nablation efficacy: {result.components[k]} still writes {own:+.2f} of its {row.unembed_effect[k]:+.2f}"
    summary = next((c for c in result.summary.components if c.component == result.components[k]), None)
    if summary is not None and summary.unembed_removed_share is not None:
        text += f"; over the job's prompts the ablation removed {summary.unembed_removed_share:.0%} of Δunembed"
        if summary.weak_ablation and result.summary.efficacy_threshold is not None:
            text += f" (weak: below {result.summary.efficacy_threshold:.0%})"
    return text


# --- Fig. 2 ----------------------------------------------------------------------------------------------------------


def fig2(fig: Figure, result: JobResult) -> None:
    """(a, b) per layer: Δunembed and the drop (TE), per prompt and mean, attention and MLP; (c) the scatter of the
    drop against Δunembed, one point per prompt and ablated layer, coloured by depth, with y = x; (d) their
    correlation across prompts and the share of prompts where Δunembed exceeds the drop, per layer."""
    import numpy as np

    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    rasterized = len(result.prompts) * len(result.components) > _RASTERIZE_ABOVE
    for ax, kind, letter in ((ax_a, "attn", "a"), (ax_b, "mlp", "b")):
        rows = _by_kind(result, kind)
        if not rows:
            _empty(ax, f"no {kind} ablations")
            continue
        layers = np.array([layer for layer, _, _ in rows], dtype=float)
        for offset, field, colour, label in ((-0.18, "unembed_effect", "tab:purple", "Δunembed"),
                                              (0.18, "total_effect", "tab:green", "drop (clean − ablated)")):
            for layer, c, _ in rows:
                values = [getattr(p, field)[c] for p in result.prompts]
                ax.scatter(np.full(len(values), layer + offset), values, s=3, color=colour, alpha=0.15, linewidths=0,
                           rasterized=rasterized)
            means = [np.mean([getattr(p, field)[c] for p in result.prompts]) for _, c, _ in rows]
            ax.plot(layers + offset, means, color=colour, marker="o", markersize=4, linewidth=1.5,
                    label=f"{label}, mean")
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_title(f"({letter}) {'attention' if kind == 'attn' else 'MLP'} layers: per prompt (dots) and mean")
        ax.set_xlabel("layer")
        ax.set_ylabel(metric_unit(result))
        layer_ticks(ax, [int(x) for x in layers])
        ax.legend(loc="upper left")
        ax.grid(True, alpha=0.3)
        values = [getattr(p, f)[c] for p in result.prompts for _, c, _ in rows
                  for f in ("unembed_effect", "total_effect")]
        lo, hi = np.percentile(values, [0.5, 99.5])
        pad = 0.1 * (hi - lo) if hi > lo else 1.0
        ax.set_ylim(lo - pad, hi + pad)  # the central 99% of the points: a few outliers do not flatten the rest
        note_outside(ax, None, values)
    _fig2_scatter(ax_c, result)
    for kind, colour, marker in (("attn", "tab:blue", "o"), ("mlp", "tab:orange", "s")):
        rows = _by_kind(result, kind)
        layer_list = [layer for layer, _, _ in rows]
        corr = [np.nan if s.unembed_drop_correlation is None else s.unembed_drop_correlation for _, _, s in rows]
        share = [s.unembed_exceeds_drop_share for _, _, s in rows]
        label = "attention" if kind == "attn" else "MLP"
        if rows:
            ax_d.plot(layer_list, corr, color=colour, marker=marker, markersize=4, label=f"{label}: r")
            ax_d.plot(layer_list, share, color=colour, marker=marker, markersize=4, linestyle="--",
                      markerfacecolor="none", label=f"{label}: share")
    ax_d.set_title("(d) per layer: r(Δunembed, drop); share Δunembed > drop")
    ax_d.set_ylabel("Pearson r / share")
    ax_d.set_ylim(-1.05, 1.05)
    ax_d.axhline(0.5, color="0.5", linestyle=":", linewidth=1)
    ax_d.axhline(0, color="0.3", linewidth=0.8)
    ax_d.set_xlabel("ablated layer")
    ax_d.grid(True, alpha=0.3)
    ax_d.legend(loc="lower left", ncols=2)
    layer_ticks(ax_d, list(range(_n_layers(result))))
    fig.suptitle(f"{result.model}: unembedding impact vs ablation impact (paper Fig. 2), "
                 f"{result.summary.n_prompts} prompts" + _knockout_line(result))


def _fig2_scatter(ax: Axes, result: JobResult) -> None:
    """Panel (c): per prompt and ablated whole layer, the drop (clean − ablated) against Δunembed; points below
    y = x are prompts where the output fell by less than the layer wrote directly (the paper's Hydra signature)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    cmap, norm = colormaps["viridis"], Normalize(0, max(_n_layers(result) - 1, 1))
    xs: list[float] = []
    ys: list[float] = []
    image = None
    for kind, marker, label in (("attn", "o", "attention"), ("mlp", "s", "MLP")):
        rows = _by_kind(result, kind)
        if not rows:
            continue
        kx = [p.unembed_effect[c] for _, c, _ in rows for p in result.prompts]
        ky = [p.total_effect[c] for _, c, _ in rows for p in result.prompts]
        depth = [layer for layer, _, _ in rows for _ in result.prompts]
        image = ax.scatter(kx, ky, c=depth, cmap=cmap, norm=norm, marker=marker, s=9, alpha=0.5, linewidths=0,
                           rasterized=len(kx) > _RASTERIZE_ABOVE, label=f"{label} layer")
        xs += kx
        ys += ky
    if image is None:
        _empty(ax, "no whole-layer ablations")
        return
    _diagonals(ax, xs, ys, label="y = x", same_scale=True)
    ax.set_title("(c) drop against Δunembed, per prompt and layer")
    ax.set_xlabel(_unit_label(result, "Δunembed"))
    ax.set_ylabel(_unit_label(result, "drop"))
    ax.legend(loc="upper left")
    ax.figure.colorbar(image, ax=ax, label="layer", fraction=0.05, pad=0.01)


# --- Fig. 7 ----------------------------------------------------------------------------------------------------------


def _scatter_by_depth(ax: Axes, result: JobResult, kind: str, title: str) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    rows = _by_kind(result, kind)
    if not rows:
        _empty(ax, f"no {kind} ablations")
        return
    cmap, norm = colormaps["viridis"], Normalize(0, max(_n_layers(result) - 1, 1))
    rasterized = len(result.prompts) * len(rows) > _RASTERIZE_ABOVE
    xs, ys, cs = [], [], []
    for layer, c, _ in rows:
        xs += [p.unembed_effect[c] for p in result.prompts]
        ys += [p.compensatory_effect[c] for p in result.prompts]
        cs += [layer] * len(result.prompts)
    image = ax.scatter(xs, ys, c=cs, cmap=cmap, norm=norm, s=5, alpha=0.5, linewidths=0, rasterized=rasterized)
    _diagonals(ax, xs, ys)
    ax.set_title(title)
    ax.set_xlabel(_unit_label(result, "Δunembed of the ablated layer"))
    ax.set_ylabel(_unit_label(result, "compensatory effect CE"))
    ax.figure.colorbar(image, ax=ax, label="ablated layer")


def _diagonals(ax: Axes, xs: list[float], ys: list[float], *, label: str = "y = x (full compensation)",
               same_scale: bool = False) -> None:
    """y = x and the zero lines, over the central 99% of the points; the rest counted on the panel. `same_scale`:
    one range, including 0, on both axes (where x and y are the same kind of quantity)."""
    import numpy as np

    if not xs:
        return
    if same_scale:
        both = np.array(xs + ys, dtype=float)
        both = both[np.isfinite(both)]
        lo, hi = np.percentile(both, [0.5, 99.5]) if both.size else (0.0, 1.0)
        xlo = ylo = min(lo, 0.0)
        xhi = yhi = max(hi, 0.0)
    else:
        xlo, xhi = np.percentile(xs, [0.5, 99.5])
        ylo, yhi = np.percentile(ys, [0.5, 99.5])
    xpad = 0.1 * (xhi - xlo) if xhi > xlo else 1.0
    ypad = 0.1 * (yhi - ylo) if yhi > ylo else 1.0
    ax.set_xlim(xlo - xpad, xhi + xpad)
    ax.set_ylim(ylo - ypad, yhi + ypad)
    ax.plot([xlo - xpad, xhi + xpad], [xlo - xpad, xhi + xpad], color="0.35", linestyle="--", linewidth=1,
            label=label)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.grid(True, alpha=0.3)
    note_outside(ax, xs, ys)


def _fit(summary: ComponentSummary) -> Fit:
    """The component's CE-on-Δunembed fit; set for every final-position job (render refuses per-position jobs)."""
    if summary.ce_vs_unembed is None:
            raise FigureOptionError(f"{summary.component} has no CE-on-Δunembed fit (a per-position job)")
    return summary.ce_vs_unembed


def _fit_text(fit: Fit) -> str:
    if fit.slope is None:
        return f"no fit (n = {fit.n})"
    ci = ("" if fit.slope_ci_low is None else f" [{fit.slope_ci_low:.2f}, {fit.slope_ci_high:.2f}]")
    r2 = "–" if fit.r2 is None else f"{fit.r2:.2f}"
    return f"slope {fit.slope:.2f}{ci}, R² {r2}, n = {fit.n}"


def fig7(fig: Figure, result: JobResult) -> None:
    """(a) CE vs Δunembed for every attention layer, coloured by depth; (b) the attention layer whose fit explains
    most variance, with its fit; (c) the same as (a) for MLP layers; (d) slope with its 95% bootstrap interval and R²
    per layer (the paper: slope < 1 past layer 13)."""
    import numpy as np

    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    _scatter_by_depth(ax_a, result, "attn", "(a) attention layers: CE against Δunembed")
    _scatter_by_depth(ax_c, result, "mlp", "(c) MLP layers: CE against Δunembed")
    attn = _by_kind(result, "attn")
    fitted = [(best_r2, layer, c, s) for layer, c, s in attn if (best_r2 := _fit(s).r2) is not None]
    # The paper's panel (b) is a mid-network layer (its layer 23 of 32): the best fit among the middle half of the
    # layers whose ablation removed at least the threshold share of Δunembed (a weak ablation's fit says little),
    # else among the middle half, else among all.
    n_layers = _n_layers(result)
    low_mid, high_mid = n_layers // 4, (3 * n_layers) // 4
    middle = [row for row in fitted if low_mid <= row[1] < high_mid]
    effective = [row for row in middle if row[3].weak_ablation is False]
    where = f"best fit of layers {low_mid}–{high_mid - 1}" if middle else "best fit"
    if effective:
        where += ", ablations not weak"
    if fitted:
        _, layer, c, summary = max(effective or middle or fitted, key=lambda row: row[0])
        xs = [p.unembed_effect[c] for p in result.prompts]
        ys = [p.compensatory_effect[c] for p in result.prompts]
        ax_b.scatter(xs, ys, s=8, alpha=0.6, color="tab:blue", linewidths=0, label="one prompt")
        _diagonals(ax_b, xs, ys)
        fit = _fit(summary)
        line_x = np.array(ax_b.get_xlim())
        assert fit.slope is not None and fit.intercept is not None  # r2 is set only with a slope
        ax_b.plot(line_x, fit.slope * line_x + fit.intercept, color="tab:red", linewidth=2,
                  label=f"fit: {_fit_text(fit)}")
        removed = summary.unembed_removed_share
        efficacy = "" if removed is None else f"; removed {removed:.0%} of Δunembed"
        ax_b.set_title(f"(b) attention layer {layer} ({where}){efficacy}")
        ax_b.set_xlabel(_unit_label(result, "Δunembed"))
        ax_b.set_ylabel(_unit_label(result, "compensatory effect CE"))
        ax_b.legend(loc="upper left")
    else:
        _empty(ax_b, "no attention layer could be fitted")
    for kind, colour, marker, offset in (("attn", "tab:blue", "o", -0.12), ("mlp", "tab:orange", "s", 0.12)):
        rows = [(layer, _fit(s)) for layer, _, s in _by_kind(result, kind) if _fit(s).slope is not None]
        if not rows:
            continue
        layers = np.array([layer for layer, _ in rows], dtype=float) + offset
        slopes = np.array([f.slope for _, f in rows], dtype=float)
        low = np.array([f.slope_ci_low if f.slope_ci_low is not None else f.slope for _, f in rows], dtype=float)
        high = np.array([f.slope_ci_high if f.slope_ci_high is not None else f.slope for _, f in rows], dtype=float)
        label = "attention" if kind == "attn" else "MLP"
        ax_d.errorbar(layers, slopes, yerr=[slopes - low, high - slopes], fmt=marker, color=colour, markersize=4,
                      capsize=2, elinewidth=1, label=f"{label}: slope, 95% bootstrap interval")
        r2 = [np.nan if f.r2 is None else f.r2 for _, f in rows]
        ax_d.plot(layers, r2, color=colour, linestyle=":", marker=marker, markersize=3, markerfacecolor="none",
                  label=f"{label}: R²")
    ax_d.axhline(1, color="0.35", linestyle="--", linewidth=1)
    ax_d.axhline(0, color="0.3", linewidth=0.8)
    every = [(f"{kind}.{layer}", _fit(s)) for kind in ("attn", "mlp") for layer, _, s in _by_kind(result, kind)]
    robust_ylim(ax_d, [f.slope for _, f in every])
    note_clipping(ax_d, every)
    ax_d.set_title("(d) slope of CE on Δunembed (95% CI) and R² per layer")
    ax_d.set_xlabel("ablated layer")
    ax_d.set_ylabel("slope (dimensionless) / R²")
    ax_d.legend(loc="upper left", ncols=2)
    ax_d.grid(True, alpha=0.3)
    layer_ticks(ax_d, list(range(_n_layers(result))))
    fig.suptitle(f"{result.model}: compensatory effect against the ablated layer's unembedding impact "
                 f"(paper Fig. 7), {result.summary.n_prompts} prompts" + _knockout_line(result))


def robust_ylim(ax: Axes, slopes: list[float | None]) -> None:
    """Keep 0 and 1 and the central slopes in view; a few extreme layers (and long intervals) run off the axes."""
    import numpy as np

    values = np.array([v for v in slopes if v is not None], dtype=float)
    if values.size == 0:
        return
    low, high = np.percentile(values, [5, 95])
    ax.set_ylim(min(-0.5, low - 0.5), max(1.5, high + 0.5))


def note_clipping(ax: Axes, fits: list[tuple[str, Fit]]) -> None:
    """Say on the panel which slopes (named), and how many intervals, run off its y-axis (nothing is clipped
    silently). Call after the limits are final."""
    low, high = ax.get_ylim()
    off = [f"{name} {f.slope:+.1f}" for name, f in fits if f.slope is not None and not low <= f.slope <= high]
    cut = sum(1 for _, f in fits if f.slope is not None and low <= f.slope <= high
              and ((f.slope_ci_low is not None and f.slope_ci_low < low)
                   or (f.slope_ci_high is not None and f.slope_ci_high > high)))
    parts = []
    if off:
        parts.append(f"slopes off the axes: {', '.join(off[:6])}{' …' if len(off) > 6 else ''}")
    if cut:
        parts.append(f"{cut} interval{'' if cut == 1 else 's'} cut at the axes")
    if parts:
        ax.text(0.99, 0.02, "; ".join(parts), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=MIN_FONT_PT, color="0.25", bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})


# --- Fig. 8 ----------------------------------------------------------------------------------------------------------


def fig8(fig: Figure, result: JobResult) -> None:
    """CE split into its attention part and its MLP part, each regressed on Δunembed of the ablated attention layer:
    (a) slope with its interval, (b) R² per layer, (c, d) the scatter for a middle and a late layer."""
    import numpy as np

    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    rows = _by_kind(result, "attn")
    if not rows:
        for ax in (ax_a, ax_b, ax_c, ax_d):
            _empty(ax, "no attention ablations")
        return
    parts = (("attention part", "tab:blue", "o", -0.12, "ce_attn_vs_unembed", "attn"),
             ("MLP part", "tab:orange", "s", 0.12, "ce_mlp_vs_unembed", "mlp"))
    for label, colour, marker, offset, field, _ in parts:
        fits = [(layer, getattr(s, field)) for layer, _, s in rows if getattr(s, field).slope is not None]
        if not fits:
            continue
        layers = np.array([layer for layer, _ in fits], dtype=float) + offset
        slopes = np.array([f.slope for _, f in fits])
        low = np.array([f.slope if f.slope_ci_low is None else f.slope_ci_low for _, f in fits])
        high = np.array([f.slope if f.slope_ci_high is None else f.slope_ci_high for _, f in fits])
        ax_a.errorbar(layers, slopes, yerr=[slopes - low, high - slopes], fmt=marker, color=colour, markersize=4,
                      capsize=2, elinewidth=1, label=f"CE's {label}")
        ax_b.plot(layers, [np.nan if f.r2 is None else f.r2 for _, f in fits], color=colour, marker=marker,
                  markersize=4, label=f"CE's {label}")
    part_fits = [(f"attn.{layer} {key}", getattr(s, field)) for layer, _, s in rows
                 for _, _, _, _, field, key in parts]
    robust_ylim(ax_a, [f.slope for _, f in part_fits])
    note_clipping(ax_a, part_fits)
    ax_a.set_title("(a) slope on Δunembed, 95% bootstrap interval")
    ax_a.set_ylabel("slope (dimensionless)")
    ax_b.set_title("(b) R² of the fit on Δunembed")
    ax_b.set_ylabel("R²")
    for ax in (ax_a, ax_b):
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xlabel("ablated attention layer")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
        layer_ticks(ax, list(range(_n_layers(result))))
    ablated = [layer for layer, _, _ in rows]
    picks = [ablated[len(ablated) // 2], ablated[min(len(ablated) - 1, (4 * len(ablated)) // 5)]]
    for ax, layer, letter in ((ax_c, picks[0], "c"), (ax_d, picks[1], "d")):
        c = next(col for lay, col, _ in rows if lay == layer)
        summary = next(s for lay, _, s in rows if lay == layer)
        xs = [p.unembed_effect[c] for p in result.prompts]
        basis_attn = [d for d, name in enumerate(result.response_basis) if name.startswith(("attn.", "head."))]
        basis_mlp = [d for d, name in enumerate(result.response_basis) if name.startswith("mlp.")]
        parts_y = {"attn": [sum(p.response[c][d] for d in basis_attn) for p in result.prompts],
                   "mlp": [sum(p.response[c][d] for d in basis_mlp) for p in result.prompts]}
        for label, colour, marker, _, field, key in parts:
            fit = getattr(summary, field)
            ax.scatter(xs, parts_y[key], s=8, alpha=0.5, color=colour, marker=marker, linewidths=0,
                       label=f"{label}: {_fit_text(fit)}")
        _diagonals(ax, xs + xs, parts_y["attn"] + parts_y["mlp"])
        ax.set_title(f"({letter}) attention layer {layer} ablated")
        ax.set_xlabel(_unit_label(result, "Δunembed"))
        ax.set_ylabel(_unit_label(result, "part of CE"))
        ax.legend(loc="upper left")
    fig.suptitle(f"{result.model}: CE's attention and MLP parts against Δunembed (paper Fig. 8), "
                 f"{result.summary.n_prompts} prompts" + _knockout_line(result))
