"""The `patching_grid` figure of a patching job: each site's patching score, as grids a reader scans for where the
information sits.

- `positions: "all"`: one layer × position heatmap per site kind (resid_pre, attn, mlp; head sites as head ×
  position rows), x ticks the tokens of the first pair's clean prompt (position indices when the pairs differ in
  length, said on the figure);
- `positions: "final"`: one layer × head grid per head site part (output, q, k, v, pattern) and one layer × kind
  grid (a 1-column heatmap per kind) for resid_pre, attn and mlp.
- knockout sets of sites (`head.9.6+head.9.9`, patched together): a panel of their own, one row per set.

A cell is the mean patching score over the pairs scored there (`PatchSummary.score_mean`); where no pair was scored
(every one flagged) it is the pooled score, marked with a dot, and grey where neither exists. `patching_grids` is the
pure part (what is plotted), `draw` the drawing. The colour map is diverging and centred on 0 (no change), shared by
every panel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from hydra_ablate_client.vocabulary import is_knockout_name, parse_patch_site
from hydra_ablate_client.wire import JobResult, PatchingResult, PatchSummary
from service.rendering.figure_style import MIN_FONT_PT

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

LAYER_KINDS = ("resid_pre", "attn", "mlp")
HEAD_PARTS = (None, "q", "k", "v", "pattern")  # None: the head's output
_PART_TITLES = {None: "head output", "q": "head query (q)", "k": "head key (k)", "v": "head value (v)",
                "pattern": "head attention pattern"}
_ANNOTATE_UP_TO = 120  # cells per panel that still take their value written in them
_TOKEN_CHARS = 10


@dataclass
class Grid:
    """One panel: `values[row][column]` (NaN: no score), `pooled[row][column]` where the value is the pooled score
    because no pair was scored there, and `sites[row][column]` the site drawn in each cell (None: not patched)."""

    title: str
    row_label: str
    column_label: str
    rows: list[str]
    columns: list[str]
    values: list[list[float]] = field(default_factory=list)
    pooled: list[list[bool]] = field(default_factory=list)
    sites: list[list[str | None]] = field(default_factory=list)


@dataclass
class PatchGrids:
    grids: list[Grid]
    left_out: list[str]  # sites no grid holds (knockout sets of sites, say)
    token_labels: bool  # x ticks are the first clean prompt's tokens (positions "all")
    uneven: bool  # the pairs differ in length: positions by index


def cell_value(item: PatchSummary | None) -> tuple[float, bool]:
    """(value, pooled): the mean score over the scored pairs, else the pooled score, else NaN."""
    if item is None:
        return math.nan, False
    if item.score_mean is not None:
        return item.score_mean, False
    if item.pooled_score is not None:
        return item.pooled_score, True
    return math.nan, False


def _token_label(token: str) -> str:
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    shown = "␣" + shown[1:] if shown.startswith(" ") else shown  # a leading space is part of the token
    return shown if len(shown) <= _TOKEN_CHARS else shown[: _TOKEN_CHARS - 1] + "…"


def _fill(grid: Grid, site_at: Callable[[int, int], str | None], position_at: Callable[[int], int | None],
          lookup: dict[tuple[str, int | None], PatchSummary]) -> Grid:
    """Each cell's value from the summary row of its site (and, with positions "all", its token position)."""
    for r in range(len(grid.rows)):
        values, pooled, sites = [], [], []
        for c in range(len(grid.columns)):
            site = site_at(r, c)
            value, is_pooled = cell_value(lookup.get((site, position_at(c))) if site is not None else None)
            values.append(value)
            pooled.append(is_pooled)
            sites.append(site)
        grid.values.append(values)
        grid.pooled.append(pooled)
        grid.sites.append(sites)
    return grid


def patching_grids(result: JobResult) -> PatchGrids:
    """What the patching_grid figure plots, from `result.patching` alone."""
    patching = result.patching
    if patching is None:
        raise ValueError("not a patching result")
    lookup = {(item.site, item.position): item for item in patching.summary}
    parsed: dict[str, tuple[str, int, int | None, str | None]] = {}
    left_out = []
    for site in patching.sites:
        try:
            parsed[site] = tuple(parse_patch_site(site))  # type: ignore[assignment]
        except ValueError:
            left_out.append(site)
    sets = [site for site in left_out if is_knockout_name(site)]
    left_out = [site for site in left_out if site not in sets]
    plotted = (_all_positions(patching, parsed, lookup, left_out) if patching.positions == "all"
               else _final_position(parsed, lookup, left_out))
    if sets:  # knockout sets of sites patched together: one row each, after the single sites
        columns = plotted.grids[0].columns if plotted.grids and patching.positions == "all" else (
            [str(p) for p in sorted({p for pair in patching.pairs for p in pair.positions})]
            if patching.positions == "all" else ["final"])
        positions = sorted({p for pair in patching.pairs for p in pair.positions})
        by_row = dict(enumerate(sets))
        grid = Grid("knockout sets (patched together)", "set", "position" if patching.positions == "all" else "",
                    sets, columns)
        plotted.grids.append(_fill(grid, partial(_row_site, by_row),
                                   positions.__getitem__ if patching.positions == "all" else _final, lookup))
    return plotted


def _all_positions(patching: PatchingResult, parsed: dict[str, tuple[str, int, int | None, str | None]],
                   lookup: dict[tuple[str, int | None], PatchSummary], left_out: list[str]) -> PatchGrids:
    positions = sorted({p for pair in patching.pairs for p in pair.positions})
    uneven = len({len(pair.positions) for pair in patching.pairs}) > 1
    tokens = patching.pairs[0].clean_tokens if patching.pairs else None
    token_labels = not uneven and tokens is not None and len(tokens) == len(positions)
    columns = ([_token_label(tokens[p]) for p in positions] if token_labels and tokens is not None
               else [str(p) for p in positions])
    grids = []
    for kind in LAYER_KINDS:
        layers = sorted({layer for site, (k, layer, _, _) in parsed.items() if k == kind})
        if not layers:
            continue
        by_row = {layers.index(layer): site for site, (k, layer, _, _) in parsed.items() if k == kind}
        grid = Grid(kind, "layer", "position", [str(layer) for layer in layers], columns)
        grids.append(_fill(grid, partial(_row_site, by_row), positions.__getitem__, lookup))
    for part in HEAD_PARTS:
        heads = sorted((layer, head or 0) for site, (k, layer, head, p) in parsed.items() if k == "head" and p == part)
        if not heads:
            continue
        by_row = {heads.index((layer, head or 0)): site for site, (k, layer, head, p) in parsed.items()
                  if k == "head" and p == part}
        grid = Grid(_PART_TITLES[part], "head (layer.head)", "position", [f"{layer}.{head}" for layer, head in heads],
                    columns)
        grids.append(_fill(grid, partial(_row_site, by_row), positions.__getitem__, lookup))
    return PatchGrids(grids, left_out, token_labels, uneven)


def _row_site(by_row: dict[int, str], row: int, _column: int) -> str | None:
    return by_row.get(row)  # positions "all": one site per row, across its positions


def _cell_site(cells: dict[tuple[int, int], str], row: int, column: int) -> str | None:
    return cells.get((row, column))


def _final(_column: int) -> None:
    return None  # positions "final": the summary's rows have no position


def _final_position(parsed: dict[str, tuple[str, int, int | None, str | None]],
                    lookup: dict[tuple[str, int | None], PatchSummary], left_out: list[str]) -> PatchGrids:
    grids = []
    # One head axis for every head grid: as many columns as the highest head patched in any part.
    n_heads = 1 + max((head or 0 for k, _, head, _ in parsed.values() if k == "head"), default=0)
    for part in HEAD_PARTS:
        mine = {site: (layer, head or 0) for site, (k, layer, head, p) in parsed.items() if k == "head" and p == part}
        if not mine:
            continue
        layers = sorted({layer for layer, _ in mine.values()})
        cells = {(layers.index(layer), head): site for site, (layer, head) in mine.items()}
        grid = Grid(_PART_TITLES[part], "layer", "head", [str(layer) for layer in layers],
                    [str(h) for h in range(n_heads)])
        grids.append(_fill(grid, partial(_cell_site, cells), _final, lookup))
    kinds = [kind for kind in LAYER_KINDS if any(k == kind for k, _, _, _ in parsed.values())]
    if kinds:
        layers = sorted({layer for k, layer, _, _ in parsed.values() if k in kinds})
        cells = {(layers.index(layer), kinds.index(k)): site for site, (k, layer, _, _) in parsed.items() if k in kinds}
        grid = Grid(" / ".join(kinds), "layer", "site", [str(layer) for layer in layers], list(kinds))
        grids.insert(0, _fill(grid, partial(_cell_site, cells), _final, lookup))
    return PatchGrids(grids, left_out, False, False)


def _ticks(count: int, room_px: float, per_label_px: float) -> list[int]:
    step = next((s for s in (1, 2, 4, 5, 10, 20, 50) if count / s * per_label_px <= room_px), 100)
    return list(range(0, count, step))


def _panel(ax: Axes, grid: Grid, bound: float, cmap: Colormap, width_px: float, height_px: float) -> AxesImage:
    import numpy as np

    values = np.array(grid.values, dtype=float)
    image = ax.imshow(values, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    n_rows, n_cols = values.shape
    tokens = grid.column_label == "position" and not all(label.isdigit() for label in grid.columns)
    x_shown = _ticks(n_cols, width_px, 12 if tokens else 22)  # rotated token labels: one line of 9 pt each
    ax.set_xticks(x_shown, [grid.columns[i] for i in x_shown], rotation=90 if tokens else 0)
    y_shown = _ticks(n_rows, height_px, 14)
    ax.set_yticks(y_shown, [grid.rows[i] for i in y_shown])
    ax.tick_params(axis="both", labelsize=MIN_FONT_PT + 1)
    ax.set_xlabel("token" if tokens else grid.column_label)
    ax.set_ylabel(grid.row_label)
    ax.set_title(grid.title)
    dots = [(c, r) for r in range(n_rows) for c in range(n_cols) if grid.pooled[r][c]]
    if dots:
        # In the cell's corner, clear of the value written in its middle.
        ax.scatter([c + 0.36 for c, _ in dots], [r - 0.34 for _, r in dots], s=10, color="black", marker="o",
                   zorder=3)
    if n_rows * n_cols <= _ANNOTATE_UP_TO and n_cols * 34 <= width_px:
        for r in range(n_rows):
            for c in range(n_cols):
                v = values[r, c]
                if math.isfinite(v):
                    ax.text(c, r, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=MIN_FONT_PT,
                            color="white" if abs(v) > 0.6 * bound else "black")
    return image


def draw(fig: Figure, result: JobResult) -> None:
    from matplotlib import colormaps

    from service.rendering.figures import robust_bound

    patching = result.patching
    assert patching is not None  # render() refuses ablation results before drawing
    plotted = patching_grids(result)
    grids = plotted.grids
    if not grids:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"no site this figure draws ({', '.join(plotted.left_out)})", ha="center", va="center",
                transform=ax.transAxes)
        return
    every = [v for g in grids for row in g.values for v in row]
    bound = max(robust_bound(every), 1e-6)
    clipped = any(abs(v) > bound for v in every if math.isfinite(v))
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.82")
    n_cols = min(3, len(grids))
    n_rows = math.ceil(len(grids) / n_cols)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    width_px = fig.get_figwidth() * fig.dpi / n_cols * 0.7
    height_px = fig.get_figheight() * fig.dpi / n_rows * 0.6
    images = [_panel(ax, grid, bound, cmap, width_px, height_px)
              for ax, grid in zip(axes.ravel(), grids, strict=False)]
    for ax in axes.ravel()[len(grids):]:
        ax.set_axis_off()
    label = "patching score (0: no change, 1: the source run's metric)"
    if clipped:
        label += f"; clipped at ±{bound:.3g}"
    fig.colorbar(images[0], ax=list(axes.ravel()[: len(grids)]), label=label, extend="both" if clipped else "neither",
                 shrink=0.9)
    n_scored = len(patching.pairs) - patching.n_flagged
    pooled = any(any(row) for g in grids for row in g.pooled)
    lines = [f"{result.model}: activation patching ({patching.direction}, positions {patching.positions}), "
             f"{len(patching.pairs)} pairs, {patching.n_flagged} flagged",
             (f"cell: mean patching score over the {n_scored} scored pairs"
              + ("; •: pooled score (no pair scored there)" if pooled else "") if n_scored
              else "cell •: the pooled score of the pairs' mean metrics (every pair flagged: no per-pair score)")
             + "; grey: not patched or no score"]
    if plotted.token_labels:
        lines.append("x: the positions' tokens in pair 0's clean prompt (␣: a leading space)")
    if plotted.uneven:
        lines.append("the pairs differ in length: positions by index (late positions have fewer pairs)")
    if plotted.left_out:
        lines.append(f"{len(plotted.left_out)} site(s) not drawn: {', '.join(plotted.left_out[:4])}"
                     + (" …" if len(plotted.left_out) > 4 else ""))
    fig.suptitle("\n".join(lines))
