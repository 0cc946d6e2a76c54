"""Several independent draws of resample sources (`source_seeds`): the engine's per-draw measures against the
brute-force oracle run on each draw's sources, their average in the per-prompt lists, the refusals at submission,
and a job through the service whose summary's fits use the draws and resample by relation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from litestar.testing import TestClient

from hydra_ablate_client.wire import DatasetRef, JobRequest, ModelInfo
from service.api.app import create_app
from service.core import datasets
from service.core.errors import ValidationProblem
from service.core.resolve import ablation_count, resolve
from service.core.settings import Settings
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import locate_parts as oracle_parts
from tests.oracle import oracle_sweep, response_basis
from tests.test_stack_e2e import wait_terminal
from worker.engine.position_sweep import run_position_sweep
from worker.engine.replacements import resample_sources
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

ATOL = 1e-4
COMPONENTS = ("attn.0", "head.1.2", "mlp.1")


@pytest.mark.parametrize("arch", ["llama", "gpt_neox_parallel"])
def test_each_draw_matches_the_oracle_on_its_own_sources(tiny_models, prompt_set: PromptSet, arch: str) -> None:  # noqa: F811
    model = tiny_models(arch)
    spec = SweepSpec(components=COMPONENTS, ablation="resample", metric="centered_logit", resample_samples=2,
                     resample_from="random", seed=5, source_seeds=3)
    inputs = SweepInputs(token_ids=list(prompt_set.token_ids))
    result = run_sweep(model, spec, inputs)
    basis = response_basis(oracle_parts(model))
    is_attn = np.array([name.startswith("attn.") for name in basis])
    n = len(prompt_set.token_ids)
    for j in range(3):
        expected_sources = resample_sources(n, 2, "random", 5 + j)  # each draw is the single-draw job's pairing
        oracle = oracle_sweep(model, SweepSpec(components=COMPONENTS, ablation="resample", metric="centered_logit",
                                               resample_samples=2, resample_from="random", seed=5 + j),
                              inputs, sources=expected_sources)
        for engine_prompt, oracle_prompt in zip(result.prompts, oracle.prompts, strict=True):
            draw = engine_prompt.draws[j]  # type: ignore[index]
            assert draw.seed == 5 + j and draw.sources == expected_sources[engine_prompt.index]
            response = np.asarray(oracle_prompt.response)
            for name, got, want in (
                ("TE", draw.total_effect, oracle_prompt.total_effect),
                ("DE", draw.direct_effect, oracle_prompt.direct_effect),
                ("CE", draw.compensatory_effect, response.sum(axis=1)),
                ("CE.attn", draw.compensatory_effect_attn, response[:, is_attn].sum(axis=1)),
                ("CE.mlp", draw.compensatory_effect_mlp, response[:, ~is_attn].sum(axis=1)),
                ("norm", draw.norm_response, oracle_prompt.norm_response),
            ):
                np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"{arch} draw {j} {name}")
    for prompt in result.prompts:
        draws = prompt.draws
        assert draws is not None and prompt.sources == [s for d in draws for s in d.sources]
        for field in ("total_effect", "direct_effect", "compensatory_effect", "norm_response"):
            mean = np.mean([getattr(d, field) for d in draws], axis=0)  # equal runs per draw: the mean of means
            np.testing.assert_allclose(getattr(prompt, field), mean, atol=1e-6, rtol=0, err_msg=field)


def test_a_single_draw_keeps_no_draws(tiny_models, prompt_set: PromptSet) -> None:  # noqa: F811
    model = tiny_models("llama")
    inputs = SweepInputs(token_ids=list(prompt_set.token_ids))
    one = run_sweep(model, SweepSpec(components=("attn.1",), resample_from="random", seed=3), inputs)
    assert all(p.draws is None for p in one.prompts)
    with pytest.raises(ValueError, match="source_seeds"):
        run_position_sweep(model, SweepSpec(components=("attn.1",), positions="all", measure_positions="all",
                                            resample_from="random", source_seeds=2), inputs)


SMOLLM = ModelInfo(
    id="smollm2-135m", architecture="LlamaForCausalLM", n_layers=30, n_heads=9, n_kv_heads=3, d_model=576,
    vocab_size=49152, parallel_blocks=False, source="hub",
)


def test_source_seeds_resolve_and_multiply_the_work() -> None:
    request = JobRequest(preset="hydra", dataset=DatasetRef(name="known_1000", limit=40), source_seeds=5)
    spec = resolve(request, {"smollm2-135m": SMOLLM}, Settings())
    assert spec.source_seeds == 5 and spec.resample_samples == 15
    assert ablation_count(spec) == len(spec.prompts) * len(spec.components) * 15 * 5


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"ablation": "zero"}, "no sources to draw"),
        ({"resample_from": "next"}, "use resample_from 'random'"),
        ({"preset": "rushing_nanda", "texts": ["a b c", "d e f"]}, "per-position"),
    ],
)
def test_source_seeds_without_random_draws_are_refused(fields: dict[str, Any], says: str) -> None:
    base: dict[str, Any] = {"prompts": ["a b", "c d", "e f"], "resample_from": "random"}
    if "texts" in fields:
        base.pop("prompts")
    with pytest.raises(ValidationProblem, match=says) as refused:
        resolve(JobRequest(**{**base, **fields, "source_seeds": 2}), {"smollm2-135m": SMOLLM}, Settings())
    assert refused.value.field == "source_seeds"


@pytest.fixture()
def api(celery_worker: object, stack_settings: Any, worker_setting: Callable[[str, str], None]) -> Iterator[TestClient]:
    worker_setting("HYDRA_CHUNK_PROMPTS", "5")  # several chunks, merged
    with TestClient(create_app(stack_settings)) as client:
        yield client


def _run(api: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    submitted = api.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    status = wait_terminal(api, submitted.json()["id"])
    assert status["status"] == "succeeded", status
    return dict(api.get(f"/v1/jobs/{submitted.json()['id']}/result").json())


def test_a_job_with_three_draws_through_the_service(api: TestClient) -> None:
    """Chunked and merged: every prompt carries its three draws, each equal to the job run with that draw's seed
    alone; the summary's fits average the draws' fits and resample the dataset's relations."""
    body: dict[str, Any] = {"model": "tiny-llama", "dataset": {"name": "known_1000", "limit": 12},
                            "components": ["attn.0", "mlp.2"], "resample_samples": 2, "resample_from": "random",
                            "metric": "centered_logit", "seed": 3}
    result = _run(api, {**body, "source_seeds": 3})
    assert result["provenance"]["spec"]["source_seeds"] == 3
    summary = result["summary"]
    assert summary["source_seeds"] == [3, 4, 5]
    relations = datasets.select_relations(DatasetRef(name="known_1000", limit=12))
    assert summary["resampling"] == {"unit": "relation", "n_units": len(set(relations)), "n_boot": 1000,
                                     "ci_level": 0.95, "seed": 3}
    second = _run(api, {**body, "seed": 4})  # the draw with seed 4, run alone
    for prompt, alone in zip(result["prompts"], second["prompts"], strict=True):
        assert [d["seed"] for d in prompt["draws"]] == [3, 4, 5]
        assert prompt["draws"][1]["sources"] == alone["sources"]
        np.testing.assert_allclose(prompt["draws"][1]["total_effect"], alone["total_effect"], atol=1e-5)
        np.testing.assert_allclose(prompt["draws"][1]["compensatory_effect"], alone["compensatory_effect"], atol=1e-5)
    for c, component in enumerate(summary["components"]):
        fit = component["ce_vs_unembed"]
        assert fit["n_draws"] == 3 and fit["bootstrap_unit"] == "relation"
        x = np.array([p["unembed_effect"][c] for p in result["prompts"]])
        slopes = [np.polyfit(x, [p["draws"][j]["compensatory_effect"][c] for p in result["prompts"]], 1)[0]
                  for j in range(3)]
        assert fit["draw_slopes"] == pytest.approx(slopes, abs=1e-6)
        assert fit["slope"] == pytest.approx(float(np.mean(slopes)), abs=1e-6)
        assert fit["permutation_p"] is not None and fit["n_permutations"] == 1999
    assert torch.tensor([len(p["sources"]) for p in result["prompts"]]).eq(6).all()
