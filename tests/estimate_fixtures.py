"""What the tests of estimates jobs through the real stack share: the job, its prompts, the names they compare and
the live API (uvicorn on the session's Redis, beside the session's Celery worker).

Import the fixture explicitly in a test module (`from tests.estimate_fixtures import live_url`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import pytest

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import AttributionSummary, EstimateError, EstimateMiss, JobResult, JobStatus
from service.api.app import create_app
from service.core.settings import Settings
from tests.live_server import serve

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "My favourite colour is",
    "The Eiffel Tower is located in the city of",
    "Beats Music is owned by",
]
JOB: dict[str, Any] = {
    "model": "tiny-llama",
    "prompts": PROMPTS,
    "components": ["attn", "mlp", "head"],
    "ablation": "resample",
    "resample_samples": 2,
    "resample_from": "random",
    "metric": "logit",
    "seed": 3,
}
METHODS = ["atp", "atp_qkfix", "atp_star"]
EXACT_FIELDS = ("total_effect", "direct_effect", "compensation", "norm_response", "unembed_effect",
                "compensatory_effect", "ablated_unembed_effect", "response", "clean_direct_effect")


@pytest.fixture(scope="module")
def live_url(celery_worker: object, stack_env: dict[str, str]) -> Iterator[str]:
    with serve(create_app(Settings.from_env())) as url:
        yield url


def run_job(hydra: HydraClient, body: dict[str, Any]) -> tuple[JobResult, JobStatus]:
    """Submit, wait until it succeeded (asserted): its result and final status."""
    job = hydra.submit(body)
    final = hydra.wait(job.id, poll_s=0.05)
    assert final.status == "succeeded", final.error
    return hydra.result(job.id), final


def shown(value: float | None, digits: int = 3) -> str:
    """A number as the job page writes it (its `num` macro): fixed digits, a dash for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def _miss_cells(miss: EstimateMiss, per_position: bool) -> str:
    position = f"<td>{miss.position}</td>" if per_position else ""
    return (
        f"</th><td>{miss.index}</td>{position}<td>{html.escape(miss.component)}</td><td>{shown(miss.exact)}</td>"
        f"<td>{shown(miss.estimate)}</td><td>{shown(miss.error)}</td></tr>"
    )


def assert_estimates_on_page(page: str, result: JobResult, unit: str) -> str:
    """The job page's estimates section (final-position, patching and per-position jobs alike) carries the result's
    own numbers: per method every agreement statistic and its cost beside the exact engine's, and its largest misses
    with their exact and estimated values. `unit`: what the per-row statistics are taken within. Returns the section
    (whitespace runs as one space) for the caller's own checks."""
    block = result.patching.attribution if result.patching is not None else result.summary.attribution
    assert block is not None
    assert 'id="estimates"' in page, "no estimates section on the job page"
    section = page[page.index('id="estimates"') :]
    section = re.sub(r">\s+<", "><", re.sub(r"\s+", " ", section[: section.index("</section>")]))
    assert f"ρ per {unit}, mean (median)" in section
    costs = {c.method: c for c in block.cost}
    exact = costs["exact"]
    assert (
        f"The exact engine: {shown(exact.model_evaluations, 1)} model evaluations, {shown(exact.seconds, 4)} s"
        in section
    )
    for a in block.agreement:
        row = section[section.index(f'data-method="{a.method}"') :]
        cells = re.findall(r"<td>(.*?)</td>", row[: row.index("</tr>")])
        cost = costs[a.method]
        assert cells[1:] == [
            f"{shown(a.spearman_per_prompt_mean, 2)} ({shown(a.spearman_per_prompt_median, 2)})",
            shown(a.spearman_pooled, 2),
            shown(a.spearman_of_means, 2),
            shown(a.recall_at_k_per_prompt_mean, 2),
            shown(a.recall_at_k_of_means, 2),
            shown(a.mean_abs_error),
            shown(cost.model_evaluations, 1),
            shown(cost.seconds, 4),
            "–" if cost.speedup is None else f"{cost.speedup:.1f}×",
        ], a.method
        assert cells[0] in ("total effect", "|total effect|", "effect of the patch", "|effect of the patch|")
        for miss in a.largest_misses[:3]:  # the page shows the largest few of each method, largest first
            assert _miss_cells(miss, a.n_pairs is not None) in section, (a.method, miss)
    _assert_errors_on_page(section, block)
    return section


def by_error(block: AttributionSummary) -> dict[str, list[EstimateError]]:
    """Per method (the result's order), its components' errors, the largest |mean error| first (a stable sort: ties
    keep the result's component order)."""
    methods: dict[str, list[EstimateError]] = {}
    for e in block.errors:
        methods.setdefault(e.method, []).append(e)
    return {m: sorted(rows, key=lambda e: abs(e.error_mean), reverse=True) for m, rows in methods.items()}


def _error_cells(e: EstimateError) -> list[str]:
    fit = e.error_vs_ce
    slope = shown(fit.slope, 2)
    if fit.slope_ci_low is not None and fit.slope_ci_high is not None:
        slope += f" [{shown(fit.slope_ci_low, 2)}, {shown(fit.slope_ci_high, 2)}]"
    return [html.escape(e.component), shown(e.error_mean), shown(e.abs_error_mean), shown(e.total_effect_mean),
            shown(e.compensatory_effect_mean), shown(e.norm_response_mean), slope, shown(e.error_ce_correlation, 2)]


def _assert_errors_on_page(section: str, block: AttributionSummary) -> None:
    """The table of how much of each method's miss is compensation: per method the 10 components with the largest
    |mean error|, each row the result's own numbers; none where the result has no errors (patching jobs)."""
    if not block.errors:
        assert 'id="estimates-errors"' not in section and "How much of the miss" not in section
        return
    assert "How much of the miss is compensation" in section
    assert "A slope of 1 means the miss is the compensation" in section and "bootstrap interval (95%" in section
    table = section[section.index('id="estimates-errors"') :]
    for method, rows in by_error(block).items():
        shown_rows = re.findall(rf'<tr data-error-method="{method}" data-component="[^"]*">(.*?)</tr>', table)
        assert len(shown_rows) == min(10, len(rows)), method
        for e, row in zip(rows, shown_rows, strict=False):  # largest |mean error| first
            assert re.findall(r"<td>(.*?)</td>", row) == _error_cells(e), (method, e.component)
        assert f"largest |mean error| per method (of {len(rows)};" in table


def _cli_number(value: float | None, width: int, digits: int = 3, signed: bool = True) -> str:
    """A number as `hydra-ablate result` writes it in the error table: the most decimals (up to `digits`) that fit
    `width` characters, a dash for none."""
    if value is None:
        return "—"
    fits = [text for places in range(digits, -1, -1)
            if len(text := f"{value:{'+' if signed else ''}.{places}f}") <= width]
    return fits[0] if fits else f"{value:{'+' if signed else ''}.0e}"


def assert_errors_in_lines(lines: list[str], block: AttributionSummary, unit: str = "prompt") -> None:
    """`hydra-ablate result`'s table of how much of the miss is compensation: per method the 5 components with the
    largest |mean error|, each a line of the result's own numbers (split on spaces), within 80 columns; nothing for a
    result without errors (patching jobs)."""
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    if not block.errors:
        assert not any("how much of the miss" in line for line in lines)
        return
    text = "\n".join(lines)
    assert "how much of the miss is compensation (error = estimate − exact, on CE across" in text
    assert f"  {unit}s; slope 1: the miss is the compensation, 0: it does not go with it):" in text
    for method, rows in by_error(block).items():
        label = f"  {method}: {min(5, len(rows))} of {len(rows)} components, largest |mean error| first"
        at = lines.index(label)
        assert lines[at + 1].split() == ["component", "error", "|error|", "TE", "CE", "norm", "slope", "95%",
                                         "bootstrap", "r"]
        for offset, e in enumerate(rows[:5], start=2):
            fit = e.error_vs_ce
            interval = ("—" if fit.slope_ci_low is None or fit.slope_ci_high is None
                        else f"[{_cli_number(fit.slope_ci_low, 5, 2)},{_cli_number(fit.slope_ci_high, 5, 2)}]")
            assert lines[at + offset].split() == [
                e.component, _cli_number(e.error_mean, 6), _cli_number(e.abs_error_mean, 6, signed=False),
                _cli_number(e.total_effect_mean, 6), _cli_number(e.compensatory_effect_mean, 6),
                _cli_number(e.norm_response_mean, 6), _cli_number(fit.slope, 5, 2), interval,
                _cli_number(e.error_ce_correlation, 5, 2),
            ], (method, e.component)
