"""Joint knockouts as a job option (JobRequest.knockouts): each refusal as a 422 that names the set and what to
change, and a job through the real stack (uvicorn, Redis, Celery worker) whose sets' numbers equal the engine's
run_sweep on an independently loaded copy of the model and the brute-force oracle (tests/knockout_oracle.py); its
exports carry the sets' rows and its figures render."""

from __future__ import annotations

import csv
import io
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import redis
import torch
from litestar.testing import TestClient

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import ModelInfo
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.figures import ABLATION_FIGURES
from tests.checks import present
from tests.knockout_oracle import oracle_knockout
from tests.test_api import TWO, assert_problem, client, settings, store  # noqa: F401 (fixtures)
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

ATOL = 1e-4
# A post-norm model record (Gemma 2 and 3 normalise the attention output before the residual add).
POST_NORM = ModelInfo(
    id="tiny-post-norm",
    architecture="gemma2",
    n_layers=4,
    n_heads=2,
    n_kv_heads=1,
    d_model=8,
    vocab_size=100,
    parallel_blocks=False,
    source="local",
    post_norm=True,
)
TINY_JOB = {"model": "tiny", "prompts": TWO}

REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("empty set", {"knockouts": [["attn.0"], []]}, ("knockout set 1 is empty",), "knockouts[1]"),
    (
        "a name twice",
        {"knockouts": [["mlp.1", "attn.0", "mlp.1"]]},
        ("knockout set 0 names 'mlp.1' twice", "name each component once"),
        "knockouts[0]",
    ),
    (
        "the same name spelt twice",
        {"knockouts": [["mlp.1", "mlp.01"]]},
        ("knockout set 0 names 'mlp.1' twice",),
        "knockouts[0]",
    ),
    (
        "layer out of range",
        {"knockouts": [["attn.0"], ["attn.1", "mlp.4"]]},
        ("knockout set 1", "'mlp.4'", "layer 4 is out of range: model tiny has 4 layers (0–3)"),
        "knockouts[1]",
    ),
    (
        "head out of range",
        {"knockouts": [["head.1.2"]]},
        ("knockout set 0", "head 2 is out of range: model tiny has 2 heads per layer (0–1)"),
        "knockouts[0]",
    ),
    (
        "a kind, not one component",
        {"knockouts": [["attn"]]},
        ("knockout set 0: 'attn' is not one component", "attn.L, mlp.L or head.L.H"),
        "knockouts[0]",
    ),
    (
        "every head of a layer, not one component",
        {"knockouts": [["head.1", "mlp.0"]]},
        ("knockout set 0: 'head.1' is not one component", "one by one"),
        "knockouts[0]",
    ),
    (
        "a head with its own attention layer",
        {"knockouts": [["mlp.0"], ["attn.2", "head.2.1"]]},
        ("knockout set 1 names head.2.1 and its attention layer", "drop the head or the layer"),
        "knockouts[1]",
    ),
    (
        "two identical sets",
        {"knockouts": [["attn.0", "mlp.1"], ["mlp.2"], ["mlp.1", "attn.0"]]},
        ("knockout sets 0 and 2 name the same components", "drop set 2"),
        "knockouts[2]",
    ),
    (
        "a one-member set that components already ablate",
        {"components": ["attn.1"], "knockouts": [["attn.1"]]},
        ("knockout set 0 has the one member 'attn.1', which components already ablate",),
        "knockouts[0]",
    ),
    (
        "per-position job",
        {"knockouts": [["attn.0", "mlp.1"]], "positions": "all", "measure_positions": "all", "ablation": "zero"},
        ("knockouts are measured at the final position", "drop the per-position options"),
        "knockouts",
    ),
    (
        "nothing to ablate",
        {"components": [], "knockouts": []},
        ("nothing to ablate", "give components"),
        "components",
    ),
    (
        "a head after an earlier member on a post-norm model",
        {"model": "tiny-post-norm", "knockouts": [["mlp.0", "head.2.1"]]},
        ("knockout set 0", "cannot be separated from head.2.1's own change", "knock out attn.2 instead"),
        "knockouts[0]",
    ),
]


@pytest.fixture
def post_norm_store(store: JobStore) -> JobStore:  # noqa: F811
    store.advertise_model(POST_NORM)
    return store


@pytest.mark.parametrize(("body", "fragments", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_knockouts_are_a_422_naming_the_set(
    client: TestClient,  # noqa: F811
    post_norm_store: JobStore,
    settings: Settings,  # noqa: F811
    body: dict[str, Any],
    fragments: tuple[str, ...],
    field: str,
) -> None:
    problem = assert_problem(client.post("/v1/jobs", json={**TINY_JOB, **body}), 422, *fragments)
    assert problem["field"] == field
    assert client.get("/v1/jobs").json()["total"] == 0
    broker = redis.Redis.from_url(settings.redis_url)
    try:
        assert broker.llen(settings.queue_name) == 0
    finally:
        broker.close()


def test_knockouts_are_resolved_into_the_spec(client: TestClient, store: JobStore) -> None:  # noqa: F811
    """Sets only: no single components are added; with components: both, the sets after them."""
    only = client.post("/v1/jobs", json={**TINY_JOB, "knockouts": [["attn.01", "head.3.1"]], "ablation": "zero"})
    assert only.status_code == 202, only.text
    assert only.json()["progress"]["total"] == 2  # 2 prompts × 1 set × 1 run
    both = client.post("/v1/jobs", json={**TINY_JOB, "components": ["mlp"], "knockouts": [["attn.1", "mlp.2"]]})
    assert both.status_code == 202, both.text
    assert both.json()["progress"]["total"] == 2 * (4 + 1)
    spec = present(store.spec(only.json()["id"]))
    assert spec.components == [] and spec.knockouts == [["attn.1", "head.3.1"]]
    spec = present(store.spec(both.json()["id"]))
    assert spec.components == ["mlp.0", "mlp.1", "mlp.2", "mlp.3"] and spec.knockouts == [["attn.1", "mlp.2"]]


def test_the_post_norm_rule_allows_heads_without_earlier_members(
    client: TestClient,  # noqa: F811
    post_norm_store: JobStore,
) -> None:
    body = {**TINY_JOB, "model": "tiny-post-norm", "knockouts": [["head.1.0", "head.1.1", "mlp.2"]]}
    assert client.post("/v1/jobs", json=body).status_code == 202


# --- through the real stack -----------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "My favourite colour is"]
SETS = [["attn.0", "head.2.1"], ["head.0.1", "head.1.2", "mlp.1"]]


def test_a_knockout_job_matches_the_engine_and_the_oracle_and_exports_and_draws(
    live_url: str, llama: tuple[Any, Any]
) -> None:
    names = ["+".join(members) for members in SETS]
    with HydraClient(live_url) as hydra:
        # Workers advertise which models normalise attention before the residual add (resolve's post-norm rule).
        post_norm = {m.id: m.post_norm for m in hydra.models()}
        assert post_norm["tiny-gemma2"] and not post_norm["tiny-llama"]
        job = hydra.submit(
            {
                "model": "tiny-llama",
                "prompts": PROMPTS,
                "components": ["mlp.2"],
                "knockouts": SETS,
                "ablation": "resample",
                "metric": "logit",
                "seed": 0,
            }
        )
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        assert final.progress.done == final.progress.total == 3 * 3
        result = hydra.result(job.id)
        assert result.components == ["mlp.2", *names]
        assert result.provenance.spec.knockouts == SETS

        model, tokenizer = llama  # the stack's tiny Llama, loaded independently (tests/patch_fixtures.py)
        ids = [torch.tensor(tokenizer(p).input_ids) for p in PROMPTS]
        spec = SweepSpec(
            components=("mlp.2",), knockouts=tuple(tuple(s) for s in SETS), ablation="resample", metric="logit", seed=0
        )
        engine = run_sweep(model, spec, SweepInputs(token_ids=ids))
        assert engine.components == result.components
        for served, expected in zip(result.prompts, engine.prompts, strict=True):
            assert served.sources == expected.sources
            for field in (
                "total_effect",
                "direct_effect",
                "unembed_effect",
                "compensatory_effect",
                "compensation",
                "norm_response",
            ):
                assert getattr(served, field) == pytest.approx(getattr(expected, field), abs=ATOL), field
            worst = (torch.tensor(served.response) - torch.tensor(expected.response)).abs().max().item()
            assert worst < ATOL, f"response off by {worst:.2e}"
            # The independent brute force (one full forward pass with every member replaced) agrees too.
            for k, members in enumerate(SETS, start=1):
                oracle = oracle_knockout(
                    model,
                    ids[served.index],
                    members,
                    served.target_id,
                    "resample",
                    "final",
                    "clean",
                    source_ids=ids[served.sources[0]],
                )
                assert served.total_effect[k] == pytest.approx(oracle.total_effect, abs=ATOL)
                assert served.direct_effect[k] == pytest.approx(oracle.direct_effect, abs=ATOL)
                assert served.compensatory_effect[k] == pytest.approx(oracle.compensatory_effect, abs=ATOL)

        table = result.to_pandas()
        sets = table[table["component"].isin(names)]
        assert len(sets) == 3 * 2 and set(sets["kind"]) == {"knockout"} and sets["layer"].isna().all()
        assert set(result.to_pandas("summary")["component"]) == {"mlp.2", *names}

        export = f"{live_url}/v1/jobs/{job.id}/result"
        csv_text = httpx.get(export, params={"format": "csv"}).raise_for_status().text
        rows = list(csv.DictReader(io.StringIO(csv_text)))
        assert [r["component"] for r in rows if r["component"] in names] == names * 3
        first = next(r for r in rows if r["component"] == names[1] and r["prompt_index"] == "0")
        assert float(first["total_effect"]) == pytest.approx(result.prompts[0].total_effect[2], abs=1e-6)

        raw = httpx.get(export, params={"format": "parquet"}).raise_for_status().content
        parquet = pq.read_table(io.BytesIO(raw)).to_pandas()
        knocked = parquet[parquet["component"].isin(names)]
        assert len(knocked) == 3 * 2 and set(knocked["kind"]) == {"knockout"}

        for name in ABLATION_FIGURES:
            if name == "self_repair":
                continue  # per-position jobs only; knockouts are final-position
            image = hydra.figure(job.id, name, "png")
            assert image[:8] == b"\x89PNG\r\n\x1a\n", name
        assert hydra.figure(job.id, "profile", "png", component=names[1])[:4] == b"\x89PNG"


def test_a_job_of_knockouts_only_runs_and_draws_every_figure(live_url: str) -> None:
    """No components: only the sets are ablated (here with per-patch data and two source draws), and the figures
    drawn per layer say that they leave the sets out rather than failing."""
    with HydraClient(live_url) as hydra:
        job = hydra.submit(
            {
                "model": "tiny-gpt2",
                "prompts": PROMPTS,
                "knockouts": [["attn.0", "mlp.1"], ["head.1.0", "head.1.3"]],
                "resample_from": "random",
                "source_seeds": 2,
                "keep_samples": True,
            }
        )
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        result = hydra.result(job.id)
        assert result.components == ["attn.0+mlp.1", "head.1.0+head.1.3"]
        assert all(p.samples is not None and len(p.samples) == 2 for p in result.prompts)
        assert all(p.draws is not None and len(p.draws[0].total_effect) == 2 for p in result.prompts)
        assert result.summary.erasure == []
        for name in ABLATION_FIGURES:
            if name != "self_repair":
                assert hydra.figure(job.id, name, "svg").lstrip().startswith(b"<?xml"), name
