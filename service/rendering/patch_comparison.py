"""The Compare page of activation-patching jobs: per site (and position) each job's mean patching score with its
bootstrap interval side by side, and the figure of them, drawn headless with matplotlib.

Rows are (site, position) as the jobs' summaries have them: position None is each pair's final position (positions
"final"), an index a token position (positions "all"); jobs of either scope line up where they share a row. The
figure is one panel per site kind (resid_pre, attn, mlp, head, knockout sets), a row per (site, position) with each
job's mean score and interval beside the others' (one colour per job); 0 is "the patch changed nothing", 1 "it moved
the metric all the way to the source run's value". A kind with more than MAX_FIGURE_ROWS rows keeps those that most
jobs scored, then those with the largest scores (the panel says how many it left out; the page's table has them
all).

The kind of a comparison (`comparison_kind`): ablation jobs compare with ablation jobs (service/rendering/
job_comparison.py), patching jobs with patching jobs; a selection of both is a MixedComparison that says which is
which.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hydra_ablate_client.vocabulary import is_knockout_name
from hydra_ablate_client.wire import PatchingResult, PatchSummary
from service.rendering.figure_style import RENDER_LOCK
from service.rendering.figures import DPI, FIGSIZE_IN
from service.rendering.job_comparison import MAX_JOBS, MIN_JOBS, Compared

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D

ComparisonKind = Literal["ablation", "patching"]
SITE_KINDS = ("resid_pre", "attn", "mlp", "head", "knockout")
KIND_TITLES = {"resid_pre": "residual stream (resid_pre)", "attn": "attention blocks", "mlp": "MLP blocks",
               "head": "heads", "knockout": "knockout sets"}
MAX_FIGURE_ROWS = 16  # rows per panel; the page's table has every row
RowKey = tuple[str, int | None]  # (site, position): None is each pair's final position


class MixedComparison(ValueError):
    """A selection of ablation and patching jobs: the message names which is which and what to pick."""


def comparison_kind(jobs: Sequence[Compared]) -> ComparisonKind:
    """"patching" when every job is a patching job, "ablation" when none is; MixedComparison otherwise."""
    patching = [job.label for job in jobs if job.result.patching is not None]
    ablation = [job.label for job in jobs if job.result.patching is None]
    if patching and ablation:
        are = "is an activation-patching job" if len(patching) == 1 else "are activation-patching jobs"
        others = "an ablation job" if len(ablation) == 1 else "ablation jobs"
        raise MixedComparison(
            f"{', '.join(patching)} {are} and {', '.join(ablation)} {others}: their numbers measure different things "
            "(a patching score per site; the effects of ablating a component), so compare patching jobs with "
            "patching jobs and ablation jobs with ablation jobs"
        )
    return "patching" if patching else "ablation"


def patching_of(job: Compared) -> PatchingResult:
    assert job.result.patching is not None, "a patching comparison holds patching jobs only (comparison_kind)"
    return job.result.patching


def site_kind(site: str) -> str:
    """resid_pre, attn, mlp or head; "knockout" for a set of sites patched together."""
    return "knockout" if is_knockout_name(site) else site.split(".", 1)[0]


def row_label(key: RowKey) -> str:
    site, position = key
    return site if position is None else f"{site} @ {position}"


@dataclass(frozen=True)
class PatchRows:
    """Every (site, position) any job has, in the first job's order then the others', and each job's rows by key."""

    keys: list[RowKey]
    per_job: list[dict[RowKey, PatchSummary]]


def patch_rows(jobs: Sequence[Compared]) -> PatchRows:
    keys: list[RowKey] = []
    per_job = []
    for job in jobs:
        rows = {(item.site, item.position): item for item in patching_of(job).summary}
        keys += [key for key in rows if key not in keys]
        per_job.append(rows)
    return PatchRows(keys, per_job)


def figure_rows(rows: PatchRows, kind: str) -> tuple[list[RowKey], int]:
    """The rows of one site kind the figure draws (in the table's order) and how many it leaves out. A kind with more
    than MAX_FIGURE_ROWS keeps the rows that most jobs scored (what the figure is for: scores side by side), and among
    rows that as many jobs scored, those with the largest |mean score| of any job."""
    keys = [key for key in rows.keys if site_kind(key[0]) == kind]
    if len(keys) <= MAX_FIGURE_ROWS:
        return keys, 0

    def rank(key: RowKey) -> tuple[int, float]:
        scores = [item.score_mean for job in rows.per_job if (item := job.get(key)) and item.score_mean is not None]
        return len(scores), max((abs(s) for s in scores), default=-1.0)

    kept = set(sorted(keys, key=rank, reverse=True)[:MAX_FIGURE_ROWS])
    return [key for key in keys if key in kept], len(keys) - MAX_FIGURE_ROWS


def _panel(ax: Axes, rows: PatchRows, kind: str) -> None:
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    keys, left_out = figure_rows(rows, kind)
    n = len(rows.per_job)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.axvline(1, color="0.35", linewidth=0.8, linestyle="--")
    for j, per_key in enumerate(rows.per_job):
        ys, xs, low, high, hollow = [], [], [], [], []
        for r, key in enumerate(keys):
            item = per_key.get(key)
            if item is None or item.score_mean is None:
                continue
            ys.append(r + 0.7 * (j - (n - 1) / 2) / max(1, n))
            xs.append(item.score_mean)
            low.append(item.score_mean - (item.score_ci_low if item.score_ci_low is not None else item.score_mean))
            high.append((item.score_ci_high if item.score_ci_high is not None else item.score_mean) - item.score_mean)
            hollow.append(item.score_ci_low is None)
        if not xs:
            continue
        colour = colours(j % 10)
        ax.errorbar(xs, ys, xerr=[low, high], fmt="none", ecolor=colour, elinewidth=1.2, capsize=2)
        ax.scatter(xs, ys, s=26, zorder=3, color=["white" if h else colour for h in hollow], edgecolors=colour)
    ax.set_yticks(range(len(keys)), [row_label(key) for key in keys], fontsize=8)
    ax.set_ylim(len(keys) - 0.5, -0.5)  # the table's order, top down
    ax.grid(True, axis="x", alpha=0.3)
    title = KIND_TITLES[kind]
    if left_out:
        title += f" ({left_out} more row{'s' if left_out > 1 else ''} in the page's table)"
    ax.set_title(title, fontsize=10)


def _legend(jobs: Sequence[Compared]) -> list[Line2D]:
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    colours = colormaps["tab10"]
    return [Line2D([], [], marker="o", linestyle="", color=colours(j % 10),
                   label=f"({j + 1}) {job.label}: {patching_of(job).direction}, positions {patching_of(job).positions}")
            for j, job in enumerate(jobs)]


def render_patch_comparison(jobs: Sequence[Compared]) -> bytes:
    """The comparison of patching jobs as a 1200 × 800 PNG; CPU-bound, so callers run it off the event loop."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not MIN_JOBS <= len(jobs) <= MAX_JOBS:
        raise ValueError(f"compare {MIN_JOBS} to {MAX_JOBS} jobs, not {len(jobs)}")
    if comparison_kind(jobs) != "patching":
        raise MixedComparison("these are ablation jobs: their comparison is job_comparison.render_comparison")
    rows = patch_rows(jobs)
    kinds = [kind for kind in SITE_KINDS if any(site_kind(site) == kind for site, _ in rows.keys)]
    buffer = io.BytesIO()
    with RENDER_LOCK:
        fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        columns = 1 if len(kinds) == 1 else 2
        n_rows = (len(kinds) + columns - 1) // columns
        heights = [max(max(len(figure_rows(rows, k)[0]) for k in kinds[r * columns:(r + 1) * columns]), 4)
                   for r in range(n_rows)]  # a panel of one row still has room for its title and axis
        grid = fig.add_gridspec(n_rows, columns, height_ratios=heights)
        axes = []
        for index, kind in enumerate(kinds):
            ax = fig.add_subplot(grid[index // columns, index % columns])
            _panel(ax, rows, kind)
            axes.append(ax)
        ci = "/".join(sorted({f"{100 * patching_of(job).ci_level:.0f}%" for job in jobs}))
        for ax in axes[-columns:]:
            ax.set_xlabel(f"mean patching score [{ci} interval]")
        fig.legend(handles=_legend(jobs), loc="outside lower center", ncols=min(len(jobs), 4), fontsize=8)
        fig.suptitle(f"Patching scores per site of {len(jobs)} jobs: the mean over the scored pairs with its {ci} "
                     "bootstrap interval (hollow: one scored pair, no interval)\n0: the patch changed nothing, 1 "
                     "(dashed): it moved the metric to the source run's value; '@ p': token position p", fontsize=10)
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
