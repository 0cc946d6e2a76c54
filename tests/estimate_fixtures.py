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
from hydra_ablate_client.wire import EstimateMiss, JobResult, JobStatus
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
    return section
