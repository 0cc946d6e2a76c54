"""Ablation efficacy: `ablated_unembed_effect` (Δ̃unembed(k, k)) against the oracle, the summary's removed share and
weak-ablation flag against values computed here, and `resample_sources: "different_target"` (no drawn source
predicts the prompt's target; a clear failure when a prompt has too few such sources; refusals at submission).

The per-architecture engine-vs-oracle checks of the field itself are in tests/test_engine_oracle.py and
tests/test_position_oracle.py (every case compares it); here: the identity with Δunembed − DE, and the options.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from litestar.testing import TestClient

from hydra_ablate_client.wire import JobRequest, ModelInfo
from service.api.app import create_app
from service.core.errors import ValidationProblem
from service.core.resolve import resolve
from service.core.settings import Settings
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import locate_parts, oracle_sweep, run_model
from tests.test_stack_e2e import wait_terminal
from worker.engine.errors import InputError
from worker.engine.replacements import resample_sources_different_target
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepResult, SweepSpec
from worker.summary import EFFICACY_MIN_UNEMBED, EFFICACY_THRESHOLD, efficacy, summarise

ATOL = 1e-4
COMPONENTS = ("attn.0", "mlp.0", "head.1.2", "attn.2", "mlp.2")
SMOLLM = ModelInfo(
    id="smollm2-135m", architecture="llama", n_layers=30, n_heads=9, n_kv_heads=3, d_model=576,
    vocab_size=49152, parallel_blocks=False, source="builtin",
)


def _clean_tops(model: torch.nn.Module, token_ids: list[torch.Tensor]) -> list[int]:
    """Each prompt's clean top token, from a plain forward pass (the oracle's, not the engine's)."""
    parts = locate_parts(model)
    return [int(run_model(model, parts, ids).logits.argmax()) for ids in token_ids]


# --------------------------------------------------------------------------------------------------------------------
# Δ̃unembed(k, k)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_ablated_unembed_effect_is_unembed_less_direct_and_matches_the_oracle(
    tiny_models, prompt_set: PromptSet, arch: str  # noqa: F811
) -> None:
    """Per prompt and per patch, the engine's Δ̃unembed(k, k) agrees with the oracle's read-off of each ablated run,
    and equals Δunembed − DE (the replacement's own write); zero ablation leaves exactly nothing."""
    model = tiny_models(arch)
    inputs = SweepInputs(token_ids=list(prompt_set.token_ids))
    spec = SweepSpec(components=COMPONENTS, ablation="resample", resample_samples=2, resample_from="random", seed=2,
                     keep_samples=True, metric="centered_logit")
    engine = run_sweep(model, spec, inputs)
    oracle = oracle_sweep(model, spec, inputs, sources=[list(p.sources) for p in engine.prompts])
    for e, o in zip(engine.prompts, oracle.prompts, strict=True):
        for k in range(len(COMPONENTS)):
            assert abs(e.ablated_unembed_effect[k] - o.ablated_unembed_effect[k]) <= ATOL * (1 + abs(o.clean_metric))
            assert abs(e.ablated_unembed_effect[k] - (e.unembed_effect[k] - e.direct_effect[k])) <= 1e-6
            assert e.samples is not None and o.samples is not None
            for ep, op in zip(e.samples[k], o.samples[k], strict=True):
                assert abs(ep.ablated_unembed_effect - op.ablated_unembed_effect) <= ATOL * (1 + abs(o.clean_metric))
            mean = np.mean([s.ablated_unembed_effect for s in e.samples[k]])
            assert abs(mean - e.ablated_unembed_effect[k]) <= 1e-6
    zero = run_sweep(model, SweepSpec(components=COMPONENTS, ablation="zero"), inputs)
    assert all(abs(v) <= 1e-6 for p in zero.prompts for v in p.ablated_unembed_effect)


# --------------------------------------------------------------------------------------------------------------------
# The summary's removed share and flag
# --------------------------------------------------------------------------------------------------------------------


def test_efficacy_against_hand_values() -> None:
    strong = efficacy(np.array([0.1, 0.3]), 2.0)  # removed 1 − 0.2 / 2 = 0.9
    assert strong.ablated_mean == pytest.approx(0.2) and strong.removed_share == pytest.approx(0.9)
    assert strong.ablated_se == pytest.approx(np.std([0.1, 0.3], ddof=1) / np.sqrt(2))
    assert strong.weak is False
    weak = efficacy(np.array([1.8, 1.9, 1.85]), 3.23)  # keeps 1.85 of 3.23: removed 0.427
    assert weak.removed_share == pytest.approx(1 - 1.85 / 3.23) and weak.weak is True
    assert EFFICACY_THRESHOLD == 0.5
    edge = efficacy(np.array([0.5]), 1.0)  # exactly the threshold: not below it
    assert edge.removed_share == pytest.approx(0.5) and edge.weak is False
    tiny = efficacy(np.array([0.0001]), EFFICACY_MIN_UNEMBED / 2)
    assert tiny.ablated_mean == pytest.approx(0.0001) and tiny.removed_share is None and tiny.weak is None
    noisy = efficacy(np.array([0.3, 0.1]), 0.2, unembed_se=0.15)  # mean Δunembed within 2 SE of 0: no ratio
    assert noisy.removed_share is None and noisy.weak is None
    clear = efficacy(np.array([0.3, 0.1]), 0.31, unembed_se=0.15)  # 0.31 ≥ 2 × 0.15
    assert clear.removed_share == pytest.approx(1 - 0.2 / 0.31) and clear.weak is True
    assert efficacy(None, 1.0).ablated_mean is None


def test_summary_reports_the_removed_share_of_each_component(tiny_models, prompt_set: PromptSet) -> None:  # noqa: F811
    model = tiny_models("llama")
    spec = SweepSpec(components=COMPONENTS, ablation="resample", resample_samples=2, resample_from="random", seed=1)
    result = run_sweep(model, spec, SweepInputs(token_ids=list(prompt_set.token_ids)))
    summary = summarise(result, 1e-4)
    assert summary.efficacy_threshold == EFFICACY_THRESHOLD
    for c, component in enumerate(summary.components):
        own = np.array([p.ablated_unembed_effect[c] for p in result.prompts])
        unembed = np.array([p.unembed_effect[c] for p in result.prompts])
        assert component.ablated_unembed_effect_mean == pytest.approx(own.mean())
        se = unembed.std(ddof=1) / np.sqrt(len(unembed))
        if abs(unembed.mean()) >= max(EFFICACY_MIN_UNEMBED, 2 * se):
            share = 1 - own.mean() / unembed.mean()
            assert component.unembed_removed_share == pytest.approx(share)
            assert component.weak_ablation is bool(share < EFFICACY_THRESHOLD)
    # Results from before the field existed summarise with nulls, not errors.
    old = SweepResult(result.components, result.response_basis, [
        type(p)(**{**p.__dict__, "ablated_unembed_effect": []}) for p in result.prompts
    ])
    assert all(c.unembed_removed_share is None for c in summarise(old, 1e-4).components)


# --------------------------------------------------------------------------------------------------------------------
# resample_sources: "different_target"
# --------------------------------------------------------------------------------------------------------------------


def test_different_target_draws_against_hand_cases() -> None:
    targets = [7, 7, 8, 9, 7]
    tops = [7, 7, 8, 9, 9]  # prompts 0, 1 predict 7
    nxt = resample_sources_different_target(2, "next", 0, targets, tops)
    assert nxt == [[2, 3], [2, 3], [3, 4], [0, 1], [2, 3]]
    drawn = resample_sources_different_target(2, "random", 3, targets, tops)
    for i, sources in enumerate(drawn):
        assert len(set(sources)) == 2 and i not in sources
        assert all(tops[s] != targets[i] for s in sources)
    tops = [7, 7, 8, 9, 5]
    grouped = resample_sources_different_target(1, "next", 0, targets, tops, groups=[0, 0, 0, 1, 1])
    assert grouped == [[2], [2], [0], [4], [3]]
    with pytest.raises(InputError, match=r"prompt 0 .* has only 1 prompt\(s\) of its relation"):
        resample_sources_different_target(2, "next", 0, targets, tops, groups=[0, 0, 0, 1, 1])


@pytest.mark.parametrize("given_targets", [False, True])
def test_no_drawn_source_shares_the_target(tiny_models, prompt_set: PromptSet, given_targets: bool) -> None:  # noqa: F811
    model = tiny_models("llama")
    # Repeated prompts share their clean top token: a plain draw would often pick a copy, this one never does.
    token_ids = list(prompt_set.token_ids) * 3
    tops = _clean_tops(model, token_ids)
    targets = list(prompt_set.target_ids) * 3 if given_targets else tops
    inputs = SweepInputs(token_ids=token_ids, target_ids=targets if given_targets else None)
    spec = SweepSpec(components=("attn.1",), ablation="resample", resample_samples=3, resample_from="random", seed=4,
                     resample_sources="different_target", source_seeds=2)
    result = run_sweep(model, spec, inputs)
    assert len(result.prompts) == len(token_ids)
    for p in result.prompts:
        assert len(p.sources) == 6 and p.target_id == targets[p.index]
        assert all(tops[s] != targets[p.index] for s in p.sources), (p.index, p.sources)
    plain = run_sweep(model, SweepSpec(**{**spec.__dict__, "resample_sources": "any"}), inputs)
    if not given_targets:  # copies of a prompt predict its target: the check above can fail
        assert any(tops[s] == targets[p.index] for p in plain.prompts for s in p.sources)
    # The measures on those sources are still the oracle's.
    oracle = oracle_sweep(model, spec, inputs, sources=[list(p.sources) for p in result.prompts])
    for e, o in zip(result.prompts, oracle.prompts, strict=True):
        assert abs(e.total_effect[0] - o.total_effect[0]) <= ATOL * (1 + abs(o.clean_metric))


def test_different_target_fails_clearly_without_enough_sources(tiny_models, prompt_set: PromptSet) -> None:  # noqa: F811
    model = tiny_models("llama")
    same = [prompt_set.token_ids[0]] * 3  # one prompt three times: every source predicts the same token
    spec = SweepSpec(components=("mlp.0",), ablation="resample", resample_samples=1,
                     resample_sources="different_target")
    with pytest.raises(InputError, match=r"resample_sources 'different_target': prompt 0 .* has only 0 prompt"):
        run_sweep(model, spec, SweepInputs(token_ids=same))


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"ablation": "zero"}, "only applies to ablation resample"),
        ({"measure_positions": "all", "positions": "all", "texts": ["a b c", "d e f"]}, "per-position"),
    ],
)
def test_different_target_is_refused_where_it_cannot_apply(fields: dict[str, Any], says: str) -> None:
    base: dict[str, Any] = {"prompts": ["a b", "c d", "e f"], "resample_sources": "different_target"}
    if "texts" in fields:
        base.pop("prompts")
    with pytest.raises(ValidationProblem, match=says) as refused:
        resolve(JobRequest(**{**base, **fields}), {"smollm2-135m": SMOLLM}, Settings())
    assert refused.value.field == "resample_sources"


def test_the_hydra_preset_keeps_random_sources() -> None:
    spec = resolve(JobRequest(preset="hydra", prompts=["a b", "c d", "e f"] * 6), {"smollm2-135m": SMOLLM},
                   Settings())
    assert spec.resample_sources == "any" and spec.resample_from == "random"
    chosen = resolve(JobRequest(preset="hydra", prompts=["a b", "c d", "e f"] * 6, resample_sources="different_target"),
                     {"smollm2-135m": SMOLLM}, Settings())
    assert chosen.resample_sources == "different_target"


# --------------------------------------------------------------------------------------------------------------------
# Through the service (real Redis, Celery worker, Litestar app; a chunked job)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def api(celery_worker: object, stack_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("HYDRA_CHUNK_PROMPTS", "4")  # several chunks: each draws the same sources
    with TestClient(create_app(stack_settings)) as client:
        yield client


def test_different_target_through_the_service(api: TestClient) -> None:
    prompts = ["The capital of France is", "Water boils at", "The river flows", "Seven"] * 2
    body: dict[str, Any] = {"model": "tiny-llama", "prompts": prompts, "components": ["attn.1"],
                            "resample_samples": 2, "resample_from": "random", "resample_sources": "different_target"}
    submitted = api.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    status = wait_terminal(api, submitted.json()["id"])
    assert status["status"] == "succeeded", status
    result = api.get(f"/v1/jobs/{submitted.json()['id']}/result").json()
    assert result["provenance"]["spec"]["resample_sources"] == "different_target"
    tops = {p["index"]: p["target_id"] for p in result["prompts"]}  # targets are the clean top tokens here
    for p in result["prompts"]:
        assert all(tops[s] != p["target_id"] for s in p["sources"]), p
        assert len(p["ablated_unembed_effect"]) == 1
    assert all(c["ablated_unembed_effect_mean"] is not None for c in result["summary"]["components"])
    # One prompt repeated: no source predicts another token, and the job fails saying so.
    failing = api.post("/v1/jobs", json={**body, "prompts": ["The capital of France is"] * 3})
    assert failing.status_code == 202, failing.text
    status = wait_terminal(api, failing.json()["id"])
    assert status["status"] == "failed" and "resample_sources 'different_target'" in status["error"], status
    refused = api.post("/v1/jobs", json={"model": "tiny-llama", "prompts": prompts, "ablation": "zero",
                                         "resample_sources": "different_target"})
    assert refused.status_code == 422 and refused.json()["field"] == "resample_sources", refused.text
