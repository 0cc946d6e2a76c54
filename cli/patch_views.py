"""What `hydra-ablate result` prints for a patching job: the pairs' metrics, then one row per site (and position)
with its mean patching score, the interval over pairs and the pooled score."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hydra_ablate_client.wire import JobResult


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
    return Group(*parts, Text(""), table)
