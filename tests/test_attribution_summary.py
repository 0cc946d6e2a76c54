"""The agreement summary of attribution patching (worker/attribution_summary.py): ranks, Spearman, top-k recall,
misses, the verification set, the Hydra link, and a whole summary of a real (tiny) job.

Ranks and ρ are checked against their definitions written out by brute force; the regression against data built
with a known slope.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
from torch import nn

from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from worker.attribution_summary import (
    Paired,
    agreement,
    average_ranks,
    hydra_link,
    pair,
    spearman,
    summarise_attribution,
    top_k,
    top_k_recall,
    verification_set,
)
from worker.engine.attribution import run_attribution
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec


def _brute_ranks(values: list[float]) -> list[float]:
    """Rank of each value: 1 + how many are smaller + half of how many others are equal (the tie average)."""
    return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def _brute_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.array(_brute_ranks(x)), np.array(_brute_ranks(y))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    return float((dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum()))


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_spearman_match_their_definitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=17).astype(float).tolist()  # many ties
    y = (np.asarray(x) * 0.5 + rng.normal(size=17)).round(1).tolist()
    assert average_ranks(x).tolist() == _brute_ranks(x)
    rho = spearman(x, y)
    assert rho is not None and rho == pytest.approx(_brute_spearman(x, y), abs=1e-12)


def test_spearman_edges() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 8, 27]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # no spread
    assert spearman([1], [2]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_top_k_and_recall() -> None:
    exact = [0.1, -5.0, 3.0, 0.0, 2.0]
    assert top_k(exact, 2) == [1, 2]  # by magnitude
    assert top_k([1.0, -1.0, 1.0], 2) == [0, 1]  # ties: lower index first
    assert top_k_recall(exact, [0.1, -5.0, 3.0, 0.0, 2.0], 3) == 1.0
    assert top_k_recall(exact, [9.0, 0.0, 3.0, 0.0, 0.0], 2) == 0.5  # finds 2, misses 1
    assert top_k_recall(exact, exact, 0) is None
    assert top_k_recall(exact, exact, 99) == 1.0  # k is capped at the number of components


def test_agreement_misses_and_scales() -> None:
    exact = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    estimate = np.array([[1.0, 2.0, 2.9], [3.0, 2.0, 5.0]])
    a = agreement("atp", "total_effect", exact, estimate, ["a", "b", "c"], [7, 9], k=1, n_misses=2)
    assert (a.n_prompts, a.n_components, a.k) == (2, 3, 1)
    assert [(m.index, m.component, m.exact, m.estimate, m.error) for m in a.largest_misses] == [
        (9, "c", 1.0, 5.0, 4.0), (7, "c", 3.0, 2.9, pytest.approx(-0.1))
    ]
    assert a.mean_abs_error == pytest.approx((0.1 + 4) / 6)
    assert a.spearman_per_prompt_mean == pytest.approx((1.0 - 0.5) / 2)  # ρ = 1 in prompt 7, −0.5 in prompt 9
    assert a.recall_at_k_per_prompt_mean == pytest.approx(0.5)  # prompt 7: c is top in both; prompt 9: a vs c
    with pytest.raises(ValueError):
        agreement("atp", "total_effect", exact, estimate[:, :2], ["a", "b"], [7, 9])


def test_verification_set_is_top_k_plus_a_seeded_sample() -> None:
    means = np.array([0.0, 9.0, -8.0, 0.1, 0.2, 0.3, 7.0, 0.0, 0.05, 0.0])
    chosen = verification_set(means, top=3, random=4, seed=1)
    assert {1, 2, 6} <= set(chosen) and len(chosen) == 7 and chosen == sorted(chosen)
    assert verification_set(means, top=3, random=4, seed=1) == chosen  # reproducible
    draws = {tuple(verification_set(means, top=3, random=4, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the sample depends on the seed
    assert verification_set(means, top=3, random=100, seed=0) == list(range(10))  # capped at the rest


def test_hydra_link_recovers_a_known_slope() -> None:
    rng = np.random.default_rng(0)
    prompts, components = 200, 2
    te = rng.normal(size=(prompts, components))
    ce = rng.normal(size=(prompts, components))
    estimate = te + 0.7 * ce + 0.01 * rng.normal(size=(prompts, components))  # the miss is 70 % of CE
    paired = Paired(
        indices=list(range(prompts)), components=["attn.3", "head.1.0"], total_effect=te,
        abs_total_effect=np.abs(te), compensatory_effect=ce, norm_response=np.zeros_like(te),
        estimates={"atp": estimate}, compared_with={"atp": "total_effect"},
    )
    rows = hydra_link(paired, "atp", seed=0)
    for row in rows:
        assert row.error_vs_ce.slope == pytest.approx(0.7, abs=0.01)
        assert row.error_vs_ce.slope_ci_low is not None and row.error_vs_ce.slope_ci_low < 0.7
        assert row.error_vs_ce.excludes_zero and row.error_vs_ce.excludes_one
        assert row.error_ce_correlation is not None and row.error_ce_correlation > 0.99


def test_summary_of_a_real_job(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """A sweep and its estimates on the same job: every method summarised, magnitudes against |TE| per run."""
    model = tiny_models("llama")
    components = (*(f"head.{layer}.{h}" for layer in range(3) for h in range(4)), "mlp.1", "attn.2")
    spec = SweepSpec(components=components, ablation="resample", resample_samples=2, keep_samples=True)
    inputs = SweepInputs(token_ids=prompt_set.token_ids)
    sweep = run_sweep(model, spec, inputs)
    estimates = run_attribution(model, spec, inputs)
    paired = pair(sweep, estimates)
    assert paired.components == list(components) and paired.indices == [0, 1, 2, 3]
    per_run = np.array([[np.mean([abs(s.total_effect) for s in runs]) for runs in p.samples or []]
                        for p in sweep.prompts])
    assert np.allclose(paired.abs_total_effect, per_run)
    assert (paired.abs_total_effect >= np.abs(paired.total_effect) - 1e-6).all()  # mean |TE| ≥ |mean TE|
    summary = summarise_attribution(sweep, estimates, exact_seconds_per_prompt=1.0, runs_per_component=2,
                                    noise_runs=2, k=3)
    assert [a.method for a in summary.agreement] == ["atp", "atp_qkfix", "atp_star"]
    assert [a.compared_with for a in summary.agreement] == ["total_effect", "total_effect", "abs_total_effect"]
    for a in summary.agreement:
        assert a.spearman_pooled is not None and -1.0 <= a.spearman_pooled <= 1.0
        assert a.recall_at_k_per_prompt_mean is not None and 0.0 <= a.recall_at_k_per_prompt_mean <= 1.0
        assert len(a.largest_misses) == 10
        errors = [abs(m.error) for m in a.largest_misses]
        assert all(big >= small for big, small in pairwise(errors))
    costs = {c.method: c for c in summary.cost}
    assert costs["exact"].model_evaluations == 1 + 2 + len(components) * 2
    assert costs["atp"].model_evaluations == 1 + 2 + 1  # clean, two noise runs, one backward pass
    assert costs["atp_star"].backward_passes > costs["atp"].backward_passes
    assert set(summary.hydra) == {"atp", "atp_qkfix", "atp_star"}
    assert [row.component for row in summary.hydra["atp"]] == list(components)
