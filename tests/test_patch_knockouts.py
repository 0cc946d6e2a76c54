"""Knockout sets in activation-patching jobs (JobRequest.knockouts with intervention "patch"): each refusal as a 422
naming `knockouts[i]` and what to change; jobs through the real stack (uvicorn, Redis, Celery worker) for both
directions whose numbers equal the engine's run_patching with the same PatchSpec.knockouts on an independently
loaded copy of the model and the brute-force oracle (tests/patch_oracle.py) at 1e-4; the summary route's answer for
a patching job; the Parquet export read back to the JSON result; the CLI's --knockout on a patching job."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import redis
import torch
from litestar.testing import TestClient
from typer.testing import CliRunner

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobResult
from service.core.ioi_pairs import IoiPair
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.parquet import from_parquet
from tests.checks import present
from tests.patch_fixtures import tiny_ioi, wire_pairs
from tests.patch_oracle import oracle_patching
from tests.test_api import assert_problem, client, settings, store  # noqa: F401 (fixtures)
from worker.engine.patching import PatchPair, PatchSpec, run_patching

ATOL = 1e-4
PAIR = {"clean": "Paris is the capital of", "corrupted": "Rome is the capital of", "answer": " France",
        "counterfactual": " Italy"}
PATCH_JOB: dict[str, Any] = {"model": "tiny", "intervention": "patch", "pairs": [PAIR], "components": ["attn.1"]}

# (case, body, fragments of the detail, the field named); model "tiny": 4 layers, 2 heads.
REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("empty set", {**PATCH_JOB, "knockouts": [["attn.0"], []]}, ("knockout set 1 is empty", "name at least one"),
     "knockouts[1]"),
    ("a site twice", {**PATCH_JOB, "knockouts": [["mlp.1", "attn.0", "mlp.1"]]},
     ("knockout set 0 names 'mlp.1' twice", "name each site once"), "knockouts[0]"),
    ("a site twice, spelt two ways", {**PATCH_JOB, "knockouts": [["resid_pre.1", "resid_pre.01"]]},
     ("knockout set 0 names 'resid_pre.1' twice",), "knockouts[0]"),
    ("layer out of range", {**PATCH_JOB, "knockouts": [["attn.0"], ["resid_pre.1", "mlp.4"]]},
     ("site 'mlp.4': layer 4 is out of range: model tiny has 4 layers (0–3)",), "knockouts[1]"),
    ("head out of range", {**PATCH_JOB, "knockouts": [["head.1.2.v", "mlp.0"]]},
     ("site 'head.1.2.v': head 2 is out of range",), "knockouts[0]"),
    ("a kind", {**PATCH_JOB, "knockouts": [["resid_pre"]]},
     ("knockout set 0: 'resid_pre' is not one patching site", "resid_pre.L"), "knockouts[0]"),
    ("a layer's heads", {**PATCH_JOB, "knockouts": [["mlp.0"], ["head.1", "mlp.0"]]},
     ("knockout set 1: 'head.1' is not one patching site", "one by one"), "knockouts[1]"),
    ("an ablation-only name", {**PATCH_JOB, "knockouts": [["attn.1.0"]]},
     ("'attn.1.0' is not one patching site",), "knockouts[0]"),
    ("a set equal to another", {**PATCH_JOB, "knockouts": [["attn.0", "mlp.1"], ["mlp.2"], ["mlp.01", "attn.0"]]},
     ("knockout sets 0 and 2 name the same sites", "drop set 2"), "knockouts[2]"),
    ("a one-site set that components patch", {**PATCH_JOB, "components": ["attn.1"], "knockouts": [["attn.1"]]},
     ("knockout set 0 has the one member 'attn.1', which components already patch",), "knockouts[0]"),
    ("no sites and no sets", {**PATCH_JOB, "components": [], "knockouts": []}, ("nothing to patch", "knockouts"),
     "components"),
    ("a patching site in an ablation job's set", {"model": "tiny", "prompts": ["a b", "c d"],
                                                  "knockouts": [["mlp.0", "resid_pre.1"]]},
     ("knockout set 0: 'resid_pre.1' is a patching site", "set intervention to 'patch'"), "knockouts[0]"),
]


@pytest.mark.parametrize(("body", "fragments", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_patching_knockouts_are_a_422_naming_the_set(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    body: dict[str, Any],
    fragments: tuple[str, ...],
    field: str,
) -> None:
    problem = assert_problem(client.post("/v1/jobs", json=body), 422, *fragments)
    assert problem["field"] == field
    assert client.get("/v1/jobs").json()["total"] == 0
    broker = redis.Redis.from_url(settings.redis_url)
    try:
        assert broker.llen(settings.queue_name) == 0
    finally:
        broker.close()


def test_patching_knockouts_are_resolved_into_the_spec(client: TestClient, store: JobStore) -> None:  # noqa: F811
    """Sets alone (components unset or []) patch only the sets; with components, the sets come after them; names are
    canonical; progress counts pairs × (sites + sets)."""
    variants: list[dict[str, Any]] = [{}, {"components": []}]
    for components in variants:
        body = {**PATCH_JOB, **components, "pairs": [PAIR, PAIR], "knockouts": [["head.1.0.q", "mlp.03"]]}
        body = {key: value for key, value in body.items() if key != "components" or components}
        accepted = client.post("/v1/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["progress"]["total"] == 2
        spec = present(store.spec(accepted.json()["id"]))
        assert spec.components == [] and spec.knockouts == [["head.1.0.q", "mlp.3"]]
    both = client.post("/v1/jobs", json={**PATCH_JOB, "components": ["resid_pre"],
                                         "knockouts": [["attn.1"], ["resid_pre.0", "head.1.1.pattern"]]})
    assert both.status_code == 202, both.text
    assert both.json()["progress"]["total"] == 4 + 2
    spec = present(store.spec(both.json()["id"]))
    assert spec.components == [f"resid_pre.{layer}" for layer in range(4)]
    assert spec.knockouts == [["attn.1"], ["resid_pre.0", "head.1.1.pattern"]]


# --- through the real stack -----------------------------------------------------------------------------------------

# tiny-llama: 3 layers, 4 query heads sharing 2 key/value heads (so no head's k or v is its own).
KNOCKOUTS = [
    ["head.1.2", "head.2.0"],
    ["resid_pre.1", "mlp.2"],
    ["head.0.1.q", "attn.1"],
    ["head.2.3.pattern", "head.2.1.pattern", "mlp.0"],
    ["attn.0"],
]


def _engine_pairs(tokenizer: Any, pairs: list[IoiPair]) -> list[PatchPair]:
    return [
        PatchPair(
            clean_ids=torch.tensor(tokenizer(p.clean).input_ids),
            corrupted_ids=torch.tensor(tokenizer(p.corrupted).input_ids),
            answer_id=tokenizer(p.answer, add_special_tokens=False).input_ids[0],
            counterfactual_id=tokenizer(p.counterfactual, add_special_tokens=False).input_ids[0],
        )
        for p in pairs
    ]


@pytest.mark.parametrize(
    ("direction", "positions", "sites"),
    [("denoise", "final", ["attn.1", "mlp.2"]), ("noise", "all", [])],
    ids=["denoise-final-with-sites", "noise-all-sets-only"],
)
def test_a_patching_job_with_knockouts_matches_the_engine_and_the_oracle(
    live_url: str, llama: tuple[Any, Any], worker_setting: Any, direction: str, positions: str, sites: list[str]
) -> None:
    model, tokenizer = llama
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")  # three pairs in two chunks
    pairs = tiny_ioi(tokenizer, 3, seed=11)
    names = [*sites, *("+".join(members) for members in KNOCKOUTS)]
    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", "intervention": "patch", "pairs": wire_pairs(pairs),
                            "components": sites, "knockouts": KNOCKOUTS, "direction": direction,
                            "positions": positions, "seed": 3})
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        assert final.progress.done == final.progress.total == 3 * len(names)
        result = hydra.result(job.id)
    patching = present(result.patching)
    assert result.components == names == patching.sites
    assert result.provenance.spec.knockouts == KNOCKOUTS

    engine_pairs = _engine_pairs(tokenizer, pairs)
    spec = PatchSpec(sites=tuple(sites), direction=direction, positions=positions,  # type: ignore[arg-type]
                     knockouts=tuple(tuple(members) for members in KNOCKOUTS))
    engine = run_patching(model, spec, engine_pairs)
    assert engine.sites == names
    for served, expected, pair in zip(patching.pairs, engine.pairs, engine_pairs, strict=True):
        assert served.positions == expected.positions
        worst = (torch.tensor(served.patched_metric) - torch.tensor(expected.patched_metric)).abs().max().item()
        assert worst < ATOL, f"patched metric off the engine's by {worst:.2e}"
        clean, corrupted, patched = oracle_patching(
            model, pair.clean_ids, pair.corrupted_ids, pair.answer_id, pair.counterfactual_id, sites, direction,
            positions, knockouts=KNOCKOUTS,
        )
        assert served.clean_metric == pytest.approx(clean, abs=ATOL)
        assert served.corrupted_metric == pytest.approx(corrupted, abs=ATOL)
        assert len(patched) == len(names)
        worst = (torch.tensor(served.patched_metric) - torch.tensor(patched)).abs().max().item()
        assert worst < ATOL, f"patched metric off the oracle's by {worst:.2e}"
        for s in range(len(names)):
            for c in range(len(served.positions)):
                score = served.patching_score[s][c]
                if served.flagged:
                    assert score is None
                    continue
                base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
                assert score == pytest.approx((patched[s][c] - base) / (source - base), abs=1e-3)

    # The summary has the sets' rows after the sites', and the summary route answers it.
    assert list(dict.fromkeys(item.site for item in patching.summary)) == names
    answer = httpx.get(f"{live_url}/v1/jobs/{job.id}/summary").raise_for_status().json()
    assert answer["intervention"] == "patch" and answer["n_pairs"] == 3
    assert answer["sites"] == names and answer["direction"] == direction and answer["positions"] == positions
    assert answer["n_flagged"] == patching.n_flagged and answer["ci_level"] == patching.ci_level
    assert answer["clean_metric_mean"] == patching.clean_metric_mean
    assert answer["summary"] == [
        {field: getattr(item, field) for field in item.__struct_fields__} for item in patching.summary
    ]

    # Exports: the long table, CSV and Parquet carry the sets' rows; the Parquet file reads back to the result.
    table = result.to_pandas()
    assert list(dict.fromkeys(table["site"])) == names
    assert len(table) == sum(len(names) * len(p.positions) for p in patching.pairs)
    export = f"{live_url}/v1/jobs/{job.id}/result"
    rows = httpx.get(export, params={"format": "csv"}).raise_for_status().text.splitlines()
    assert len(rows) == 1 + len(table) and any(",head.1.2+head.2.0," in row for row in rows)
    raw = httpx.get(export, params={"format": "parquet"}).raise_for_status().content
    assert from_parquet(pq.read_table(io.BytesIO(raw))) == result


def test_the_summary_route_keeps_the_ablation_answer(live_url: str) -> None:
    """An ablation job's summary answer is still the Summary (no patching fields)."""
    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", "prompts": ["The capital of France is", "One two three"],
                            "components": ["mlp.1"], "ablation": "zero"})
        assert hydra.wait(job.id, poll_s=0.05).status == "succeeded"
        result = hydra.result(job.id)
    answer = httpx.get(f"{live_url}/v1/jobs/{job.id}/summary").raise_for_status().json()
    assert "intervention" not in answer and answer["n_prompts"] == result.summary.n_prompts == 2
    assert [c["component"] for c in answer["components"]] == ["mlp.1"]


def test_head_parts_the_model_cannot_patch_in_a_set_are_a_422(live_url: str, llama: tuple[Any, Any]) -> None:
    """The engine's head-part refusals, named by the set: GPT-2's fused q/k/v, the tiny Llama's shared keys."""
    _, tokenizer = llama
    good = wire_pairs(tiny_ioi(tokenizer, 1, seed=2))
    problem = assert_problem(
        httpx.post(f"{live_url}/v1/jobs", json={"model": "tiny-gpt2", "intervention": "patch", "pairs": good,
                                                "components": [], "knockouts": [["mlp.0", "head.0.1.q"]]}),
        422, "site 'head.0.1.q' cannot be patched on model tiny-gpt2", "patch head.L.H",
    )
    assert problem["field"] == "knockouts[0]"
    problem = assert_problem(
        httpx.post(f"{live_url}/v1/jobs", json={"model": "tiny-llama", "intervention": "patch", "pairs": good,
                                                "knockouts": [["attn.0"], ["attn.0", "head.1.0.k"]]}),
        422, "no k belongs to one head",
    )
    assert problem["field"] == "knockouts[1]"


def test_the_cli_submits_knockouts_on_a_patching_job(
    live_url: str, llama: tuple[Any, Any], tmp_path: Path
) -> None:
    """`hydra-ablate submit --pairs FILE --knockout a,b` patches the set; with no --components, only the sets."""
    from cli.main import app as cli_app

    _, tokenizer = llama
    pairs_file = tmp_path / "pairs.json"
    pairs_file.write_text(json.dumps(wire_pairs(tiny_ioi(tokenizer, 2, seed=4))))
    submitted = CliRunner().invoke(
        cli_app,
        ["submit", "--model", "tiny-llama", "--pairs", str(pairs_file), "--knockout", "head.1.2, head.2.0",
         "--knockout", "mlp.1", "--wait", "--url", live_url],
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = next(line.strip() for line in submitted.output.splitlines() if len(line.strip()) == 32)
    with HydraClient(live_url) as hydra:
        result: JobResult = hydra.result(job_id)
    assert present(result.patching).sites == ["head.1.2+head.2.0", "mlp.1"]
    assert "head.1.2+head.2.0" in submitted.output
