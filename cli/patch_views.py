"""What `hydra-ablate result` prints for a patching job: the pairs' metrics, then one row per site (and position)
with its mean patching score, the interval over pairs and the pooled score; with estimates, their agreement with
the exact patches and, per site, the mean estimated score beside the exact one."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cli.estimate_views import attribution_lines
from hydra_ablate_client.wire import JobResult, PatchingResult


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def patch_result_view(result: JobResult) -> Group:
    patching = result.patching
    assert patching is not None, "a patching job's result"
    lines = [
        f"{result.model}: activation patching ({patching.direction}), {patching.metric}, {len(patching.pairs)} pairs, "
        f"positions {patching.positions}",
        f"mean clean metric {patching.clean_metric_mean:.3f}, mean corrupted metric "
        f"{patching.corrupted_metric_mean:.3f}",
        f"flagged pairs (|clean − corrupted| < {patching.epsilon:g}, no score): {patching.n_flagged}",
    ]
    table = Table(title=f"patching score per site (mean, {patching.ci_level:.0%} interval over pairs, pooled)")
    # Site names are never cut (a knockout set's name is long): the other columns wrap instead in 80 columns.
    widest = max((len(item.site) for item in patching.summary), default=4)
    table.add_column("site", justify="left", no_wrap=True, min_width=widest)
    for name in ("position", "pairs", "score", "interval", "pooled", "patched metric"):
        table.add_column(name, justify="right")
    for item in patching.summary:
        interval = (
            "–" if item.score_ci_low is None else f"[{_number(item.score_ci_low)}, {_number(item.score_ci_high)}]"
        )
        table.add_row(
            item.site,
            "final" if item.position is None else str(item.position),
            f"{item.n_scored}/{item.n_pairs}",
            _number(item.score_mean),
            interval,
            _number(item.pooled_score),
            _number(item.patched_metric_mean),
        )
    parts: list[RenderableType] = [Text(line) for line in lines]
    estimated = _estimates_table(patching)
    tail: list[RenderableType] = [] if estimated is None else [Text(""), estimated]
    tail += [Text(line) for line in attribution_lines(patching.attribution, "pair")]
    return Group(*parts, Text(""), table, *tail)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _estimates_table(patching: PatchingResult) -> Table | None:
    """Per site (at the final position: the last column of each pair) the mean exact score beside each method's
    mean estimated score over the scored pairs; None without estimates."""
    estimates = [p.estimates for p in patching.pairs]
    if not estimates or any(e is None for e in estimates):
        return None
    methods = [m for m in ("atp", "atp_qkfix", "atp_star") if getattr(estimates[0], m) is not None]
    table = Table(title="estimated patching score per site (mean over scored pairs, final position)")
    widest = max((len(site) for site in patching.sites), default=4)
    table.add_column("site", justify="left", no_wrap=True, min_width=widest)
    table.add_column("exact", justify="right")
    for method in methods:
        table.add_column(method if method != "atp_star" else "atp* (|score|)", justify="right")
    for s, site in enumerate(patching.sites):
        exact = _mean([p.patching_score[s][-1] for p in patching.pairs])
        cells = []
        for method in methods:
            grids = [getattr(e, f"{method}_score") for e in estimates]
            cells.append(_number(_mean([g[s][-1] for g in grids if g is not None])))
        table.add_row(site, _number(exact), *cells)
    return table
