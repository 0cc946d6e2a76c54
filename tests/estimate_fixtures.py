"""What the tests of estimates jobs through the real stack share: the job, its prompts, the names they compare and
the live API (uvicorn on the session's Redis, beside the session's Celery worker).

Import the fixture explicitly in a test module (`from tests.estimate_fixtures import live_url`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobResult, JobStatus
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
