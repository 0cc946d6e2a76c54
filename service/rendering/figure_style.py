"""What every figure of a job shares: component names as (kind, layer), the unit of effects, layer ticks, the
render lock and the option error. Used by the service's figures, the paper's figures and the Compare page.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from hydra_ablate_client.vocabulary import is_knockout_name, knockout_members, parse_component

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIN_FONT_PT = 8.0
RENDER_LOCK = threading.Lock()  # matplotlib promises no thread safety; renders are GIL-bound anyway, so serialise
_UNITS = {
    "centered_logit": "centred logit", "logit": "logit", "logprob": "log-probability", "logit_diff": "logit difference"
}


class FigureOptionError(ValueError):
    """A figure option out of range (size, dpi, prompt or component); the message says what to change."""


def kind_and_layer(name: str) -> tuple[str, int]:
    """(kind, layer) of `attn.L`, `mlp.L` or `head.L.H` (a result's explicit component names).

    A knockout set of several members ("attn.3+head.5.1") is kind "knockout" at its deepest member's layer: figures
    that select components by kind leave it out, and the scatter of every component (te_vs_de) draws it apart."""
    if is_knockout_name(name):
        return "knockout", max(parse_component(member).layer or 0 for member in knockout_members(name))
    parts = parse_component(name)
    return parts.kind, parts.layer or 0


def knockout_note(result: Any) -> str:
    """The line a layer-indexed figure adds when it leaves the job's knockout sets out ("" when there are none)."""
    n = sum(1 for name in result.components if is_knockout_name(name))
    if not n:
        return ""
    return f"{n} knockout set{'s' if n > 1 else ''} not shown here (a set spans layers; see te_vs_de)"


def metric_unit(result: Any) -> str:
    """The unit every effect of the job's result is in, as axis labels write it."""
    metric = result.provenance.spec.metric
    return _UNITS.get(metric, metric)


def layer_ticks(ax: Axes, layers: list[int]) -> None:
    """Every layer while two-digit labels fit at 9 pt (about 25 px each at 100 dpi), else every second or fifth."""
    spec = ax.get_subplotspec()
    columns = spec.get_gridspec().ncols if spec is not None else 1
    figure = cast("Figure", ax.figure)
    width_px = figure.get_figwidth() * figure.dpi / columns * 0.85
    fits = max(1, int(width_px // 25))
    step = next((s for s in (1, 2, 5, 10) if len(layers) / s <= fits), 20)
    shown = layers[::step]
    ax.set_xticks(shown, [str(layer) for layer in shown])
    ax.tick_params(axis="both", labelsize=MIN_FONT_PT + 1)


def note_outside(ax: Axes, xs: Sequence[float] | None, ys: Sequence[float], *, what: str = "point") -> int:
    """Count the finite points that fall outside the panel's current limits and write that count on the panel
    ("n points outside the axes"): a figure may zoom on the bulk of its points, never drop some silently. `xs` None
    checks the y-axis only. Call after the limits are final; returns the count."""
    import math

    x_low, x_high = sorted(ax.get_xlim())
    y_low, y_high = sorted(ax.get_ylim())
    pairs = zip(xs, ys, strict=True) if xs is not None else ((None, y) for y in ys)
    outside = 0
    for x, y in pairs:
        if not math.isfinite(y) or (x is not None and not math.isfinite(x)):
            continue
        if not y_low <= y <= y_high or (x is not None and not x_low <= x <= x_high):
            outside += 1
    if outside:
        ax.text(0.99, 0.02, f"{outside} {what}{'' if outside == 1 else 's'} outside the axes", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=MIN_FONT_PT, color="0.2", zorder=10,
                bbox={"facecolor": "white", "alpha": 0.85, "linewidth": 0})
    return outside
