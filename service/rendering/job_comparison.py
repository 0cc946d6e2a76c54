"""The Compare page's figure: several finished jobs' per-layer profiles overlaid, drawn headless with matplotlib.

Top row: the paper's statistic, the per-layer slope of CE (the downstream layers' compensatory effect) on Δunembed
across prompts with its 95% bootstrap interval (0 < slope < 1 over the whole interval: partial repair; layers whose
ablation was weak drawn hollow); bottom row: mean total effect (solid) and direct effect (dashed) per layer.
Attention blocks left, MLP blocks right; one colour per job. Heads have no layer profile and are left out, as in the
job's own `layer_effects` figure. The service's older compensation-on-DE regression is in the page's tables only,
labelled as such.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra_ablate_client.wire import ComponentSummary, Fit, JobResult
from service.rendering.figure_style import RENDER_LOCK, kind_and_layer
from service.rendering.figures import DPI, FIGSIZE_IN
from service.rendering.paper_figures import note_clipping, robust_ylim

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MIN_JOBS, MAX_JOBS = 2, 8
KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class Compared:
    """One job on the Compare page: its label in legends and tables, and its result."""

    label: str
    result: JobResult


def layer_rows(result: JobResult, kind: str) -> list[tuple[int, ComponentSummary]]:
    """The job's per-layer summaries of one component kind, by layer."""
    rows = [(kind_and_layer(s.component), s) for s in result.summary.components]
    return sorted(((layer, s) for (k, layer), s in rows if k == kind), key=lambda row: row[0])


def layer_tables(jobs: Sequence[Compared]) -> list[tuple[str, list[int], list[dict[int, ComponentSummary]]]]:
    """Per kind with any layers: the layers any job has, and each job's summaries by layer (for the page's tables)."""
    tables = []
    for kind in KINDS:
        per_job = [dict(layer_rows(job.result, kind)) for job in jobs]
        layers = sorted({layer for rows in per_job for layer in rows})
        if layers:
            tables.append((kind, layers, per_job))
    return tables


def component_rows(jobs: Sequence[Compared]) -> tuple[list[str], list[dict[str, ComponentSummary]]]:
    """Every component any job ablated (in the first job's order, then the others'), and each job's summaries by name
    (the page's table of the paper's statistic per component)."""
    names: list[str] = []
    per_job = []
    for job in jobs:
        rows = {s.component: s for s in job.result.summary.components}
        names += [name for name in rows if name not in names]
        per_job.append(rows)
    return names, per_job


def partial_repair_count(result: JobResult) -> tuple[int, int]:
    """(components whose whole CE-on-Δunembed slope interval lies in (0, 1), components with such a fit)."""
    fits = [s.ce_vs_unembed for s in result.summary.components if s.ce_vs_unembed is not None]
    return sum(1 for f in fits if f.slope_in_unit_interval), len(fits)


def weak_count(result: JobResult) -> int:
    """Components whose ablation removed less than the job's efficacy threshold of their Δunembed."""
    return sum(1 for s in result.summary.components if s.weak_ablation)


def _panel(ax: Axes, jobs: Sequence[Compared], kind: str, slope: bool) -> None:
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["tab10"]
    ax.axhline(0, color="0.3", linewidth=0.8)
    drawn = False
    plotted: list[tuple[str, Fit]] = []  # (component and job number, fit): for the note on what runs off the axes
    for index, job in enumerate(jobs):
        rows = layer_rows(job.result, kind)
        if not rows:
            continue
        drawn = True
        layers = [layer for layer, _ in rows]
        colour = colours(index % 10)
        if slope:
            fits = [(layer, s.ce_vs_unembed, bool(s.weak_ablation)) for layer, s in rows
                    if s.ce_vs_unembed is not None and s.ce_vs_unembed.slope is not None]
            if not fits:
                continue
            xs = [layer + 0.08 * (index - (len(jobs) - 1) / 2) for layer, _, _ in fits]
            slopes = [float(f.slope or 0.0) for _, f, _ in fits]  # every slope is set (filtered above)
            low = [v if f.slope_ci_low is None else f.slope_ci_low for v, (_, f, _) in zip(slopes, fits, strict=True)]
            high = [v if f.slope_ci_high is None else f.slope_ci_high
                    for v, (_, f, _) in zip(slopes, fits, strict=True)]
            ax.errorbar(xs, slopes, yerr=[[v - lo for v, lo in zip(slopes, low, strict=True)],
                                          [hi - v for v, hi in zip(slopes, high, strict=True)]],
                        fmt="-", color=colour, elinewidth=1, capsize=2, linewidth=1, label=job.label)
            ax.scatter(xs, slopes, color=[colour if not weak else "white" for _, _, weak in fits],
                       edgecolors=[colour] * len(fits), s=24, zorder=3)
            plotted += [(f"{kind}.{layer} ({index + 1})", f) for layer, f, _ in fits]
        else:
            ax.plot(layers, [s.total_effect_mean for _, s in rows], "o-", color=colour, label=f"{job.label}: TE")
            ax.plot(layers, [s.direct_effect_mean for _, s in rows], "s--", color=colour, label=f"{job.label}: DE")
    if not drawn:
        ax.text(0.5, 0.5, f"no {kind} layers in these jobs", transform=ax.transAxes, ha="center", color="0.4")
        return
    if slope:
        ax.axhline(1, color="0.35", linewidth=0.8, linestyle="--")
        ax.axhspan(0, 1, color="tab:green", alpha=0.06, linewidth=0)
        if plotted:
            robust_ylim(ax, [f.slope for _, f in plotted])
            note_clipping(ax, plotted)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def render_comparison(jobs: Sequence[Compared]) -> bytes:
    """The comparison as a 1200 × 800 PNG; CPU-bound, so callers run it off the event loop."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not MIN_JOBS <= len(jobs) <= MAX_JOBS:
        raise ValueError(f"compare {MIN_JOBS} to {MAX_JOBS} jobs, not {len(jobs)}")
    metrics = sorted({job.result.provenance.spec.metric for job in jobs})
    buffer = io.BytesIO()
    with RENDER_LOCK:
        fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 2, sharex="col")
        for column, kind in enumerate(KINDS):
            _panel(axes[0][column], jobs, kind, slope=True)
            axes[0][column].set_title(f"{kind} layers: slope of CE on Δunembed, 95% CI")
            _panel(axes[1][column], jobs, kind, slope=False)
            axes[1][column].set_title(f"{kind} blocks: mean total (solid) and direct (dashed) effect")
            axes[1][column].set_xlabel("layer")
        axes[0][0].set_ylabel("slope (1: full repair, 0: none)")
        axes[1][0].set_ylabel(f"mean effect ({', '.join(metrics)})")
        fig.suptitle("Per-layer profiles of " + ", ".join(f"({n}) {job.label}" for n, job in enumerate(jobs, 1))
                     + "; hollow markers: weak ablations")
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
