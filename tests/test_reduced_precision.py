"""bfloat16 / float16 models: the engine runs in the model's dtype and stays within the documented tolerance of the
float32 oracle (docs/concepts/precision.md). Run on the CPU here; the same code path serves GPU workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.engine_fixtures import prompt_set, tiny_model_dir  # noqa: F401 - fixtures
from tests.oracle import oracle_sweep
from tests.tiny_models import load_tiny_model
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

# |engine(reduced) − oracle(float32)| ≤ tolerance × (1 + max |clean metric|), for TE and DE.
TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.005}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run no faster on two threads; one leaves the other core to the rest of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox_parallel"])
def test_reduced_precision_stays_within_documented_tolerance(
    arch: str, dtype: torch.dtype, tiny_model_dir: Callable[[str], Path], prompt_set: object  # noqa: F811
) -> None:
    path = tiny_model_dir(arch)
    spec = SweepSpec(components=("attn.0", "mlp.1", "head.1.2", "attn.2"), metric="logit")
    token_ids = prompt_set.token_ids  # type: ignore[attr-defined]
    reference = oracle_sweep(load_tiny_model(path), spec, SweepInputs(token_ids=token_ids))
    targets = [p.target_id for p in reference.prompts]
    # transformers wraps `to` with functools.wraps: mypy takes the first argument for self
    model = load_tiny_model(path).to(dtype)  # type: ignore[arg-type]
    reduced = run_sweep(model, spec, SweepInputs(token_ids=token_ids, target_ids=targets))

    scale = 1 + max(abs(p.clean_metric) for p in reference.prompts)
    for field in ("total_effect", "direct_effect"):
        got = torch.tensor([getattr(p, field) for p in reduced.prompts])
        want = torch.tensor([getattr(p, field) for p in reference.prompts])
        assert (got - want).abs().max() <= TOLERANCE[dtype] * scale, field
    for p in reduced.prompts:
        closing = torch.tensor(p.response).sum(dim=1) + torch.tensor(p.norm_response)
        assert torch.allclose(torch.tensor(p.compensation), closing, atol=1e-4)
