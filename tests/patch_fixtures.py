"""Fixtures and helpers the patching tests share, and with them the knockout and head-basis job tests' `live_url` and
`llama` (registered in tests/conftest.py as a pytest plugin).

`live_url`: the test stack's API (auth off) over real HTTP, one per module; `llama`: an independently loaded copy
of the stack's tiny Llama and its tokenizer, for the engine and the oracle; `tiny_ioi` and `wire_pairs`: IOI pairs
drawn on a tokenizer, and the same pairs as a job's `pairs`; `finished_job`: a job through the stack, waited for.
Nothing heavy is imported until a fixture runs: every test session loads this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from service.core.ioi_pairs import IoiPair, ioi_pairs

if TYPE_CHECKING:
    from hydra_ablate_client.wire import JobResult


@pytest.fixture(scope="module")
def live_url(celery_worker: object, stack_env: dict[str, str]) -> Iterator[str]:
    from service.api.app import create_app
    from service.core.settings import Settings
    from tests.live_server import serve

    with serve(create_app(Settings.from_env())) as url:
        yield url


@pytest.fixture(scope="module")
def llama(tiny_model_dirs: dict[str, str]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = tiny_model_dirs["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    return model, tokenizer


def tiny_ioi(tokenizer: Any, n: int, seed: int) -> list[IoiPair]:
    """n IOI pairs drawn with `seed` on this tokenizer (names that are one token on it)."""
    return ioi_pairs(n, seed, lambda text: tokenizer(text, add_special_tokens=False).input_ids)


def finished_job(live_url: str, body: dict[str, Any]) -> tuple[str, JobResult]:
    """A job on the tiny Llama (unless `body` names another model) submitted, waited for and read back: its id and
    result."""
    from hydra_ablate_client import HydraClient

    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", **body})
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        return job.id, hydra.result(job.id)


def wire_pairs(pairs: list[IoiPair]) -> list[dict[str, str]]:
    """The pairs as a patching job's `pairs`."""
    return [{"clean": p.clean, "corrupted": p.corrupted, "answer": p.answer, "counterfactual": p.counterfactual}
            for p in pairs]
