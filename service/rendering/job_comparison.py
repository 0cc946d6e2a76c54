"""The Compare page's figure: several finished jobs' per-layer profiles overlaid, drawn headless with matplotlib.

Top row: mean total effect (solid) and direct effect (dashed) per layer; bottom row: the per-layer slope of
compensation on direct effect across prompts (how much of a layer's direct effect the rest of the network repairs:
-1 is full repair). Attention blocks left, MLP blocks right; one colour per job. Heads have no layer profile and are
left out, as in the job's own `layer_effects` figure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra_ablate_client.wire import ComponentSummary, JobResult
from service.rendering.figure_style import RENDER_LOCK, kind_and_layer
from service.rendering.figures import DPI, FIGSIZE_IN

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


def _panel(ax: Axes, jobs: Sequence[Compared], kind: str, slope: bool) -> None:
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["tab10"]
    ax.axhline(0, color="0.3", linewidth=0.8)
    drawn = False
    for index, job in enumerate(jobs):
        rows = layer_rows(job.result, kind)
        if not rows:
            continue
        drawn = True
        layers = [layer for layer, _ in rows]
        colour = colours(index % 10)
        if slope:
            values = [s.compensation_vs_direct.slope for _, s in rows]
            ax.plot(layers, [float("nan") if v is None else v for v in values], "o-", color=colour, label=job.label)
        else:
            ax.plot(layers, [s.total_effect_mean for _, s in rows], "o-", color=colour, label=f"{job.label}: TE")
            ax.plot(layers, [s.direct_effect_mean for _, s in rows], "s--", color=colour, label=f"{job.label}: DE")
    if not drawn:
        ax.text(0.5, 0.5, f"no {kind} layers in these jobs", transform=ax.transAxes, ha="center", color="0.4")
        return
    if slope:
        ax.axhline(-1, color="0.6", linewidth=0.8, linestyle=":")
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
            _panel(axes[0][column], jobs, kind, slope=False)
            axes[0][column].set_title(f"{kind} blocks: mean total (solid) and direct (dashed) effect")
            _panel(axes[1][column], jobs, kind, slope=True)
            axes[1][column].set_title(f"{kind} blocks: slope of compensation on direct effect")
            axes[1][column].set_xlabel("layer")
        axes[0][0].set_ylabel(f"mean effect ({', '.join(metrics)})")
        axes[1][0].set_ylabel("slope (−1: fully repaired)")
        fig.suptitle("Per-layer profiles of " + ", ".join(job.label for job in jobs))
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
