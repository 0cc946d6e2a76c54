"""Attribution-patching estimates on per-position ablation jobs (the rushing_nanda setup): the bound on backward passes
and the other refusals (422s naming the field), and a job through the real stack (uvicorn, Redis, Celery worker, two
chunks merged) whose estimates equal run_position_attribution called directly on an independently loaded copy of
the model, whose exact parts equal the same job without estimates, whose summary's agreement over (prompt,
position) pairs is recomputed here from the returned arrays, and whose exports and figure carry the estimates."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from hydra_ablate_client.wire import JobRequest, JobResult
from service.api.app import create_app
from service.core.errors import ValidationProblem
from service.core.estimate_options import MAX_POSITION_BACKWARD_PASSES, position_backward_passes
from service.core.resolve import resolve
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.figures import render
from service.rendering.parquet import from_parquet
from tests.checks import present
from tests.estimate_fixtures import assert_errors_in_lines, assert_estimates_on_page
from tests.refusals import Refusal, assert_refused, refusal_cases
from tests.test_api import TINY, TWO, client, settings, store  # noqa: F401 (fixtures)
from tests.test_estimate_jobs import _recall, _spearman
from tests.test_stack_e2e import wait_terminal
from worker.engine.position_attribution import run_position_attribution
from worker.engine.types import SweepInputs, SweepSpec

PER_POSITION = {"model": "tiny", "prompts": TWO, "positions": "all", "measure_positions": "all", "ablation": "zero"}

REFUSED: list[Refusal] = [
    (
        "too many backward passes",
        {"estimates": ["atp"], "max_tokens": 1100},
        ("550.5 per prompt", f"limit of {MAX_POSITION_BACKWARD_PASSES}", "lower max_tokens to 1023",
         "measure_positions 'final'"),
        "estimates",
    ),
    (
        "too many backward passes with GradDrop",
        {"estimates": ["atp", "atp_star"], "max_tokens": 500},
        ("626.25 per prompt", "4-layer model", "lower max_tokens to 408", "ask for atp only"),
        "estimates",
    ),
    (
        "a verification set",
        {"estimates": ["atp"], "max_tokens": 16, "verify": {"top": 1, "random": 0}},
        ("verify ranks components by their estimates at the final position", "drop verify"),
        "verify",
    ),
    (
        "knockout sets",
        {"estimates": ["atp"], "max_tokens": 16, "knockouts": [["attn.0", "mlp.1"]]},
        ("knockouts",),
        "knockouts",
    ),
]


@refusal_cases(REFUSED)
def test_unsupported_position_estimates_are_a_422_naming_the_field(
    client: TestClient,  # noqa: F811
    store: JobStore,  # noqa: F811
    body: dict[str, Any],
    fragments: tuple[str, ...],
    field: str,
) -> None:
    assert_refused(client, PER_POSITION, body, fragments, field)


def test_the_bound_admits_the_rushing_nanda_preset_and_final_position_read_outs() -> None:
    """64 tokens read as 63 at every position: 32 backward passes with atp, 496 with atp_star on 30 layers."""
    assert position_backward_passes("all", 63, 30, star=False) == 32
    assert position_backward_passes("all", 63, 30, star=True) == 496 <= MAX_POSITION_BACKWARD_PASSES
    assert position_backward_passes("final", 4096, 30, star=False) == 1
    models = {"tiny": TINY}
    spec = resolve(JobRequest(**{**PER_POSITION, "estimates": ["atp_star", "atp"], "max_tokens": 64}),  # type: ignore[arg-type]
                   models, Settings())
    assert spec.estimates == ["atp", "atp_star"] and spec.per_position
    # Measured at the final position only: one backward pass whatever the length.
    final = {**PER_POSITION, "measure_positions": "final", "target": "next_token", "estimates": ["atp"]}
    assert resolve(JobRequest(**final), models, Settings(max_prompt_tokens=4096)).estimates == ["atp"]  # type: ignore[arg-type]
    # Nothing bounds the texts (no max_tokens, no per-prompt limit on this server): refused, asking for max_tokens.
    with pytest.raises(ValidationProblem, match="give max_tokens"):
        resolve(JobRequest(**{**PER_POSITION, "estimates": ["atp"]}), models, Settings(max_prompt_tokens=0))  # type: ignore[arg-type]


def test_the_result_size_limit_counts_the_position_estimates() -> None:
    body = {**PER_POSITION, "components": ["mlp"], "max_tokens": 8}
    plain = resolve(JobRequest(**body), {"tiny": TINY}, Settings())  # type: ignore[arg-type]
    assert plain.estimates == []
    # 2 prompts × 8 positions × (4 components × 8 measures + the basis' 8 + 4): exactly at the limit without estimates
    limit = Settings(max_result_values=2 * 8 * (4 * 8 + 8 + 4))
    resolve(JobRequest(**body), {"tiny": TINY}, limit)  # type: ignore[arg-type]
    with pytest.raises(ValidationProblem, match="numbers"):
        resolve(JobRequest(**body, estimates=["atp"]), {"tiny": TINY}, limit)  # type: ignore[arg-type]


# --- through the real stack -----------------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank today",
    "Paris is the capital of France and Berlin is the capital of Germany",
    "Water boils at one hundred degrees Celsius at sea level",
    "One two three four five six seven eight nine ten",
]
MAX_TOKENS = 7  # 6 positions read, each with its next token as target
JOB: dict[str, Any] = {"preset": "rushing_nanda", "model": "tiny-llama", "texts": TEXTS, "max_tokens": MAX_TOKENS,
                       "components": ["head.0.1", "head.1.2", "attn.1", "mlp.2", "head.2.0"]}
METHODS = ["atp", "atp_qkfix", "atp_star"]
EXACT_ARRAYS = ("total_effect", "direct_effect", "unembed_effect", "compensation", "compensatory_effect",
                "response_heads", "response_mlps", "norm_response", "clean_direct_effect", "clean_metric")
ESTIMATE_TOL = 1e-5
SUMMARY_TOL = 1e-9


@pytest.fixture()
def api(celery_worker: object, stack_settings: Any, worker_setting: Callable[[str, str], None]) -> Iterator[TestClient]:
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")  # two chunks, merged
    with TestClient(create_app(stack_settings)) as stack_client:
        yield stack_client


def _run(api: TestClient, body: dict[str, Any]) -> JobResult:
    submitted = api.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    status = wait_terminal(api, submitted.json()["id"])
    assert status["status"] == "succeeded", status
    return msgspec.json.decode(api.get(f"/v1/jobs/{status['id']}/result").content, type=JobResult)


def _array(raw: bytes | None, rows: int) -> np.ndarray:
    assert raw is not None
    return np.frombuffer(raw, dtype="<f4").astype(np.float64).reshape(rows, -1)


def test_a_per_position_estimates_job_matches_the_engine_and_the_plain_job(
    api: TestClient, tiny_model_dirs: dict[str, str]
) -> None:
    plain = _run(api, JOB)
    result = _run(api, {**JOB, "estimates": ["atp", "atp_star"]})
    n_components = len(result.components)

    # The exact parts are the plain job's, array for array.
    assert result.components == plain.components and result.response_basis == plain.response_basis
    for mine, theirs in zip(result.prompts, plain.prompts, strict=True):
        assert mine.positions is not None and theirs.positions is not None
        assert mine.sources == theirs.sources and mine.positions.target_ids == theirs.positions.target_ids
        for name in EXACT_ARRAYS:
            assert getattr(mine.positions, name) == getattr(theirs.positions, name), name
        assert mine.total_effect == theirs.total_effect and theirs.estimates is None
        assert theirs.positions.atp is None and theirs.positions.abs_total_effect is None
    assert plain.summary.attribution is None
    assert result.summary.self_repair == plain.summary.self_repair

    # The estimates are run_position_attribution's on an independently loaded copy of the model, same inputs.
    location = tiny_model_dirs["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    ids = [torch.tensor(tokenizer(t).input_ids[:MAX_TOKENS]) for t in TEXTS]
    spec = SweepSpec(
        components=tuple(result.components), ablation="resample", positions="all", metric="centered_logit",
        resample_samples=1, resample_from="random", seed=0, measure_positions="all", target="next_token",
        response_basis="heads",
    )
    direct = run_position_attribution(model, spec, SweepInputs(token_ids=ids), estimates=("atp", "atp_star"))
    assert direct.nodes == result.components and direct.methods == METHODS
    for served, expected in zip(result.prompts, direct.prompts, strict=True):
        columns = served.positions
        assert columns is not None and served.sources == expected.sources
        assert columns.positions == expected.positions == list(range(MAX_TOKENS - 1))
        for method in METHODS:
            got = _array(getattr(columns, method), n_components)
            assert np.allclose(got, expected.values[method].double().numpy(), atol=ESTIMATE_TOL, rtol=0), method
            # The per-prompt lists hold the last measured position, as every list of a per-position result does.
            assert getattr(served.estimates, method) == pytest.approx(got[:, -1].tolist(), abs=1e-7)
        total = _array(columns.total_effect, n_components)
        assert np.array_equal(_array(columns.abs_total_effect, n_components), np.abs(total))  # one run each

    # The summary's agreement over (prompt, position) pairs, recomputed from the arrays.
    block = result.summary.attribution
    assert block is not None and block.methods == METHODS
    pairs = len(TEXTS) * (MAX_TOKENS - 1)

    def rows(name: str) -> np.ndarray:
        return np.concatenate([_array(getattr(p.positions, name), n_components).T for p in result.prompts])

    exact, magnitude = rows("total_effect"), rows("abs_total_effect")
    for a in block.agreement:
        estimate = rows(a.method)
        truth = magnitude if a.method == "atp_star" else exact
        assert (a.n_prompts, a.n_pairs, a.n_components) == (len(TEXTS), pairs, n_components)
        per_pair = [_spearman(truth[r], estimate[r]) for r in range(pairs)]
        assert a.spearman_per_prompt_mean == pytest.approx(np.mean([r for r in per_pair if r is not None]),
                                                           abs=SUMMARY_TOL)
        assert a.spearman_pooled == pytest.approx(_spearman(truth.ravel(), estimate.ravel()), abs=SUMMARY_TOL)
        assert a.recall_at_k_of_means == pytest.approx(_recall(truth.mean(0), estimate.mean(0), a.k), abs=SUMMARY_TOL)
        assert a.mean_abs_error == pytest.approx(np.abs(estimate - truth).mean(), abs=SUMMARY_TOL)
        worst = a.largest_misses[0]
        at, of = (int(v) for v in np.unravel_index(np.argmax(np.abs(estimate - truth)), truth.shape))
        assert (worst.index, worst.position, worst.component) == (at // (MAX_TOKENS - 1), at % (MAX_TOKENS - 1),
                                                                   result.components[of])
        assert worst.error == pytest.approx(estimate[at, of] - truth[at, of], abs=SUMMARY_TOL)
    costs = {c.method: c for c in block.cost}
    assert list(costs) == ["exact", *METHODS]
    assert costs["exact"].model_evaluations == 1 + 1 + n_components  # clean, the source, one run per component
    read = MAX_TOKENS - 1
    assert costs["atp"].backward_passes == pytest.approx((read + 1) / 2)  # one per position, over its prefix
    assert costs["atp"].forward_passes == pytest.approx(1 + (read + 1) / 2)
    layers = model.config.num_hidden_layers
    assert costs["atp_star"].backward_passes == pytest.approx((read + 1) / 2 * (1 + (layers - 1) / 2))
    errors = [e for e in block.errors if e.method == "atp"]
    assert [e.component for e in errors] == result.components
    ce = rows("compensatory_effect")
    for c, e in enumerate(errors):
        assert e.error_mean == pytest.approx((rows("atp")[:, c] - exact[:, c]).mean(), abs=SUMMARY_TOL)
        assert e.compensatory_effect_mean == pytest.approx(ce[:, c].mean(), abs=SUMMARY_TOL)
        assert (e.error_vs_ce.n, e.error_vs_ce.n_clusters) == (pairs, len(TEXTS))  # a document's pairs together

    # CSV and Parquet rows carry the estimates beside the exact measures; the Parquet file reads back to the JSON.
    export = api.get(f"/v1/jobs/{result.id}/result", params={"format": "csv"})
    table = list(csv.DictReader(io.StringIO(export.text)))
    assert len(table) == pairs * n_components
    for row in table[:: 7]:
        p, position = int(row["prompt_index"]), int(row["position"])
        c = result.components.index(row["component"])
        for name in (*METHODS, "abs_total_effect"):
            assert float(row[name]) == pytest.approx(rows(name)[p * read + position, c], abs=1e-6), name
    plain_csv = list(csv.DictReader(io.StringIO(api.get(f"/v1/jobs/{plain.id}/result",
                                                        params={"format": "csv"}).text)))
    assert all(row["atp"] == "" for row in plain_csv)
    parquet = pq.read_table(io.BytesIO(api.get(f"/v1/jobs/{result.id}/result", params={"format": "parquet"}).content))
    assert {*METHODS, "abs_total_effect"} <= set(parquet.schema.names)
    assert from_parquet(parquet) == result
    raw = api.get(f"/v1/jobs/{result.id}/result").json()
    assert base64.b64decode(raw["prompts"][0]["positions"]["atp"]) == result.prompts[0].positions.atp  # type: ignore[union-attr]

    # `hydra-ablate result` says the ranks are per (prompt, position) pair, within 80 columns.
    from cli.views import summary_lines

    lines = summary_lines(result)
    assert any("Spearman ρ per pair" in line for line in lines)
    assert sum(line.startswith(f"  {m} ") for line in lines for m in METHODS) == 3
    assert all(len(line) <= 80 for line in lines)
    assert_errors_in_lines(lines, present(result.summary.attribution), "pair")  # the error on CE across pairs

    # The job page shows the same agreement as the summary: per method, over the (prompt, position) pairs, with each
    # method's cost and its largest misses at their positions; the plain job's page has no such section.
    page = api.get(f"/ui/jobs/{result.id}")
    assert page.status_code == 200
    section = assert_estimates_on_page(page.text, result, "(prompt, position) pair")
    assert f"compared at {pairs} (prompt, position) pairs of {len(TEXTS)} prompts, {n_components} components" in section
    assert '<th scope="col">Position</th>' in section
    assert 'id="estimates"' not in api.get(f"/ui/jobs/{plain.id}").text

    # The figure draws every (prompt, position, component) pair.
    assert render(result, "estimates", "png")[:4] == b"\x89PNG"
