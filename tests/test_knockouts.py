"""Joint knockouts (SweepSpec.knockouts, worker/engine/sweep.py) against the brute-force oracle
(tests/knockout_oracle.py) on a tiny model of every architecture family, and the refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.knockout_oracle import oracle_knockout
from tests.tiny_models import TINY_ARCHS
from worker.engine.architecture import describe
from worker.engine.errors import InputError
from worker.engine.position_sweep import run_position_sweep
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

ATOL = 1e-4
PRE_NORM_SETS = (("attn.0", "head.2.1"), ("head.0.1", "head.1.2", "mlp.1"), ("mlp.0", "attn.2"))
# Post-norm blocks: member heads without an earlier member (the refused case is tested below).
POST_NORM_SETS = (("head.1.0", "head.1.2"), ("attn.0", "mlp.2"), ("head.0.3", "mlp.1", "attn.2"))
CASES = (("zero", "final", "clean"), ("resample", "all", "ablated"))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_knockouts_match_oracle(
    arch: str, tiny_models: Callable[[str], PreTrainedModel], prompt_set: PromptSet  # noqa: F811
) -> None:
    model = tiny_models(arch)
    sets = POST_NORM_SETS if describe(model).post_norm else PRE_NORM_SETS
    ids = prompt_set.token_ids[:2]
    targets = prompt_set.target_ids[:2]
    for ablation, positions, norm_scale in CASES:
        spec = SweepSpec(
            components=("mlp.1",), knockouts=sets, ablation=ablation, positions=positions,  # type: ignore[arg-type]
            norm_scale=norm_scale, metric="logit",  # type: ignore[arg-type]
        )
        result = run_sweep(model, spec, SweepInputs(token_ids=ids, target_ids=targets))
        assert result.components == ["mlp.1", *("+".join(s) for s in sets)]
        for i, prompt in enumerate(result.prompts):
            for k, members in enumerate(sets, start=1):
                expected = oracle_knockout(
                    model, ids[i], list(members), targets[i], ablation, positions, norm_scale,
                    source_ids=ids[1 - i] if ablation == "resample" else None,
                )
                where = f"{arch} {ablation}/{positions}/{norm_scale} prompt {i} {'+'.join(members)}"
                for field in ("total_effect", "direct_effect", "unembed_effect", "compensatory_effect",
                              "norm_response"):
                    got = getattr(prompt, field)[k]
                    assert got == pytest.approx(getattr(expected, field), abs=ATOL), f"{where}: {field}"
                worst = (torch.tensor(prompt.response[k]) - torch.tensor(expected.response)).abs().max().item()
                assert worst < ATOL, f"{where}: response off by {worst:.2e}"


def test_a_one_member_set_is_its_component(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: PromptSet  # noqa: F811
) -> None:
    model = tiny_models("qwen2")
    spec = SweepSpec(components=("head.1.2", "attn.0"), knockouts=(("head.1.2",), ("attn.0",)), ablation="zero")
    result = run_sweep(model, spec, SweepInputs(token_ids=prompt_set.token_ids[:1]))
    prompt = result.prompts[0]
    for single, joint in ((0, 2), (1, 3)):
        assert prompt.total_effect[joint] == pytest.approx(prompt.total_effect[single], abs=1e-6)
        assert prompt.direct_effect[joint] == pytest.approx(prompt.direct_effect[single], abs=1e-6)
        assert prompt.response[joint] == pytest.approx(prompt.response[single], abs=1e-6)


def test_knockout_refusals_say_what_to_change(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: PromptSet  # noqa: F811
) -> None:
    inputs = SweepInputs(token_ids=prompt_set.token_ids[:2])
    cases = [
        ("llama", (("head.0.1", "head.0.1"),), "names 'head.0.1' twice"),
        ("llama", (("attn.1", "head.7.0"),), "layer 7 out of range"),
        ("llama", (("attn.1", "head.1.0"),), "a head is part of attn.L"),
        ("llama", ((),), "is empty"),
        ("gemma3", (("mlp.0", "head.1.2"),), "cannot be separated"),
    ]
    for arch, knockouts, reason in cases:
        spec = SweepSpec(components=("mlp.0",), knockouts=knockouts, ablation="zero")
        with pytest.raises(InputError, match=reason):
            run_sweep(tiny_models(arch), spec, inputs)
    spec = SweepSpec(components=("mlp.0",), knockouts=(("mlp.0", "attn.1"),), ablation="zero", target="next_token",
                      positions="all")
    with pytest.raises(InputError, match="knockouts are measured at the final position"):
        run_position_sweep(tiny_models("llama"), spec, inputs)
