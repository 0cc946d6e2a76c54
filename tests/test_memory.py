"""Memory: the batch budget, halving a batch that runs out of memory, and failing with the reason when even one row
does not fit.

There is no GPU here, so the out-of-memory errors are injected: a wrapper around the engine's batch function
raises a real `torch.OutOfMemoryError` (what the CUDA allocator raises) whenever a batch holds more rows than a
pretend device could take, and otherwise runs the real batch. tests/test_gpu.py exercises the same path on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict

import pytest
import torch
from transformers import PreTrainedModel

from tests.engine_fixtures import prompt_set, tiny_model_dir, tiny_models  # noqa: F401 - fixtures
from tests.numbers import assert_same_numbers
from worker.engine import ablated_runs
from worker.engine.architecture import describe
from worker.engine.memory import (
    DEFAULT_BATCH_TOKENS,
    BatchBudget,
    BatchDoesNotFit,
    bytes_per_row_token,
    device_batch_tokens,
)
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

SPEC = SweepSpec(components=("attn.0", "mlp.1", "head.1.2", "attn.2", "mlp.2"), resample_samples=2)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PretendDevice:
    """Runs the real batch function, but raises torch.OutOfMemoryError for batches over `max_rows` rows."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.real = ablated_runs.run_ablated_rows
        self.attempted: list[int] = []
        self.ran: list[int] = []

    def __call__(self, arch, runs, batch, all_positions, keep_head_in=False):  # the engine function's signature
        self.attempted.append(len(batch))
        if len(batch) > self.max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {len(batch)} rows > {self.max_rows})")
        self.ran.append(len(batch))
        return self.real(arch, runs, batch, all_positions, keep_head_in)


@pytest.mark.parametrize("positions", ["final", "all"])
def test_a_batch_that_runs_out_of_memory_is_halved_and_the_numbers_do_not_change(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: object, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    positions: str,
) -> None:
    model = tiny_models("llama")
    spec = SweepSpec(**{**asdict(SPEC), "components": SPEC.components, "positions": positions})
    inputs = SweepInputs(token_ids=prompt_set.token_ids)  # type: ignore[attr-defined]
    reference = run_sweep(model, spec, inputs)

    device = PretendDevice(max_rows=3)
    monkeypatch.setattr(ablated_runs, "run_ablated_rows", device)
    halved = run_sweep(model, spec, inputs)

    assert max(device.attempted) > 3, "the first batches must be too big for the pretend device"
    assert device.ran and max(device.ran) <= 3
    # Once halved, the smaller budget holds for the rest of the sweep: at most a few failed attempts in all.
    assert len(device.attempted) - len(device.ran) <= 4
    assert_same_numbers([asdict(p) for p in halved.prompts], [asdict(p) for p in reference.prompts])


def test_a_row_that_does_not_fit_alone_fails_with_the_reason(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: object, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    monkeypatch.setattr(ablated_runs, "run_ablated_rows", PretendDevice(max_rows=0))
    with pytest.raises(BatchDoesNotFit, match="ran out of memory even alone"):
        run_sweep(tiny_models("llama"), SPEC, SweepInputs(token_ids=prompt_set.token_ids))  # type: ignore[attr-defined]


def test_halving_keeps_whole_rows_and_stops_at_one() -> None:
    budget = BatchBudget(tokens=1000)
    budget.halve(per_row=10, rows=10, error=torch.OutOfMemoryError("x"))  # a 10-row batch failed
    assert budget.tokens == 50 and budget.halvings == 1
    budget.halve(per_row=10, rows=5, error=torch.OutOfMemoryError("x"))
    budget.halve(per_row=10, rows=2, error=torch.OutOfMemoryError("x"))
    assert budget.tokens == 10  # 5 rows → 2 rows → 1 row
    with pytest.raises(BatchDoesNotFit, match="even alone"):
        budget.halve(per_row=10, rows=1, error=torch.OutOfMemoryError("x"))


def test_the_budget_follows_the_model_shape(tiny_models: Callable[[str], PreTrainedModel]) -> None:  # noqa: F811
    """Bigger models, longer prompts and wider dtypes cost more per row-token; a CPU keeps the fixed default."""
    llama, gpt2 = describe(tiny_models("llama")), describe(tiny_models("gpt2"))
    half = bytes_per_row_token(llama, torch.float16, 20, False)
    assert bytes_per_row_token(llama, torch.float32, 20, False) == 2 * half
    assert bytes_per_row_token(llama, torch.float32, 40, False) > bytes_per_row_token(llama, torch.float32, 20, False)
    assert bytes_per_row_token(gpt2, torch.float32, 20, True) > 0
    assert device_batch_tokens(llama, torch.device("cpu"), torch.float32, 20, False) == DEFAULT_BATCH_TOKENS
