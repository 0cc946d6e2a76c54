"""The lines `hydra-ablate result` prints for a job with attribution-patching estimates (ablation and patching
jobs alike): per method its rank agreement with the exact values, its recall of the exact top-k and how much
faster than the exact engine it ran; for ablation jobs, how much of each component's miss goes with the
compensatory effect (the result's `errors`, as the job page's table shows them). Each line fits 80 columns."""

from __future__ import annotations

from collections import Counter

from hydra_ablate_client.wire import AttributionSummary, EstimateError
from service.rendering.estimate_table import largest_errors

ERRORS_SHOWN = 5  # components per method, by |mean error| (the job page shows 10, the JSON has every one)


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def attribution_lines(block: AttributionSummary | None, unit: str = "prompt") -> list[str]:
    """`unit`: what the per-row agreement is taken within ("prompt", or "pair" for a patching job)."""
    if block is None:
        return []
    speed = {c.method: c.speedup for c in block.cost}
    lines = [f"estimates against exact (Spearman ρ per {unit}, pooled; top-k recall; speed):"]
    for a in block.agreement:
        times = speed.get(a.method)
        lines.append(f"  {a.method:<9} ρ {_num(a.spearman_per_prompt_mean, '+.2f')}, "
                     f"{_num(a.spearman_pooled, '+.2f')}; top-{a.k} {_num(a.recall_at_k_per_prompt_mean, '.2f')}; "
                     + ("—" if times is None else f"{times:.1f}× exact"))
    return lines


def _fixed(value: float | None, width: int, digits: int = 3, signed: bool = True) -> str:
    """`value` in at most `width` characters: `digits` decimals, fewer for a large value, so the columns hold."""
    if value is None:
        return "—"
    sign = "+" if signed else ""
    for places in range(digits, -1, -1):
        text = format(value, f"{sign}.{places}f")
        if len(text) <= width:
            return text
    return format(value, f"{sign}.0e")


def _slope(error: EstimateError) -> tuple[str, str]:
    """The slope of the error on CE, and its bootstrap interval ("—" without one)."""
    fit = error.error_vs_ce
    if fit.slope_ci_low is None or fit.slope_ci_high is None:
        interval = "—"
    else:
        interval = f"[{_fixed(fit.slope_ci_low, 5, 2)},{_fixed(fit.slope_ci_high, 5, 2)}]"
    return _fixed(fit.slope, 5, 2), interval


def error_lines(block: AttributionSummary | None, unit: str = "prompt", shown: int = ERRORS_SHOWN) -> list[str]:
    """Per method, its `shown` components with the largest |mean error| (estimate − exact): the means of the error,
    |error|, TE, CE and the norm's response, the error's slope on CE across `unit`s with its bootstrap interval, and
    Pearson's r of the two. Nothing for a block without errors (patching jobs: no CE)."""
    if block is None or not block.errors:
        return []
    rows = largest_errors(block.errors, shown)
    carried = Counter(e.method for e in block.errors)  # components per method, in the result's method order
    level = f"{rows[0].error_vs_ce.ci_level:.0%}"
    name = max(9, *(len(e.component) for e in rows))
    lines = [
        "how much of the miss is compensation (error = estimate − exact, on CE across",
        f"  {unit}s; slope 1: the miss is the compensation, 0: it does not go with it):",
    ]

    def row(name_cell: str, numbers: list[str], slope: str, interval: str, r: str) -> str:
        return (f"    {name_cell:<{name}} " + " ".join(f"{n:>6}" for n in numbers)
                + f" {slope:>5} {interval:<13} {r:>5}")

    header = row("component", ["error", "|error|", "TE", "CE", "norm"], "slope", f"{level} bootstrap", "r")
    for method in carried:
        mine = [e for e in rows if e.method == method]
        lines.append(f"  {method}: {len(mine)} of {carried[method]} components, largest |mean error| first")
        lines.append(header)
        for e in mine:
            numbers = [e.error_mean, e.abs_error_mean, e.total_effect_mean, e.compensatory_effect_mean,
                       e.norm_response_mean]
            cells = [_fixed(v, 6, signed=i != 1) for i, v in enumerate(numbers)]  # |error| has no sign
            lines.append(row(e.component, cells, *_slope(e), _fixed(e.error_ce_correlation, 5, 2)))
    return lines
