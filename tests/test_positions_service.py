"""Per-position jobs through the service: texts and the built-in corpus, the rushing_nanda preset, result-size
estimates, per-position columns against the oracle, the streamed CSV and the summary endpoint."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from hydra_ablate_client.wire import CorpusRef, JobRequest, JobResult, ModelInfo, PositionColumns
from service.api.app import create_app
from service.core import corpora
from service.core.errors import ValidationProblem
from service.core.resolve import _position_values, resolve
from service.core.settings import Settings
from service.rendering.figures import ABLATION_FIGURES, PAPER_FIGURES
from service.rendering.parquet import PARQUET_MEDIA_TYPE, from_parquet, iter_parquet
from tests.oracle import oracle_position_sweep
from tests.test_stack_e2e import wait_terminal
from worker.engine.types import SweepInputs, SweepSpec

SMOLLM = ModelInfo(
    id="smollm2-135m", architecture="LlamaForCausalLM", n_layers=30, n_heads=9, n_kv_heads=3, d_model=576,
    vocab_size=49152, parallel_blocks=False, source="hub",
)
MODELS = {"smollm2-135m": SMOLLM}


# --- resolving requests (pure) ------------------------------------------------------------------------------------


def test_the_rushing_nanda_preset_resolves_to_the_papers_protocol_on_the_builtin_corpus() -> None:
    spec = resolve(JobRequest(preset="rushing_nanda"), MODELS, Settings())
    assert len(spec.components) == 270 and spec.components[0] == "head.0.0"
    assert (spec.ablation, spec.positions, spec.measure_positions, spec.target) == ("resample", "all", "all",
                                                                                     "next_token")
    assert (spec.norm_scale, spec.response_basis, spec.metric, spec.max_tokens) == (
        "clean", "heads", "centered_logit", 64  # their metric: centred logits (TransformerLens center_unembed)
    )
    assert spec.prompts == corpora.documents("known_1000_text") and len(spec.prompts) == 101
    assert spec.corpus == CorpusRef(name="known_1000_text") and spec.per_position


def test_a_job_of_100_documents_64_positions_and_270_heads_fits_the_result_cap() -> None:
    texts = [f"document {i}" for i in range(100)]
    spec = resolve(JobRequest(preset="rushing_nanda", texts=texts), MODELS, Settings())
    assert len(spec.prompts) == 100 and len(spec.components) == 270
    with pytest.raises(ValidationProblem, match="position_responses"):  # the full response vectors do not fit
        resolve(JobRequest(preset="rushing_nanda", texts=texts, position_responses="full"), MODELS, Settings())


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"positions": "final"}, "positions"),
        ({"metric": "logit_diff", "counterfactuals": ["x", "y"]}, "metric"),
        ({"answers": [" a", " b"]}, "target"),
        ({"prompts": ["a b c", "d e f"]}, "texts"),
    ],
)
def test_per_position_options_without_a_definition_are_refused(request_fields: dict[str, Any], field: str) -> None:
    fields = {"preset": "rushing_nanda", "texts": ["one two three", "four five six"], **request_fields}
    with pytest.raises(ValidationProblem) as refused:
        resolve(JobRequest(**fields), MODELS, Settings())
    assert refused.value.field == field


# --- through the stack ------------------------------------------------------------------------------------------


@pytest.fixture()
def api(celery_worker: object, stack_settings: Any, worker_setting: Callable[[str, str], None]) -> Iterator[TestClient]:
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")  # several chunks, merged
    with TestClient(create_app(stack_settings)) as client:
        yield client


def _arrays(columns: dict[str, Any], name: str, rows: int) -> torch.Tensor:
    raw = __import__("base64").b64decode(columns[name])
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float64)).reshape(rows, -1)


def test_a_rushing_nanda_job_on_texts_matches_the_oracle_position_by_position(
    api: TestClient, tiny_model_dirs: dict[str, str]
) -> None:
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank today",
        "Paris is the capital of France and Berlin is the capital of Germany",
        "Water boils at one hundred degrees Celsius at sea level on an ordinary day",
        "One two three four five six seven eight nine ten eleven twelve",
    ]
    body = {"preset": "rushing_nanda", "model": "tiny-llama", "texts": texts, "max_tokens": 9,
            "components": ["head.0.1", "head.1", "mlp.2"], "position_responses": "full"}
    submitted = api.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    status = wait_terminal(api, job_id)
    assert status["status"] == "succeeded", status
    result = api.get(f"/v1/jobs/{job_id}/result").json()
    spec = result["provenance"]["spec"]
    assert spec["max_tokens"] == 9 and spec["response_basis"] == "heads"

    location = tiny_model_dirs["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    ids = [torch.tensor(tokenizer(t).input_ids[:9]) for t in texts]
    sweep_spec = SweepSpec(
        components=tuple(result["components"]), ablation="resample", positions="all", metric=spec["metric"],
        norm_scale="clean", resample_samples=1, resample_from="random", seed=0, measure_positions="all",
        target="next_token", response_basis="heads",
    )
    oracle = oracle_position_sweep(model, sweep_spec, SweepInputs(token_ids=ids),
                                   sources=[p["sources"] for p in result["prompts"]])
    assert result["response_basis"] == oracle["response_basis"]
    n_components, n_basis = len(result["components"]), len(result["response_basis"])
    for served, expected in zip(result["prompts"], oracle["prompts"], strict=True):
        columns = served["positions"]
        assert columns["positions"] == expected["positions"] == list(range(8))  # 9 tokens: 8 read, 8 targets
        assert columns["target_ids"] == expected["target_ids"].tolist()
        for name in ("total_effect", "direct_effect", "unembed_effect", "compensation", "norm_response"):
            got = _arrays(columns, name, n_components)
            assert torch.allclose(got, expected[name], atol=1e-4, rtol=0), (name, (got - expected[name]).abs().max())
        response = _arrays(columns, "response", n_components * n_basis).reshape(n_components, n_basis, -1)
        assert torch.allclose(response, expected["response"], atol=1e-4, rtol=0)
        # The split closes at every position: heads + MLPs + norm = compensation.
        parts = [_arrays(columns, n, n_components) for n in ("response_heads", "response_mlps", "norm_response")]
        split = cast(torch.Tensor, sum(parts))
        assert torch.allclose(split, _arrays(columns, "compensation", n_components), atol=1e-5, rtol=0)
        # The paper's CE at every position: the oracle's downstream responses summed (the norm excluded).
        ce = _arrays(columns, "compensatory_effect", n_components)
        assert torch.allclose(ce, expected["response"].sum(dim=1), atol=1e-4, rtol=0)
        # The per-prompt lists hold the last measured position.
        unembed = _arrays(columns, "unembed_effect", n_components)
        assert served["unembed_effect"] == pytest.approx(unembed[:, -1].tolist(), abs=1e-6)
        assert served["compensatory_effect"] == pytest.approx(ce[:, -1].tolist(), abs=1e-6)

    summary = api.get(f"/v1/jobs/{job_id}/summary")
    assert summary.status_code == 200 and summary.json() == result["summary"]
    repair = {r["component"]: r for r in summary.json()["self_repair"]}
    pairs = 4 * 8
    assert summary.json()["n_pairs"] == pairs
    assert repair["head.0.1"]["n_pairs"] == max(1, int(0.02 * pairs))  # R&N round down; at least one pair
    for r in repair.values():
        closes = r["heads_mean"] + r["mlps_mean"] + r["norm_mean"]
        assert abs(closes - r["self_repair_mean"]) < 1e-5
        assert abs(r["self_repair_mean"] - (r["direct_effect_mean"] - r["total_effect_mean"])) < 1e-5

    _exports_equal_the_json(api, job_id, result)
    _the_full_preset_fits_by_this_jobs_measured_size(api, job_id, result)


REDIS_VALUE_LIMIT = 512 * 1024 * 1024


def _the_full_preset_fits_by_this_jobs_measured_size(api: TestClient, job_id: str, result: dict[str, Any]) -> None:
    """The submit-time size estimate bounds this real job's stored numbers; at this job's measured JSON bytes per
    number, 100 documents × 64 positions × 270 heads (the preset on SmolLM2) stay under the cap and Redis's value
    limit; and the summary comes without the per-position data."""
    stored = api.get(f"/v1/jobs/{job_id}/result", headers={"Accept-Encoding": "identity"}).content
    numbers = 0
    for prompt in result["prompts"]:
        columns = prompt["positions"]
        numbers += sum(len(base64.b64decode(v)) // 4 for v in columns.values() if isinstance(v, str))
        numbers += len(columns["positions"]) + len(columns["target_ids"])
        numbers += sum(len(v) for v in prompt.values() if isinstance(v, list) and v and isinstance(v[0], float))
    info = next(m for m in api.get("/v1/models").json() if m["id"] == "tiny-llama")
    options = {"response_basis": "heads", "position_responses": "full"}
    estimate = _position_values(4, len(result["components"]), msgspec.convert(info, ModelInfo), options, 9)
    assert numbers <= estimate, (numbers, estimate)
    bytes_per_number = len(stored) / numbers  # provenance and keys included: an overestimate for a large job
    full = _position_values(100, 270, SMOLLM, {"response_basis": "heads", "position_responses": "split"}, 64)
    assert full <= Settings().max_result_values
    assert full * bytes_per_number < REDIS_VALUE_LIMIT, (full, bytes_per_number)
    summary = api.get(f"/v1/jobs/{job_id}/summary")
    assert summary.status_code == 200 and "positions" not in summary.json()
    assert len(summary.content) * 3 < len(stored)  # per component and layer statistics only


PER_POSITION_ARRAYS = ("total_effect", "direct_effect", "unembed_effect", "compensation", "compensatory_effect",
                       "response_heads", "response_mlps", "norm_response")


def _exports_equal_the_json(api: TestClient, job_id: str, result: dict[str, Any]) -> None:
    """CSV and Parquet (by ?format= and by Accept) hold every per-position row, equal to the JSON's arrays."""
    n_components, n_basis = len(result["components"]), len(result["response_basis"])
    expected = {}  # (prompt index, position, component) → {measure: value}
    for prompt in result["prompts"]:
        columns = prompt["positions"]
        arrays = {name: _arrays(columns, name, n_components) for name in PER_POSITION_ARRAYS}
        response = _arrays(columns, "response", n_components * n_basis).reshape(n_components, n_basis, -1)
        per_position = {name: _arrays(columns, name, 1)[0] for name in ("clean_metric", "top2_gap")}
        for p, position in enumerate(columns["positions"]):
            for c, component in enumerate(result["components"]):
                expected[(prompt["index"], position, component)] = {
                    "prompt": prompt["prompt"], "target_id": columns["target_ids"][p],
                    **{name: float(values[c, p]) for name, values in arrays.items()},
                    **{name: float(values[p]) for name, values in per_position.items()},
                    "response": response[c, :, p].tolist(),
                }
    assert len(expected) == 4 * 8 * n_components

    exported = api.get(f"/v1/jobs/{job_id}/result", params={"format": "csv"})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == len(expected)
    for row in rows:
        want = expected[(int(row["prompt_index"]), int(row["position"]), row["component"])]
        assert row["prompt"] == want["prompt"] and int(row["target_id"]) == want["target_id"]
        for name in (*PER_POSITION_ARRAYS, "clean_metric", "top2_gap"):
            assert float(row[name]) == pytest.approx(want[name], abs=1e-6), name

    as_json = msgspec.json.decode(api.get(f"/v1/jobs/{job_id}/result").content, type=JobResult)
    for params, headers in (({"format": "parquet"}, {}), ({}, {"Accept": PARQUET_MEDIA_TYPE})):
        exported = api.get(f"/v1/jobs/{job_id}/result", params=params, headers=headers)
        assert exported.status_code == 200, exported.text
        assert exported.headers["content-type"].startswith(PARQUET_MEDIA_TYPE)
        table = pq.read_table(io.BytesIO(exported.content))
        rows = table.to_pylist()
        assert len(rows) == len(expected)
        assert [(r["prompt_index"], r["position"], r["component"]) for r in rows] == list(expected)  # CSV's order
        for row in rows:
            want = expected[(row["prompt_index"], row["position"], row["component"])]
            assert row["prompt"] == want["prompt"] and row["target_id"] == want["target_id"]
            assert row["kind"] == row["component"].split(".")[0] and row["layer"] == int(row["component"].split(".")[1])
            for name in (*PER_POSITION_ARRAYS, "clean_metric", "top2_gap"):
                assert abs(row[name] - want[name]) <= 1e-6, (name, row[name], want[name])
            assert np.allclose(row["response"], want["response"], atol=1e-6, rtol=0)
        assert from_parquet(table) == as_json  # nothing of the JSON result is left out
    # Written in row groups of whole prompts, one piece streamed per group (then the footer).
    pieces = list(iter_parquet(as_json, rows_per_group=8 * n_components))
    assert len(pieces) >= 4
    parsed = pq.ParquetFile(io.BytesIO(b"".join(pieces)))
    assert parsed.num_row_groups == 4 and from_parquet(parsed.read()) == as_json


def test_the_preset_runs_on_the_builtin_corpus(api: TestClient) -> None:
    body = {"preset": "rushing_nanda", "model": "tiny-gpt2", "corpus": {"name": "known_1000_text", "limit": 3},
            "max_tokens": 6}
    submitted = api.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    status = wait_terminal(api, submitted.json()["id"])
    assert status["status"] == "succeeded", status
    job_id = submitted.json()["id"]
    summary = api.get(f"/v1/jobs/{job_id}/summary").json()
    assert summary["n_pairs"] == 3 * 5 and summary["top_fraction"] == 0.02
    assert len(summary["self_repair"]) == len(summary["components"]) > 0
    assert summary["response_matrix"] == []  # position_responses "split": no full response vectors stored
    for name in ABLATION_FIGURES:  # every figure of ablation jobs draws (or says why it cannot) for a per-position job
        figure = api.get(f"/v1/jobs/{job_id}/figures/{name}")
        if name in PAPER_FIGURES:  # drawn from final-position statistics across prompts: a 400 that says so
            assert figure.status_code == 400, (name, figure.text)
            assert "not available for per-position jobs" in figure.json()["detail"]
            continue
        assert figure.status_code == 200, (name, figure.text)
        assert figure.content.startswith(b"\x89PNG")
    components = summary["components"]
    assert all(c["ce_vs_unembed"] is None and c["unembed_drop_correlation"] is None for c in components)
    assert all(isinstance(c["compensatory_effect_mean"], float) for c in components)
    assert summary["erasure"] is None and summary["selection"]["n_kept"] == 3


@pytest.mark.parametrize(
    "option", [{"only_correct": True}, {"keep_samples": True}, {"resample_within": "relation"}]
)
def test_paper_options_are_refused_for_per_position_jobs(api: TestClient, option: dict[str, Any]) -> None:
    body = {"preset": "rushing_nanda", "model": "tiny-gpt2", "corpus": {"name": "known_1000_text", "limit": 3},
            "max_tokens": 6, **option}
    refused = api.post("/v1/jobs", json=body)
    assert refused.status_code == 422, refused.text
    assert "final-position jobs" in refused.json()["detail"]


def test_the_capped_total_effect_of_a_soft_capped_model_is_exported_per_position() -> None:
    """Soft-capped models carry capped_total_effect (C, P): CSV and Parquet rows hold it, from_parquet restores it;
    the CLI's CSV (cli/views.py) is the API's per-position CSV."""
    from cli.views import result_csv
    from service.rendering.result_csv import position_csv_rows, to_csv
    from tests.test_figures import build_result

    base = build_result(prompts=["one two three", "four five"])
    rng = np.random.default_rng(0)
    n_components, n_basis = len(base.components), len(base.response_basis)

    def f32(*shape: int) -> bytes:
        return rng.standard_normal(shape).astype("<f4").tobytes()

    prompts = []
    for prompt, n_positions in zip(base.prompts, (3, 2), strict=True):
        columns = PositionColumns(
            positions=list(range(n_positions)), target_ids=list(range(10, 10 + n_positions)),
            clean_metric=f32(n_positions), top2_gap=f32(n_positions),
            **{name: f32(n_components, n_positions) for name in PER_POSITION_ARRAYS},
            clean_direct_effect=f32(n_basis, n_positions), capped_total_effect=f32(n_components, n_positions),
        )
        prompts.append(msgspec.structs.replace(prompt, positions=columns))
    result = msgspec.structs.replace(base, prompts=prompts)
    result = msgspec.json.decode(msgspec.json.encode(result), type=JobResult)  # as stored

    table = pq.read_table(io.BytesIO(b"".join(iter_parquet(result))))
    assert from_parquet(table) == result
    rows = table.to_pylist()
    text = b"".join(position_csv_rows(result)).decode()
    assert to_csv(result).decode() == result_csv(result) == text  # the CLI's CSV is the API's, per position too
    csv_rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(csv_rows) == (3 + 2) * n_components
    for row, csv_row in zip(rows, csv_rows, strict=True):
        prompt = result.prompts[row["prompt_index"]]
        assert prompt.positions is not None
        capped = np.frombuffer(prompt.positions.capped_total_effect or b"", dtype="<f4").reshape(n_components, -1)
        want = float(capped[result.components.index(row["component"]), row["position"]])
        assert row["capped_total_effect"] == want and float(csv_row["capped_total_effect"]) == want


def test_a_per_position_job_on_a_soft_capped_post_norm_model_runs_through_the_stack(api: TestClient) -> None:
    """Gemma 2 (sandwich norms, soft-capped logits) per position, head basis: the worker stores capped_total_effect
    per (component, position), the split closes, and the CSV and Parquet rows carry it."""
    body = {"preset": "rushing_nanda", "model": "tiny-gemma2", "texts": ["a b c d e", "f g h i", "j k l m n o"],
            "max_tokens": 5, "components": ["head.0.1", "attn.1", "mlp.1"]}
    submitted = api.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert wait_terminal(api, job_id)["status"] == "succeeded"
    result = api.get(f"/v1/jobs/{job_id}/result").json()
    assert result["provenance"]["architecture"] == "gemma2"
    n_components = len(result["components"])
    for prompt in result["prompts"]:
        columns = prompt["positions"]
        capped = _arrays(columns, "capped_total_effect", n_components)
        total = _arrays(columns, "total_effect", n_components)
        assert capped.shape == total.shape and not torch.allclose(capped, total)
        assert prompt["capped_total_effect"] == pytest.approx(capped[:, -1].tolist(), abs=1e-6)
        split = torch.stack(
            [_arrays(columns, n, n_components) for n in ("response_heads", "response_mlps", "norm_response")]
        ).sum(dim=0)
        assert torch.allclose(split, _arrays(columns, "compensation", n_components), atol=1e-5, rtol=0)
    rows = list(csv.DictReader(io.StringIO(api.get(f"/v1/jobs/{job_id}/result", params={"format": "csv"}).text)))
    assert rows and all(row["capped_total_effect"] != "" for row in rows)
    table = pq.read_table(io.BytesIO(api.get(f"/v1/jobs/{job_id}/result", params={"format": "parquet"}).content))
    assert table.num_rows == len(rows) and table.column("capped_total_effect").null_count == 0
