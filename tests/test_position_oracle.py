"""The per-position engine (worker/engine/position_sweep.py) against the brute-force oracle
(tests/oracle.py: `oracle_position_sweep`), on tiny random models of every architecture family.

Covered for every architecture (post-norm blocks and final-logit soft-capping included): resample (next and
random sources, several samples), mean (own prompts and a reference set) and zero ablation at every position;
measured at every position and at the final one; targets next_token, clean top token and given answers; metrics
logit, centered_logit and logprob; norm scale clean and ablated; layer and head response bases; layer and head
components; on the soft-capped model (Gemma 2) the TE read on the capped logits too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import oracle_position_sweep
from tests.tiny_models import TINY_ARCHS
from worker.engine.position_sweep import run_position_sweep
from worker.engine.replacements import resample_sources
from worker.engine.types import PositionSweepResult, SweepInputs, SweepSpec

ATOL = 1e-4
COMPONENTS = ("attn.0", "mlp.0", "head.0.1", "attn.1", "head.1.3", "mlp.1", "head.2.0", "mlp.2")
FIELDS = ("total_effect", "direct_effect", "unembed_effect", "compensation", "norm_response", "response",
          "ablated_unembed_effect")


@dataclass(frozen=True)
class Case:
    ablation: str
    metric: str
    norm_scale: str
    target: str
    measure_positions: str
    response_basis: str
    samples: int = 1
    resample_from: str = "next"
    given_targets: bool = False
    mean_reference: bool = False

    @property
    def id(self) -> str:
        return "-".join(
            [self.ablation, self.metric, self.norm_scale, self.target, self.measure_positions, self.response_basis]
            + ([f"{self.resample_from}{self.samples}"] if self.ablation == "resample" else [])
            + (["answers"] if self.given_targets else [])
            + (["meanref"] if self.mean_reference else [])
        )

    def spec(self) -> SweepSpec:
        return SweepSpec(
            components=COMPONENTS,
            ablation=self.ablation,  # type: ignore[arg-type]
            positions="all",
            metric=self.metric,  # type: ignore[arg-type]
            norm_scale=self.norm_scale,  # type: ignore[arg-type]
            resample_samples=self.samples,
            resample_from=self.resample_from,  # type: ignore[arg-type]
            seed=5,
            measure_positions=self.measure_positions,  # type: ignore[arg-type]
            target=self.target,  # type: ignore[arg-type]
            response_basis=self.response_basis,  # type: ignore[arg-type]
        )

    def inputs(self, ps: PromptSet) -> SweepInputs:
        return SweepInputs(
            token_ids=list(ps.token_ids),
            target_ids=list(ps.target_ids) if self.given_targets else None,
            mean_reference_ids=list(ps.mean_reference_ids) if self.mean_reference else None,
        )


CASES = (
    Case("resample", "logit", "clean", "next_token", "all", "heads"),
    Case("resample", "centered_logit", "ablated", "next_token", "all", "layers", resample_from="random", samples=2),
    Case("mean", "logit", "ablated", "clean_top", "all", "heads"),
    Case("mean", "logprob", "clean", "next_token", "final", "layers", mean_reference=True),
    Case("zero", "logprob", "ablated", "next_token", "all", "heads"),
    Case("zero", "centered_logit", "clean", "clean_top", "final", "heads", given_targets=True),
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_pairs_cover_every_case_and_every_architecture() -> None:
    assert {case.id for _, case in PAIRS} == {case.id for case in CASES}
    for arch in TINY_ARCHS:
        cases = [case for a, case in PAIRS if a == arch]
        assert {case.ablation for case in cases} == {"resample", "mean", "zero"}, arch
        assert {case.response_basis for case in cases} == {"heads", "layers"}, arch
    assert min(sum(case is c for _, case in PAIRS) for c in CASES) >= 8


def _disagreements(engine: PositionSweepResult, oracle: dict, atol: float, capped_model: bool) -> list[str]:
    bad = []
    assert engine.response_basis == oracle["response_basis"]
    for i, (e, o) in enumerate(zip(engine.prompts, oracle["prompts"], strict=True)):
        assert e.positions == o["positions"], (e.positions, o["positions"])
        assert e.target_ids.tolist() == o["target_ids"].tolist()
        assert e.sources == o["sources"]
        capped = e.capped_total_effect is not None
        assert capped == capped_model, "capped_total_effect is reported exactly for soft-capped models"
        for name in (*FIELDS, "clean_metric", "clean_direct_effect", *(("capped_total_effect",) if capped else ())):
            diff = (getattr(e, name).double() - o[name]).abs()
            if not bool(torch.isfinite(getattr(e, name)).all()) or float(diff.max()) > atol:
                bad.append(f"prompt {i} {name}: max |engine − oracle| = {float(diff.max()):.2e}")
    return bad


def _covering_pairs() -> list[tuple[str, Case]]:
    """Every architecture with the preset's case (resample, heads, next token), one zero case and one mean case, and
    the other resample case on every second. Each case thus runs on at least 8 architectures, each architecture on
    resample, mean and zero, heads and layers, all and final positions (the full product took 4.7 minutes of the
    suite for no case that the pairs miss: the engine's code paths differ by architecture or by case, not by both)."""
    pairs = []
    for k, arch in enumerate(TINY_ARCHS):
        chosen = [0, 4 + k % 2, *((3,) if k % 2 == 0 else (2, 1))]  # 3 and 1 are the layer-basis cases
        pairs += [(arch, CASES[i]) for i in chosen]
    return pairs


PAIRS = _covering_pairs()


@pytest.mark.parametrize(("arch", "case"), PAIRS, ids=[f"{arch}-{case.id}" for arch, case in PAIRS])
def test_per_position_measures_match_the_oracle(arch: str, case: Case, tiny_models, prompt_set) -> None:  # noqa: F811
    model = tiny_models(arch)
    spec, inputs = case.spec(), case.inputs(prompt_set)
    engine = run_position_sweep(model, spec, inputs, batch_tokens=64)  # small batches: several per prompt
    pairing = resample_sources(len(inputs.token_ids), case.samples, case.resample_from, 5)  # type: ignore[arg-type]
    oracle = oracle_position_sweep(model, spec, inputs, sources=pairing if case.ablation == "resample" else None)
    capped_model = getattr(model.config, "final_logit_softcapping", None) is not None
    bad = _disagreements(engine, oracle, ATOL, capped_model)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_split_closes_and_heads_add_up_to_their_layer(arch: str, tiny_models, prompt_set) -> None:  # noqa: F811
    """heads + MLPs + norm = compensation at every position; Σ_h response(head.L.h) = response(attn.L)."""
    model = tiny_models(arch)
    base = CASES[0].spec()
    inputs = CASES[0].inputs(prompt_set)
    heads = run_position_sweep(model, base, inputs)
    layers = run_position_sweep(model, SweepSpec(**{**base.__dict__, "response_basis": "layers"}), inputs)
    n_heads = model.config.num_attention_heads
    for h, lay in zip(heads.prompts, layers.prompts, strict=True):
        is_mlp = torch.tensor([name.startswith("mlp.") for name in heads.response_basis])
        head_part = h.response[:, ~is_mlp].sum(dim=1)
        mlp_part = h.response[:, is_mlp].sum(dim=1)
        torch.testing.assert_close(head_part + mlp_part + h.norm_response, h.compensation, atol=1e-6, rtol=0)
        torch.testing.assert_close(h.compensatory_effect + h.norm_response, h.compensation, atol=1e-6, rtol=0)
        per_layer_heads = h.response.unflatten(1, (-1, n_heads + 1))[:, :, :n_heads].sum(dim=2)  # (C, N, P)
        torch.testing.assert_close(per_layer_heads, lay.response[:, 0::2], atol=1e-5, rtol=0)
        torch.testing.assert_close(h.norm_response, lay.norm_response, atol=1e-5, rtol=0)
        assert float(h.response.abs().max()) > 0  # something responded: the check above is not vacuous


def test_post_norm_blocks_with_an_output_bias_refuse_the_head_basis_and_run_the_layer_basis(
    prompt_set: PromptSet,  # noqa: F811
) -> None:
    """OLMo 2 with attention_bias: no head basis (the post-norm rescales a bias that is no head's), refused with the
    reason; the layer basis and head components still match the oracle."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import load_tokenizer, make_config, randomize_

    config = make_config("olmo2", vocab_size=len(load_tokenizer()))
    config.attention_bias = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model, 3)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    case = Case("resample", "logit", "clean", "next_token", "all", "heads")
    inputs = case.inputs(prompt_set)
    inputs = SweepInputs(token_ids=inputs.token_ids[:3])
    with pytest.raises(ValueError, match="response_basis 'heads' is not defined"):
        run_position_sweep(model, case.spec(), inputs)
    spec = SweepSpec(**{**case.spec().__dict__, "response_basis": "layers"})
    engine = run_position_sweep(model, spec, inputs, batch_tokens=64)
    oracle = oracle_position_sweep(model, spec, inputs, sources=resample_sources(3, 1, "next", 5))
    bad = _disagreements(engine, oracle, ATOL, capped_model=False)
    assert not bad, "\n".join(bad)
