"""Every supported architecture family against the brute-force oracle, for the complete product of ablation ×
positions × metric × norm_scale, and the family-specific treatments (soft-capping, refusals).

tests/test_engine_oracle.py runs a covering set of richer cases (several resample sources, random pairings, given
targets, mean references, every layer and three heads) on every family; here every combination of the four main
options runs on every family, kept compact so that 16 families × 48 combinations stay affordable: an MLP and a head
(with the head's same-layer MLP downstream) of two prompts of 14 and 18 tokens, both longer than the sliding windows
of 6 keys and of different lengths, so windows, padding and the per-layer rotary tables are crossed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from hydra_ablate_client.vocabulary import AblationKind, MetricName, NormScaleMode, PositionScope
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import oracle_sweep
from tests.test_engine_oracle import ATOL, compare_results
from tests.tiny_models import TINY_ARCHS, build_refused_model, load_tiny_model
from worker.engine.architecture import FAMILY_NAMES, SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, check_supported
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

ABLATIONS: tuple[AblationKind, ...] = ("resample", "mean", "zero")
POSITIONS: tuple[PositionScope, ...] = ("final", "all")
METRICS: tuple[MetricName, ...] = ("logit", "centered_logit", "logprob", "logit_diff")
NORM_SCALES: tuple[NormScaleMode, ...] = ("clean", "ablated")
PRODUCT = tuple(itertools.product(ABLATIONS, POSITIONS, METRICS, NORM_SCALES))
COMPONENTS = ("mlp.0", "head.1.2")
PROMPTS = (1, 3)  # tests/engine_fixtures.PROMPTS: the two longer than the sliding window


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is as fast and leaves the other core to the rest of the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(ps: PromptSet, metric: str) -> SweepInputs:
    return SweepInputs(
        token_ids=[ps.token_ids[i] for i in PROMPTS],
        counterfactual_ids=[ps.counterfactual_ids[i] for i in PROMPTS] if metric == "logit_diff" else None,
    )


def test_every_supported_family_has_a_tiny_model() -> None:
    """No family is claimed without being proven here: each model_type of the engine's table has a tiny model."""
    from tests.tiny_models import make_config

    covered = {make_config(arch, vocab_size=128).model_type for arch in TINY_ARCHS}
    assert covered == set(SUPPORTED_ARCHITECTURES) == set(FAMILY_NAMES)
    assert len(covered) >= 12


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_option_combination_matches_the_oracle(tiny_models, prompt_set: PromptSet, arch: str) -> None:  # noqa: F811
    model = tiny_models(arch)
    failures: list[str] = []
    for ablation, positions, metric, norm_scale in PRODUCT:
        spec = SweepSpec(
            components=COMPONENTS, ablation=ablation, positions=positions, metric=metric, norm_scale=norm_scale
        )
        inputs = _inputs(prompt_set, metric)
        bad = compare_results(run_sweep(model, spec, inputs), oracle_sweep(model, spec, inputs), ATOL)
        if bad:
            failures.append(f"{ablation}/{positions}/{metric}/{norm_scale}: {len(bad)} disagreements, e.g. {bad[0]}")
    assert not failures, f"{arch}: {len(failures)} of {len(PRODUCT)} combinations disagree:\n" + "\n".join(failures)


@pytest.mark.parametrize("metric", METRICS)
def test_soft_capped_model_reports_both_total_effects(tiny_models, prompt_set: PromptSet, metric: MetricName) -> None:  # noqa: F811
    """Gemma 2 (final logits capped at 3 in the tiny model, so the cap bites): TE, DE and the decomposition are on
    the pre-cap logits and close exactly; `capped_total_effect` is the TE of the model's real output; both match the
    oracle (test above), and the two differ, so neither is silently the other."""
    model = tiny_models("gemma2")
    spec = SweepSpec(components=COMPONENTS, metric=metric)
    result = run_sweep(model, spec, _inputs(prompt_set, metric))
    differs = 0.0
    for p in result.prompts:
        assert p.capped_total_effect is not None
        for k in range(len(COMPONENTS)):
            assert abs(p.compensation[k] - (p.direct_effect[k] - p.total_effect[k])) <= ATOL
            assert abs(p.compensation[k] - (sum(p.response[k]) + p.norm_response[k])) <= ATOL
            differs = max(differs, abs(p.capped_total_effect[k] - p.total_effect[k]))
    if metric == "logprob":  # read on the model's own distribution in both cases
        assert differs <= 1e-6
    else:
        assert differs > 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "olmo2", "gemma3"])
def test_uncapped_models_report_no_capped_total_effect(tiny_models, prompt_set: PromptSet, arch: str) -> None:  # noqa: F811
    result = run_sweep(tiny_models(arch), SweepSpec(components=("mlp.0",)), _inputs(prompt_set, "logit"))
    assert all(p.capped_total_effect is None for p in result.prompts)


def test_what_cannot_be_decomposed_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Refused: a family with no residual stream summed by the readout, and bidirectional attention."""
    config = AutoConfig.from_pretrained(build_refused_model(tmp_path / "mamba"))
    with pytest.raises(UnsupportedArchitecture, match="cannot be decomposed: Mamba has no attention"):
        check_supported(config)
    from transformers import Gemma3TextConfig

    with pytest.raises(UnsupportedArchitecture, match="bidirectional attention"):
        check_supported(Gemma3TextConfig(use_bidirectional_attention=True))
    with pytest.raises(UnsupportedArchitecture, match=r"not supported; supported: .*gemma2"):
        check_supported(AutoConfig.for_model("bert"))


def test_soft_capped_model_loads_with_the_attention_it_needs(tiny_model_dir) -> None:  # noqa: F811
    """Gemma 2's attention-logit soft-capping is unsupported by SDPA: the worker's loader picks eager for it, and the
    engine then passes explicit causal masks (eager has no implicit one) — the oracle tests above prove the rest."""
    assert load_tiny_model(tiny_model_dir("gemma2")).config._attn_implementation == "eager"
    assert load_tiny_model(tiny_model_dir("llama")).config._attn_implementation == "sdpa"
