"""A finished job's figures, drawn headless from its JobResult: pure functions, no I/O, no pyplot.

Figures are built on `matplotlib.figure.Figure` objects, never through pyplot, so rendering touches no global
figure manager or GUI backend; renders are still serialised by a lock, since matplotlib promises no thread safety
and drawing holds the GIL anyway. matplotlib is imported inside the drawing
functions: it costs about half a second, and the API, the worker and the CLI import this module for its names.

Every figure has one fixed size, 12 × 8 inches at 100 dpi: a PNG is exactly 1200 × 800 pixels and an SVG is
864 × 576 pt. Nothing crops it (no tight bounding box); constrained layout fits the content inside that frame.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from service.schemas import JobResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FigureName = Literal["te_vs_de", "layer_effects", "response_heatmap", "erasure", "self_repair"]
FigureFormat = Literal["png", "svg"]
FIGURE_NAMES: tuple[FigureName, ...] = ("te_vs_de", "layer_effects", "response_heatmap", "erasure", "self_repair")
FIGURE_MEDIA_TYPES: dict[FigureFormat, str] = {"png": "image/png", "svg": "image/svg+xml"}
FIGSIZE_IN = (12.0, 8.0)
DPI = 100
WIDTH_PX, HEIGHT_PX = int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI)

FIGURE_DESCRIPTIONS: dict[FigureName, str] = {
    "te_vs_de": "per-prompt total vs direct effect of every component, y = x and the TE-on-DE fit (slope, R²)",
    "layer_effects": "mean DE, TE and compensation per layer (± SE), attention and MLP panels",
    "response_heatmap": "mean downstream response: ablated component × response basis, plus the norm's share",
    "erasure": "mean clean direct effect of every layer component; negative bars are erasure",
    "self_repair": "per-position jobs: per component, mean DE against mean TE over its top 2% pairs by DE with "
    "y = x (Rushing & Nanda Fig. 1), and per layer the shares of self-repair done by heads, MLPs and the norm",
}

KIND_MARKERS = {"attn": "o", "mlp": "s", "head": "^"}
KIND_COLOURS = {"attn": "tab:blue", "mlp": "tab:orange"}
_COMPONENT = re.compile(r"^(attn|mlp|head)(?:\.(\d+))?(?:\.(\d+))?$")
_RENDER_LOCK = threading.Lock()  # matplotlib promises no thread safety; renders are GIL-bound anyway, so serialise
_RASTERIZE_ABOVE = 5000  # scatter points; past this an SVG of vector dots gets heavy, so dots become an image


def parse_component(name: str) -> tuple[str, int]:
    """(kind, layer) of `attn.L`, `mlp.L` or `head.L.H`; an unparseable name counts as layer 0 of its prefix."""
    match = _COMPONENT.match(name)
    if match is None:
        return name.split(".", 1)[0], 0
    return match.group(1), int(match.group(2) or 0)


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _metric(result: JobResult) -> str:
    return result.provenance.spec.metric


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
    metric = _metric(result)
    parsed = [parse_component(name) for name in result.components]
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
        fontsize=11,
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
        Line2D([], [], marker=m, linestyle="", color="0.4", label=k) for k, m in KIND_MARKERS.items() if k in present
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
            (parse_component(s.component)[1], s)
            for s in result.summary.components
            if parse_component(s.component)[0] == kind
        ),
        key=lambda row: row[0],
    )
    ax.set_title(f"{kind} blocks")
    ax.axhline(0, color="0.3", linewidth=0.8)
    if not rows:
        ax.text(
            0.5,
            0.5,
            f"no {kind} components were ablated",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
        return
    x = np.array([layer for layer, _ in rows], dtype=float)
    width = 0.27
    series = (
        ("direct effect", "tab:blue", [s.direct_effect_mean for _, s in rows], [s.direct_effect_se for _, s in rows]),
        ("total effect", "tab:green", [s.total_effect_mean for _, s in rows], [s.total_effect_se for _, s in rows]),
        ("compensation", "tab:red", [s.compensation_mean for _, s in rows], [s.compensation_se for _, s in rows]),
    )
    for offset, (label, colour, means, ses) in zip((-width, 0.0, width), series, strict=True):
        ax.bar(
            x + offset,
            means,
            width,
            yerr=ses,
            color=colour,
            label=label,
            capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "0.2"},
        )
    ax.set_xticks(x, [str(int(layer)) for layer in x], fontsize=8 if len(rows) > 24 else 10)
    ax.legend(loc="best", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def _layer_effects(fig: Figure, result: JobResult) -> None:
    """Where the repair happens by depth; heads are left out because per-head bars would not fit a layer axis."""
    axes = fig.subplots(2, 1, sharex=True)
    metric = _metric(result)
    for ax, kind in zip(axes, ("attn", "mlp"), strict=True):
        _layer_panel(ax, result, kind)
        ax.set_ylabel(f"mean over prompts ({metric})")
    axes[-1].set_xlabel("layer")
    heads = sum(1 for name in result.components if parse_component(name)[0] == "head")
    title = f"{result.model}: mean direct effect, total effect and compensation per layer (± SE)"
    if heads:
        title += f"\n{heads} head components not shown here (see te_vs_de)"
    fig.suptitle(title)


def _ticks(ax: Axes, axis: str, labels: list[str]) -> None:
    """Label every row/column while they fit (a 30-layer model's 60 components do), else every k-th."""
    step = max(1, math.ceil(len(labels) / 64))
    positions = list(range(0, len(labels), step))
    fontsize = 9 if len(labels) <= 24 else 6
    if axis == "x":
        ax.set_xticks(positions, [labels[i] for i in positions], rotation=90, fontsize=fontsize)
    else:
        ax.set_yticks(positions, [labels[i] for i in positions], fontsize=fontsize)


def _response_heatmap(fig: Figure, result: JobResult) -> None:
    """Which layers respond to each ablation; each row plus its norm cell sums to that component's compensation."""
    import numpy as np

    ax = fig.add_subplot()
    if not result.summary.response_matrix:
        _no_data(ax, "this per-position job stored only the heads / MLPs / norm split (position_responses 'split'):"
                 "\nsee the self_repair figure, or run with position_responses 'full'")
        return
    matrix = np.array(result.summary.response_matrix, dtype=float).reshape(
        len(result.components), len(result.response_basis)
    )
    norm_column = np.array([[s.norm_response_mean] for s in result.summary.components], dtype=float)
    values = np.hstack([matrix, norm_column]) if len(norm_column) == len(matrix) else matrix
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 0.0
    bound = bound if bound > 0 else 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    columns = [*result.response_basis, "norm"][: values.shape[1]]
    _ticks(ax, "x", columns)
    _ticks(ax, "y", list(result.components))
    if values.shape[1] > matrix.shape[1]:
        ax.axvline(matrix.shape[1] - 0.5, color="black", linewidth=1.5)
    if values.size <= 200:
        for (row, col), value in np.ndenumerate(values):
            if math.isfinite(value) and value != 0:
                colour = "white" if abs(value) > 0.6 * bound else "black"
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    metric = _metric(result)
    ax.set_xlabel("responding layer component (response basis); last column: the final norm's share")
    ax.set_ylabel("ablated component")
    ax.set_title(f"{result.model}: mean downstream response to each ablation ({metric}); " "row + norm = compensation")
    fig.colorbar(image, ax=ax, label=f"mean response ({metric})")


def _no_data(ax: Axes, message: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)


def _self_repair(fig: Figure, result: JobResult) -> None:
    """Rushing & Nanda's Fig. 1 in our terms (their TE and DE are ours negated; the plot uses ours), and per layer
    the share of the self-repair done by downstream heads, MLPs and the final norm."""
    repair = result.summary.self_repair
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1])
    if not repair:
        _no_data(left, "no self-repair summary: not a per-position job")
        right.set_axis_off()
        return
    layers = [parse_component(r.component)[1] for r in repair]
    de = [r.direct_effect_mean for r in repair]
    te = [r.total_effect_mean for r in repair]
    points = left.scatter(de, te, c=layers, cmap="viridis", s=18, edgecolors="none")
    low, high = _limits(_finite(de + te))
    left.plot([low, high], [low, high], color="black", linewidth=1, label="y = x (no self-repair)")
    left.axhline(0, color="grey", linewidth=0.5)
    left.set_xlabel(f"mean direct effect over each component's top {100 * (result.summary.top_fraction or 0):.0f}% "
                    "pairs (clean − ablated)")
    left.set_ylabel("mean total effect over the same pairs (clean − ablated)")
    left.set_title("below y = x: self-repair (DE − TE = their TE − DE)")
    left.legend(loc="upper left")
    fig.colorbar(points, ax=left, label="layer")

    by_layer: dict[int, list[float]] = {}
    for layer, r in zip(layers, repair, strict=True):
        sums = by_layer.setdefault(layer, [0.0, 0.0, 0.0, 0.0])
        for i, value in enumerate((r.heads_mean, r.mlps_mean, r.norm_mean, r.self_repair_mean)):
            sums[i] += value
    order = sorted(by_layer)
    for i, (label, colour) in enumerate((("heads", "tab:blue"), ("MLPs", "tab:orange"), ("norm", "tab:green"))):
        shares = [by_layer[l][i] / by_layer[l][3] if by_layer[l][3] else float("nan") for l in order]
        right.plot(order, shares, marker="o", color=colour, label=label)
    right.axhline(0, color="grey", linewidth=0.5)
    right.set_xlabel("layer of the ablated component")
    right.set_ylabel("share of the layer's summed self-repair")
    right.set_title("who repairs: heads + MLPs + norm = 1 (shares of a small sum can be large)")
    right.legend()
    fig.suptitle(f"{result.model}: self-repair over the top pairs by direct effect ({_metric(result)})")


def _erasure(fig: Figure, result: JobResult) -> None:
    """What each layer writes onto the target in the clean run; late MLPs that push it down are erasure."""
    from matplotlib.patches import Patch

    ax = fig.add_subplot()
    width = 0.4
    basis = [parse_component(name) for name in result.response_basis]
    values = result.summary.clean_direct_effect_mean
    for offset, kind in ((-width / 2, "attn"), (width / 2, "mlp")):
        points = [(layer, v) for (k, layer), v in zip(basis, values, strict=True) if k == kind]
        if not points:
            continue
        layers = [layer + offset for layer, _ in points]
        heights = [v for _, v in points]
        bars = ax.bar(layers, heights, width, color=KIND_COLOURS[kind], label=kind)
        for bar, height in zip(bars, heights, strict=True):
            if height < 0:
                bar.set_edgecolor("crimson")
                bar.set_linewidth(1.8)
                bar.set_hatch("///")
    negatives = [(v, name) for name, v in zip(result.response_basis, values, strict=True) if v < 0]
    if negatives:
        worst, name = min(negatives)
        layer = parse_component(name)[1] + (-width / 2 if name.startswith("attn") else width / 2)
        ax.annotate(
            f"{name}: {worst:+.3f}",
            xy=(layer, worst),
            xytext=(0, -18),
            textcoords="offset points",
            ha="center",
            va="top",
            color="crimson",
            fontsize=10,
        )
    ax.axhline(0, color="0.3", linewidth=0.8)
    layers = sorted({layer for _, layer in basis})
    ax.set_xticks(layers, [str(layer) for layer in layers], fontsize=8 if len(layers) > 24 else 10)
    metric = _metric(result)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean clean direct effect ({metric})")
    ax.set_title(
        f"{result.model}: what each layer writes onto the target in the clean run "
        f"({len(negatives)} negative: erasure)"
    )
    handles, _ = ax.get_legend_handles_labels()
    handles.append(
        Patch(facecolor="white", edgecolor="crimson", hatch="///", label="negative (pushes the target down)")
    )
    ax.legend(handles=handles, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.12)


DRAWERS: dict[FigureName, Callable[[Figure, JobResult], None]] = {
    "te_vs_de": _te_vs_de,
    "layer_effects": _layer_effects,
    "response_heatmap": _response_heatmap,
    "erasure": _erasure,
    "self_repair": _self_repair,
}


def render(result: JobResult, name: FigureName, fmt: FigureFormat = "png") -> bytes:
    """One figure as PNG (1200 × 800 px) or SVG bytes; CPU-bound, so callers run it off the event loop."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if name not in DRAWERS:
        raise ValueError(f"unknown figure {name!r}; figures are {', '.join(FIGURE_NAMES)}")
    if fmt not in FIGURE_MEDIA_TYPES:
        raise ValueError(f"figure format must be png or svg, not {fmt!r}")
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None  # no timestamp in the SVG
    with _RENDER_LOCK:
        fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        DRAWERS[name](fig, result)
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    return buffer.getvalue()
