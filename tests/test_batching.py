"""Prompts of different lengths share batches at the final position (left-padded prefix caches, masks, per-row
position ids); the numbers must not depend on how the work was batched, and must match the oracle."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

from tests.engine_fixtures import prompt_set, tiny_model_dir, tiny_models  # noqa: F401 - fixtures
from tests.oracle import oracle_sweep
from worker.engine import sweep as sweep_module
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

FIELDS = ("total_effect", "direct_effect", "compensation", "norm_response", "response")


def _values(result: object, field: str) -> torch.Tensor:
    return torch.tensor([getattr(p, field) for p in result.prompts])  # type: ignore[attr-defined]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2", "gpt_neox_parallel"])
def test_batches_across_prompts_equal_one_prompt_at_a_time_and_the_oracle(
    arch: str, tiny_models: Callable[[str], PreTrainedModel], prompt_set: object, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    model = tiny_models(arch)
    token_ids = prompt_set.token_ids  # type: ignore[attr-defined]
    lengths = {int(ids.shape[0]) for ids in token_ids}
    assert len(lengths) == len(token_ids), "the prompts must differ in length for this test to mean anything"
    spec = SweepSpec(components=("attn.0", "mlp.1", "head.1.2", "attn.2", "mlp.2"), resample_samples=2)
    inputs = SweepInputs(token_ids=token_ids)

    groups: list[list[list[int]]] = []
    real_groups = sweep_module._prompt_groups

    def recording(*args: object, **kwargs: object) -> list[list[int]]:
        found = real_groups(*args, **kwargs)  # type: ignore[arg-type]
        groups.append(found)
        return found

    monkeypatch.setattr(sweep_module, "_prompt_groups", recording)
    together = run_sweep(model, spec, inputs)  # the default budget puts all four prompts in one batch
    alone = run_sweep(model, spec, inputs, batch_tokens=1)  # one row per batch
    assert groups[0] == [[0, 1, 2, 3]] and groups[1] == [[0], [1], [2], [3]]

    reference = oracle_sweep(model, spec, inputs, sources=[p.sources for p in together.prompts])
    for field in FIELDS:
        assert torch.allclose(_values(together, field), _values(alone, field), atol=1e-5), field
        assert torch.allclose(_values(together, field), _values(reference, field), atol=1e-4), field
