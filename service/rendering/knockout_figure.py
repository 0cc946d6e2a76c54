"""The `knockout_response` figure of an ablation job with knockouts: which components take over when a set is
ablated together.

For each knockout set (the first `MAX_SETS`; the figure says how many it leaves out), a bar per response-basis
component (layer components, or heads with `response_basis: "heads"`), in layer order: its mean response over
prompts, `response_d` = its direct effect in the ablated run minus its direct effect in the clean run, read with the
clean final-norm scale (docs/concepts/definitions.md). Positive: it writes more onto the target when the set is gone
(it takes over); negative: it writes less. The interval is the 95% Student-t interval of the mean over prompts. The
set's members are marked (their own change is not a response), and so is an attention layer that holds a member
head (its response leaves that head's own change out; in the head basis a member head is an entry of its own).

`knockout_responses` is the pure part (what is plotted), `draw` the drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from hydra_ablate_client.vocabulary import is_knockout_name, knockout_members, parse_component
from hydra_ablate_client.wire import JobResult
from service.rendering.figure_style import MIN_FONT_PT, metric_unit

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_SETS = 4
# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1 … 30; past 30 the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df ≥ 1)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass
class KnockoutBars:
    """One set's bars: per response-basis component its mean response over prompts and 95% interval (None below
    two prompts), whether it is a member of the set (its own change, not a response: 0 or not downstream) and
    whether it is the attention layer of a member head (its response leaves that head's own change out)."""

    knockout: str
    members: list[str]
    basis: list[str]
    mean: list[float]
    ci_low: list[float | None]
    ci_high: list[float | None]
    in_set: list[bool]
    holds_member: list[bool]


def _holds_member(basis_name: str, members: list[str]) -> bool:
    parts = parse_component(basis_name)
    if parts.kind != "attn":
        return False
    return any(parse_component(m).kind == "head" and parse_component(m).layer == parts.layer for m in members)


def _in_set(basis_name: str, members: list[str]) -> bool:
    """A member, or (the head basis) a head of a member attention layer: its output is the member's."""
    parts = parse_component(basis_name)
    return basis_name in members or (parts.kind == "head" and f"attn.{parts.layer}" in members)


def knockout_responses(result: JobResult) -> tuple[list[KnockoutBars], int]:
    """The bars of the first MAX_SETS knockout sets, from the result's per-prompt response matrices, and how many
    sets are left out."""
    sets = [(c, name) for c, name in enumerate(result.components) if is_knockout_name(name)]
    drawn = []
    for c, name in sets[:MAX_SETS]:
        members = knockout_members(name)
        means: list[float] = []
        lows: list[float | None] = []
        highs: list[float | None] = []
        for d in range(len(result.response_basis)):
            values = [p.response[c][d] for p in result.prompts]
            n = len(values)
            mean = sum(values) / n if n else math.nan
            means.append(mean)
            if n >= 2:
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
                half = t975(n - 1) * sd / math.sqrt(n)
                lows.append(mean - half)
                highs.append(mean + half)
            else:
                lows.append(None)
                highs.append(None)
        drawn.append(KnockoutBars(name, members, list(result.response_basis), means, lows, highs,
                                  [_in_set(b, members) for b in result.response_basis],
                                  [_holds_member(b, members) for b in result.response_basis]))
    return drawn, max(0, len(sets) - MAX_SETS)


def _panel(ax: Axes, bars: KnockoutBars, unit: str, n_prompts: int) -> None:
    import numpy as np

    x = np.arange(len(bars.basis))
    colours = ["0.75" if inside else ("tab:blue" if name.startswith(("attn", "head")) else "tab:orange")
               for name, inside in zip(bars.basis, bars.in_set, strict=True)]
    means = np.array(bars.mean, dtype=float)
    drawn = ax.bar(x, means, color=colours, width=0.8)
    for bar, inside in zip(drawn, bars.in_set, strict=True):
        if inside:
            bar.set_hatch("///")
            bar.set_edgecolor("crimson")
    has_ci = [i for i, low in enumerate(bars.ci_low) if low is not None]
    if has_ci:
        low = np.array([bars.ci_low[i] for i in has_ci], dtype=float)
        high = np.array([bars.ci_high[i] for i in has_ci], dtype=float)
        ax.errorbar(x[has_ci], means[has_ci], yerr=[means[has_ci] - low, high - means[has_ci]], fmt="none",
                    ecolor="0.15", elinewidth=0.8, capsize=2)
    ax.axhline(0, color="0.3", linewidth=0.8)
    figure = cast("Figure", ax.figure)
    width_px = figure.get_figwidth() * figure.dpi * 0.85
    step = next((s for s in (1, 2, 4, 5, 10) if len(x) / s * 13 <= width_px), 20)
    shown = list(range(0, len(x), step))
    names = [bars.basis[i] + ("*" if bars.holds_member[i] else "") for i in shown]
    ax.set_xticks(shown, names, rotation=0 if len(shown) * 70 <= width_px else 90)
    ax.tick_params(axis="both", labelsize=MIN_FONT_PT)
    for label, i in zip(ax.get_xticklabels(), shown, strict=True):
        if bars.in_set[i] or bars.holds_member[i]:
            label.set_color("crimson")
            label.set_fontweight("bold" if bars.in_set[i] else "normal")
    order = sorted((i for i in range(len(x)) if not bars.in_set[i] and math.isfinite(means[i])),
                   key=lambda i: -abs(means[i]))
    top = [f"{bars.basis[i]} {means[i]:+.3g}" for i in order[:3] if means[i] != 0]
    ax.set_title(f"set {bars.knockout} ablated" + (f"; largest responses: {', '.join(top)}" if top else ""),
                 fontsize=MIN_FONT_PT + 2)
    ax.set_ylabel(f"mean response ({unit})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(x=0.01)


def draw(fig: Figure, result: JobResult) -> None:
    from matplotlib.patches import Patch

    drawn, left_out = knockout_responses(result)
    if not drawn:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, 'this job has no knockout sets: submit it with "knockouts": [["attn.3", "head.5.1"]]\n'
                "(components ablated together; docs/concepts/patching.md, Joint knockouts)", ha="center",
                va="center", fontsize=14, transform=ax.transAxes)
        return
    unit = metric_unit(result)
    axes = fig.subplots(len(drawn), 1, squeeze=False)[:, 0]
    for ax, bars in zip(axes, drawn, strict=True):
        _panel(ax, bars, unit, len(result.prompts))
    heads_basis = any(name.startswith("head.") for name in result.response_basis)
    attention = "attention heads (head.L.H)" if heads_basis else "attention"
    handles = [Patch(facecolor="tab:blue", label=attention), Patch(facecolor="tab:orange", label="MLP"),
               Patch(facecolor="0.75", edgecolor="crimson", hatch="///", label="a member of the set (not a response)")]
    if any(any(b.holds_member) for b in drawn):
        handles.append(Patch(facecolor="white", edgecolor="white",
                             label="*: holds a member head (its response leaves the head's own change out)"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=MIN_FONT_PT + 1, ncols=len(handles))
    interval = "95% t interval over prompts" if len(result.prompts) >= 2 else "no interval: one prompt"
    title = (f"{result.model}: which components take over when a set is ablated ({result.provenance.spec.ablation} "
             f"ablation, {len(result.prompts)} prompts)\nbar: mean response = its direct effect ablated − clean "
             f"({unit}), > 0: writes more onto the target; whiskers: {interval}")
    if left_out:
        title += f"\n{left_out} more knockout set{'s' if left_out > 1 else ''} not shown (the first {MAX_SETS} are)"
    fig.suptitle(title)
