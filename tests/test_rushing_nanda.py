"""Rushing & Nanda's protocol in the per-position summary (worker/position_summary.py), against a hand computation.

The hand computation reads a tiny GPT-2 job's stored per-position measures (decoded here with numpy.frombuffer; the
engine behind them is checked against the brute-force oracle in test_position_oracle.py) and applies their rules
with plain Python: keep each head's int(2% × pairs) pairs with the largest clean write onto the next token (their
"direct effect", our unembed_effect), self-repair = DE − TE, LayerNorm share = clip(norm part / direct effect, 0, 1)
per pair, averaged; intervals from document resamples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from hydra_ablate_client.wire import PromptResult, SelfRepair
from tests.checks import present
from tests.engine_fixtures import tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.tiny_models import load_tokenizer
from worker.engine.position_sweep import run_position_sweep
from worker.engine.types import SweepInputs, SweepSpec
from worker.fit_statistics import percentile_interval
from worker.job_runner import position_prompt_result
from worker.model_cache import LoadedModel
from worker.model_sources import ModelSource
from worker.position_summary import share_of_direct, summarise_positions, top_count, top_pairs

TEXTS = (
    "The quick brown fox jumps over the lazy dog near the river",
    "Paris is the capital of France and Berlin is the capital of",
    "Water boils at one hundred degrees Celsius at sea level today",
    "One two three four five six seven eight nine ten eleven",
    "She opened the door and saw that the garden was full of",
    "In the morning the market sells bread, cheese and fresh fish",
    "The committee will meet again next week to discuss the budget",
    "A small boat drifted slowly across the quiet lake at dawn",
    "He wrote three letters to his brother during the long winter",
    "Most birds build their nests in spring when the days grow",
    "The train to the coast leaves every hour from platform nine",
    "Our teacher asked us to read the first chapter before Monday",
)
HEADS = tuple(f"head.{layer}.{head}" for layer in range(2) for head in range(4))


def test_selection_and_share_rules_by_hand() -> None:
    assert [top_count(n) for n in (10, 49, 50, 132, 1000)] == [1, 1, 1, 2, 20]  # int(), at least one
    unembed = np.array([0.5, 2.0, -1.0, 2.0, 0.1, 3.0])
    assert top_pairs(unembed, 0.5).tolist() == [5, 1, 3]  # largest first; the tie keeps the earlier pair
    shares = share_of_direct(np.array([0.3, 3.0, -0.2, 0.0, 1.0, -1.0]), np.array([2.0, 2.0, 2.0, 0.0, 0.0, 0.0]))
    assert shares[:3].tolist() == [0.15, 1.0, 0.0]  # clipped to [0, 1]
    assert math.isnan(shares[3]) and shares[4] == 1.0 and shares[5] == 0.0  # 0/0 NaN; ±x/0 = ±inf, clipped


@pytest.fixture(scope="module")
def job(tiny_models) -> dict[str, Any]:  # noqa: F811
    """The rushing_nanda setup on a tiny GPT-2 (LayerNorm, as their GPT-2): every head of two layers resample
    ablated at every position, centred logit of the next token, head basis; the stored prompts and their summary."""
    model = tiny_models("gpt2")
    tokenizer = load_tokenizer()
    ids = [np.asarray(tokenizer(t, add_special_tokens=False).input_ids[:12]) for t in TEXTS]
    import torch

    inputs = SweepInputs(token_ids=[torch.tensor(i, dtype=torch.long) for i in ids])
    spec = SweepSpec(components=HEADS, ablation="resample", positions="all", metric="centered_logit",
                     norm_scale="clean", resample_samples=1, resample_from="random", seed=3,
                     measure_positions="all", target="next_token", response_basis="heads")
    sweep = run_position_sweep(model, spec, inputs)
    loaded = LoadedModel(source=ModelSource(id="tiny-gpt2", location="tiny"), model=model, tokenizer=tokenizer,
                         revision=None, file_sha256=None)
    prompts = [position_prompt_result(loaded, i, TEXTS[i], m, 1e-4, sweep.response_basis, False)
               for i, m in enumerate(sweep.prompts)]
    summary = summarise_positions(list(sweep.components), sweep.response_basis, prompts, 1e-4, seed=9)
    return {"summary": summary, "prompts": prompts}


def _pairs(prompts: list[PromptResult], c: int) -> list[dict[str, float]]:
    """Every (document, position) pair of component c with its stored measures (float32 arrays, (C, P))."""
    pairs = []
    for doc, prompt in enumerate(prompts):
        columns = present(prompt.positions)
        stored = {name: np.frombuffer(getattr(columns, name), dtype="<f4").reshape(len(HEADS), -1)
                  for name in ("unembed_effect", "total_effect", "direct_effect", "response_heads", "response_mlps",
                               "norm_response")}
        for p in range(len(columns.positions)):
            pairs.append({
                "doc": doc, "unembed": float(stored["unembed_effect"][c, p]), "te": float(stored["total_effect"][c, p]),
                "de": float(stored["direct_effect"][c, p]), "heads": float(stored["response_heads"][c, p]),
                "mlps": float(stored["response_mlps"][c, p]), "norm": float(stored["norm_response"][c, p]),
            })
    return pairs


def _clip_share(part: float, direct: float) -> float:
    return min(1.0, max(0.0, part / direct))


def test_self_repair_follows_their_protocol(job: dict[str, Any]) -> None:
    summary, prompts = job["summary"], job["prompts"]
    n_pairs = sum(len(present(p.positions).positions) for p in prompts)
    assert summary.n_pairs == n_pairs and n_pairs >= 100
    kept = int(0.02 * n_pairs)
    assert kept >= 2 and kept < math.ceil(0.02 * n_pairs)  # rounding down, as they do, is visible here
    by_de_differs = False
    for c, name in enumerate(HEADS):
        repair: SelfRepair = present(summary.self_repair)[c]
        pairs = _pairs(prompts, c)
        top = sorted(pairs, key=lambda q: -q["unembed"])[:kept]  # their topk of the head's direct effect
        by_de = sorted(pairs, key=lambda q: -q["de"])[:kept]
        by_de_differs |= {id(q) for q in top} != {id(q) for q in by_de}
        assert (repair.component, repair.kind, repair.layer, repair.n_pairs) == (name, "head", int(name[5]), kept)
        assert repair.unembed_effect_threshold == pytest.approx(min(q["unembed"] for q in top), abs=1e-5)
        assert repair.unembed_effect_mean == pytest.approx(sum(q["unembed"] for q in top) / kept, abs=1e-5)
        repairs = [q["de"] - q["te"] for q in top]  # their Δlogit − Δ(direct effect), in our signs
        assert repair.self_repair_mean == pytest.approx(sum(repairs) / kept, abs=1e-5)
        assert repair.direct_effect_mean == pytest.approx(sum(q["de"] for q in top) / kept, abs=1e-5)
        for field, part in (("norm", "norm"), ("heads", "heads"), ("mlps", "mlps")):
            assert getattr(repair, f"{field}_mean") == pytest.approx(sum(q[part] for q in top) / kept, abs=1e-5)
            # Their share: of the head's direct effect (not of the self-repair), clipped per pair, then averaged.
            share = sum(_clip_share(q[part], q["unembed"]) for q in top) / kept
            assert getattr(repair, f"{field}_share") == pytest.approx(share, abs=1e-4)
        assert repair.self_repair_share == pytest.approx(
            sum(_clip_share(r, q["unembed"]) for r, q in zip(repairs, top, strict=True)) / kept, abs=1e-4
        )
        un_mean = sum(q["unembed"] for q in top) / kept
        assert repair.norm_of_direct == pytest.approx(sum(q["norm"] for q in top) / kept / un_mean, abs=1e-4)
        assert repair.self_repair_fraction == pytest.approx(sum(repairs) / kept / un_mean, abs=1e-4)
        over = sum(1 for r, q in zip(repairs, top, strict=True) if r > q["unembed"]) / kept
        assert repair.over_correction_share == pytest.approx(over, abs=1e-12)
    assert by_de_differs  # selecting by the ablation's DE would have kept other pairs on this model


def test_intervals_resample_documents_and_the_layer_trend_uses_the_same_resamples(job: dict[str, Any]) -> None:
    summary, prompts = job["summary"], job["prompts"]
    n_docs = len(prompts)
    kept = int(0.02 * summary.n_pairs)
    picks = np.random.default_rng(9).integers(0, n_docs, size=(1000, n_docs))  # the summary's seed
    resampled: dict[str, list[float]] = {}
    for c, name in enumerate(HEADS):
        top = sorted(_pairs(prompts, c), key=lambda q: -q["unembed"])[:kept]
        means, fractions = [], []
        for row in picks:
            chosen = [q for doc in row for q in top if q["doc"] == doc]
            repaired = sum(q["de"] - q["te"] for q in chosen)
            means.append(repaired / len(chosen) if chosen else math.nan)
            fractions.append(repaired / sum(q["unembed"] for q in chosen) if chosen else math.nan)
        resampled[name] = means
        repair = present(summary.self_repair)[c]
        low, high = present(percentile_interval(np.array(means)))
        assert (repair.self_repair_ci_low, repair.self_repair_ci_high) == pytest.approx((low, high), abs=1e-4)
        low, high = present(percentile_interval(np.array(fractions)))  # ratio of the resample's means
        assert (repair.self_repair_fraction_ci_low, repair.self_repair_fraction_ci_high) == pytest.approx(
            (low, high), abs=1e-3
        )
    layers = present(summary.self_repair_layers)
    assert [(t.kind, t.layer, t.n_components) for t in layers] == [("head", 0, 4), ("head", 1, 4)]
    for trend in layers:
        members = [i for i, name in enumerate(HEADS) if name.startswith(f"head.{trend.layer}.")]
        assert trend.self_repair_mean == pytest.approx(
            np.mean([present(summary.self_repair)[i].self_repair_mean for i in members]), abs=1e-12
        )
        layer_means = np.mean([resampled[HEADS[i]] for i in members], axis=0)
        assert (trend.ci_low, trend.ci_high) == pytest.approx(present(percentile_interval(layer_means)), abs=1e-4)
    assert present(summary.resampling).unit == "document" and present(summary.resampling).n_units == n_docs
