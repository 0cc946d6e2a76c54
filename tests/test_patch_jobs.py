"""Activation-patching jobs (intervention "patch"): each refusal as a 422 that names the field and what to change,
and jobs through the real stack (uvicorn, Redis, Celery worker) for both directions and both position scopes whose
numbers equal the engine's run_patching on an independently loaded copy of the model and the brute-force oracle
(tests/patch_oracle.py) at 1e-4; their summary, exports (CSV, Parquet) and the client's tables."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import httpx
import msgspec
import pyarrow.parquet as pq
import pytest
import redis
import torch
from litestar.testing import TestClient

from hydra_ablate_client import HydraClient
from hydra_ablate_client.vocabulary import DEFAULT_PAIR_EPSILON
from hydra_ablate_client.wire import JobRequest, JobResult
from service.core.settings import Settings
from service.core.store import JobStore
from tests.checks import present
from tests.estimate_fixtures import assert_estimates_on_page
from tests.patch_fixtures import tiny_ioi, wire_pairs
from tests.patch_oracle import oracle_patching
from tests.test_api import assert_problem, client, settings, store  # noqa: F401 (fixtures)
from worker.engine.patching import PAIR_EPSILON, PatchPair, PatchSpec, pooled_scores, run_patching

ATOL = 1e-4
PAIR = {"clean": "Paris is the capital of", "corrupted": "Rome is the capital of", "answer": " France",
        "counterfactual": " Italy"}
PATCH_JOB: dict[str, Any] = {"model": "tiny", "intervention": "patch", "pairs": [PAIR], "components": ["attn.1"]}
TINY_JOB = {"model": "tiny", "prompts": ["Paris is the capital of", "Berlin is the capital of"]}

# (case, body, fragments of the detail, the field named)
REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("patch without pairs", {**PATCH_JOB, "pairs": None}, ("intervention 'patch' needs pairs",), "pairs"),
    ("estimates with knockouts", {**PATCH_JOB, "estimates": ["atp"], "knockouts": [["attn.1", "mlp.0"]]},
     ("estimates cover single sites", "not knockout sets"), "estimates"),
    ("estimates named twice", {**PATCH_JOB, "estimates": ["atp", "atp"]}, ("name each method once",), "estimates"),
    ("verify", {**PATCH_JOB, "estimates": ["atp"], "verify": {"top": 1, "random": 0}},
     ("verify is an ablation option",), "verify"),
    ("resample options", {**PATCH_JOB, "resample_samples": 3}, ("resample_samples is an ablation option",),
     "resample_samples"),
    ("prompts beside pairs", {**PATCH_JOB, "prompts": ["a prompt"]}, ("prompts is an ablation option",), "prompts"),
    ("measure_positions all", {**PATCH_JOB, "measure_positions": "all"},
     ("reads its metric at the final position", "positions 'all'"), "measure_positions"),
    ("pairs and a pair dataset", {**PATCH_JOB, "pair_dataset": {"name": "ioi"}},
     ("give pairs or pair_dataset, not both",), "pair_dataset"),
    ("pair dataset on an ablation job", {**TINY_JOB, "pair_dataset": {"name": "ioi"}},
     ("pair_dataset is for activation patching",), "pair_dataset"),
    ("metric other than logit_diff", {**PATCH_JOB, "metric": "logit"}, ("use metric 'logit_diff'",), "metric"),
    ("layer out of range", {**PATCH_JOB, "components": ["attn.0", "resid_pre.4"]},
     ("site 'resid_pre.4': layer 4 is out of range: model tiny has 4 layers (0–3)",), "components[1]"),
    ("head out of range", {**PATCH_JOB, "components": ["head.1.2.v"]},
     ("site 'head.1.2.v': head 2 is out of range",), "components[0]"),
    ("an ablation-only name", {**PATCH_JOB, "components": ["attn.1.2"]},
     ("'attn.1.2' is not a patching site", "resid_pre.L"), "components[0]"),
    ("no sites", {**PATCH_JOB, "components": []}, ("nothing to patch",), "components"),
    ("pairs on an ablation job", {**TINY_JOB, "pairs": [PAIR]}, ("pairs is for activation patching",
                                                                   "set intervention to 'patch'"), "pairs"),
    ("direction on an ablation job", {**TINY_JOB, "direction": "noise"}, ("direction is for activation patching",),
     "direction"),
    ("a patching site in an ablation job", {**TINY_JOB, "components": ["mlp.1", "resid_pre.0"]},
     ("components[1] 'resid_pre.0' is a patching site",), "components[1]"),
]


@pytest.mark.parametrize(("body", "fragments", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_patching_requests_are_a_422_naming_the_field(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    body: dict[str, Any],
    fragments: tuple[str, ...],
    field: str,
) -> None:
    sent = {key: value for key, value in body.items() if value is not None}
    problem = assert_problem(client.post("/v1/jobs", json=sent), 422, *fragments)
    assert problem["field"] == field
    assert client.get("/v1/jobs").json()["total"] == 0
    broker = redis.Redis.from_url(settings.redis_url)
    try:
        assert broker.llen(settings.queue_name) == 0
    finally:
        broker.close()


def test_a_bad_patching_job_in_a_batch_names_the_job(client: TestClient) -> None:  # noqa: F811
    body = {"jobs": [PATCH_JOB, {**PATCH_JOB, "components": ["mlp.9"]}]}
    problem = assert_problem(client.post("/v1/jobs/batch", json=body), 422, "jobs[1]:", "layer 9 is out of range")
    assert problem["field"] == "jobs[1].components[0]"
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_patching_request_is_resolved_into_the_spec(client: TestClient, store: JobStore) -> None:  # noqa: F811
    """Sites expand and keep their order; pairs become the clean prompts, answers, counterfactuals and corrupted
    prompts; progress counts pairs × sites."""
    body = {**PATCH_JOB, "pairs": [PAIR, PAIR], "components": ["resid_pre", "head.2.1.q", "mlp.03"],
            "direction": "noise", "positions": "all", "epsilon": 0.01}
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["progress"]["total"] == 2 * 6
    spec = present(store.spec(accepted.json()["id"]))
    assert spec.intervention == "patch" and spec.direction == "noise" and spec.positions == "all"
    assert spec.components == ["resid_pre.0", "resid_pre.1", "resid_pre.2", "resid_pre.3", "head.2.1.q", "mlp.3"]
    assert spec.prompts == [PAIR["clean"]] * 2 and spec.corrupted == [PAIR["corrupted"]] * 2
    assert spec.answers == [" France"] * 2 and spec.counterfactuals == [" Italy"] * 2
    assert spec.metric == "logit_diff" and spec.epsilon == 0.01
    default = client.post("/v1/jobs", json={**PATCH_JOB, "components": ["attn.1"]})
    assert present(store.spec(default.json()["id"])).epsilon == DEFAULT_PAIR_EPSILON == PAIR_EPSILON


# --- through the real stack -----------------------------------------------------------------------------------------

SITES = ["resid_pre.0", "attn.1", "mlp.2", "head.1.2", "head.0.1.q", "head.2.3.pattern"]


def _post(live_url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{live_url}/v1/jobs", json={"model": "tiny-llama", "intervention": "patch", **body})


@pytest.mark.parametrize("positions", ["final", "all"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_a_patching_job_matches_the_engine_and_the_oracle(
    live_url: str, llama: tuple[Any, Any], worker_setting: Any, direction: str, positions: str
) -> None:
    model, tokenizer = llama
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")  # three pairs in two chunks: the merge puts them back in order
    pairs = tiny_ioi(tokenizer, 3, seed=1)
    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", "intervention": "patch", "pairs": wire_pairs(pairs),
                            "components": SITES, "direction": direction, "positions": positions, "seed": 3})
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        assert final.progress.done == final.progress.total == 3 * len(SITES)
        result = hydra.result(job.id)
    patching = present(result.patching)
    assert result.prompts == [] and result.components == SITES == patching.sites
    assert patching.direction == direction and patching.positions == positions
    assert result.provenance.spec.intervention == "patch"

    ids = [(torch.tensor(tokenizer(p.clean).input_ids), torch.tensor(tokenizer(p.corrupted).input_ids))
           for p in pairs]
    engine_pairs = [
        PatchPair(clean_ids=c, corrupted_ids=k, answer_id=tokenizer(p.answer, add_special_tokens=False).input_ids[0],
                  counterfactual_id=tokenizer(p.counterfactual, add_special_tokens=False).input_ids[0])
        for (c, k), p in zip(ids, pairs, strict=True)
    ]
    spec = PatchSpec(sites=tuple(SITES), direction=direction, positions=positions)  # type: ignore[arg-type]
    engine = run_patching(model, spec, engine_pairs)
    assert engine.sites == SITES
    for served, expected, pair in zip(patching.pairs, engine.pairs, engine_pairs, strict=True):
        assert served.answer_id == pair.answer_id and served.counterfactual_id == pair.counterfactual_id
        assert served.positions == expected.positions
        assert served.clean_metric == pytest.approx(expected.clean_metric, abs=ATOL)
        assert served.corrupted_metric == pytest.approx(expected.corrupted_metric, abs=ATOL)
        assert served.flagged == expected.flagged
        worst = (torch.tensor(served.patched_metric) - torch.tensor(expected.patched_metric)).abs().max().item()
        assert worst < ATOL, f"patched metric off the engine's by {worst:.2e}"
        # The independent brute force: one full forward pass per patch.
        clean, corrupted, patched = oracle_patching(
            model, pair.clean_ids, pair.corrupted_ids, pair.answer_id, pair.counterfactual_id, SITES, direction,
            positions,
        )
        assert served.clean_metric == pytest.approx(clean, abs=ATOL)
        assert served.corrupted_metric == pytest.approx(corrupted, abs=ATOL)
        worst = (torch.tensor(served.patched_metric) - torch.tensor(patched)).abs().max().item()
        assert worst < ATOL, f"patched metric off the oracle's by {worst:.2e}"
        for s in range(len(SITES)):
            for c in range(len(served.positions)):
                score = served.patching_score[s][c]
                if served.flagged:
                    assert score is None
                    continue
                base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
                assert score == pytest.approx((patched[s][c] - base) / (source - base), abs=1e-3)

    # The summary: one row per site (× position); the pooled score equals the engine's where every pair has the
    # same positions (always at the final position).
    by_key = {(item.site, item.position): item for item in patching.summary}
    if positions == "final":
        assert len(patching.summary) == len(SITES)
        pooled = present(pooled_scores(engine.pairs, direction, DEFAULT_PAIR_EPSILON, positions))
        for s, site in enumerate(SITES):
            item = by_key[(site, None)]
            assert item.n_pairs == 3
            assert item.pooled_score == pytest.approx(pooled[s][0], abs=ATOL)
            scores = [score for p in patching.pairs if (score := p.patching_score[s][0]) is not None]
            assert item.n_scored == len(scores)
            if scores:
                assert item.score_mean == pytest.approx(sum(scores) / len(scores), abs=1e-9)
            if len(scores) > 1:
                assert item.score_ci_low is not None and item.score_ci_high is not None
                assert item.score_ci_low <= present(item.score_mean) <= item.score_ci_high
    else:
        every = sorted({p for pair in patching.pairs for p in pair.positions})
        assert [key for key in by_key if key[0] == SITES[0]] == [(SITES[0], p) for p in every]
        longest = max(len(pair.positions) for pair in patching.pairs)
        assert by_key[(SITES[0], 0)].n_pairs == 3
        assert by_key[(SITES[0], longest - 1)].n_pairs == sum(len(p.positions) == longest for p in patching.pairs)


def test_a_patching_job_exports_long_rows_and_tables(live_url: str, llama: tuple[Any, Any]) -> None:
    _, tokenizer = llama
    pairs = tiny_ioi(tokenizer, 2, seed=5)
    sites = ["resid_pre.1", "head.2.0"]
    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", "intervention": "patch", "pairs": wire_pairs(pairs),
                            "components": sites, "positions": "all"})
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        result = hydra.result(job.id)
    patching = present(result.patching)
    expected = [
        (pair.index, site, position, pair.patched_metric[s][c], pair.patching_score[s][c])
        for pair in patching.pairs
        for s, site in enumerate(sites)
        for c, position in enumerate(pair.positions)
    ]

    table = result.to_pandas()
    assert list(table.columns[:5]) == ["pair_index", "site", "position", "patched_metric", "patching_score"]
    assert len(table) == len(expected)
    for row, (pair, site, position, patched, score) in zip(table.itertuples(), expected, strict=True):
        assert (row.pair_index, row.site, row.position) == (pair, site, position)
        assert row.patched_metric == patched
        assert (score is None and row.patching_score != row.patching_score) or row.patching_score == score
    summary = result.to_pandas("summary")
    assert len(summary) == len(patching.summary) and set(summary["site"]) == set(sites)
    assert list(result.to_pandas("prompts")["clean"]) == [p.clean for p in pairs]
    with pytest.raises(ValueError, match="no 'response' table"):
        result.to_pandas("response")

    export = f"{live_url}/v1/jobs/{job.id}/result"
    rows = list(csv.DictReader(io.StringIO(httpx.get(export, params={"format": "csv"}).raise_for_status().text)))
    assert len(rows) == len(expected)
    for row, (pair, site, position, patched, score) in zip(rows, expected, strict=True):
        assert (int(row["pair_index"]), row["site"], int(row["position"])) == (pair, site, position)
        assert float(row["patched_metric"]) == patched
        assert row["patching_score"] == ("" if score is None else repr(score))

    raw = httpx.get(export, params={"format": "parquet"}).raise_for_status().content
    parquet = pq.read_table(io.BytesIO(raw))
    assert parquet.schema.names[:5] == ["pair_index", "site", "position", "patched_metric", "patching_score"]
    assert parquet.column("patched_metric").to_pylist() == [e[3] for e in expected]
    assert parquet.column("site").to_pylist() == [e[1] for e in expected]

    msgpack = httpx.get(export, params={"format": "msgpack"}).raise_for_status().content
    assert msgpack  # the same result, another encoding
    figure = httpx.get(f"{live_url}/v1/jobs/{job.id}/figures/layer_effects", params={"format": "png"})
    assert_problem(figure, 400, "is a patching job", "patching_grid")
    assert isinstance(result, JobResult)
    # `hydra-ablate result` prints the per-site summary.
    from rich.console import Console

    from cli.views import result_view

    console = Console(width=160, record=True)
    console.print(result_view(result))
    shown = console.export_text()
    assert "activation patching (denoise)" in shown and all(site in shown for site in sites)
    # The web page shows the per-site summary instead of the ablation tables and figures.
    page = httpx.get(f"{live_url}/ui/jobs/{job.id}")
    assert page.status_code == 200, page.text[:2000]
    assert 'id="patch-table"' in page.text and all(f">{site}</th>" in page.text for site in sites)
    assert 'id="paper-table"' not in page.text and "/figures/layer_effects" not in page.text
    assert f"/ui/jobs/{job.id}/figures/patching_grid" in page.text  # its own figure (tests/test_patch_figures.py)


def test_pairs_the_tokenizer_refuses_are_a_422_naming_the_pair(live_url: str, llama: tuple[Any, Any]) -> None:
    """The API checks the pairs with the tokenizer the workers publish: equal token lengths (the message shows both
    lengths and the tokens) and one-token answers."""
    _, tokenizer = llama
    good = wire_pairs(tiny_ioi(tokenizer, 1, seed=2))[0]
    longer = {**good, "corrupted": good["corrupted"] + " and then some more words"}
    clean_n = len(tokenizer(good["clean"]).input_ids)
    corrupted_n = len(tokenizer(longer["corrupted"]).input_ids)
    problem = assert_problem(
        _post(live_url, {"pairs": [good, longer], "components": ["attn.0"]}),
        422,
        f"pairs[1]: the clean prompt is {clean_n} tokens long and the corrupted one {corrupted_n}",
        "Clean tokens: [",
        "corrupted tokens: [",
        "make them the same length",
    )
    assert problem["field"] == "pairs[1].corrupted"
    several = " Anna Maria Christina"
    assert len(tokenizer(several, add_special_tokens=False).input_ids) > 1
    for what in ("answer", "counterfactual"):
        problem = assert_problem(
            _post(live_url, {"pairs": [{**good, what: several}], "components": ["attn.0"]}),
            422,
            f"pairs[0].{what} {several!r} is",
            "give a",
            "one token",
        )
        assert problem["field"] == f"pairs[0].{what}"
    # A head part the model cannot patch (GPT-2's fused q/k/v, grouped keys and values on the tiny Llama).
    problem = assert_problem(
        httpx.post(f"{live_url}/v1/jobs", json={"model": "tiny-gpt2", "intervention": "patch", "pairs": [good],
                                                "components": ["head.0.1.q"]}),
        422, "site 'head.0.1.q' cannot be patched on model tiny-gpt2", "patch head.L.H",
    )
    assert problem["field"] == "components[0]"
    problem = assert_problem(
        _post(live_url, {"pairs": [good], "components": ["attn.0", "head.1.0.k"]}), 422, "no k belongs to one head"
    )
    assert problem["field"] == "components[1]"


def test_a_cancelled_patching_job_leaves_no_hooks(llama: tuple[Any, Any], tiny_model_dirs: dict[str, str]) -> None:
    """The worker's chunk through its own loading path: a job stopped between pairs raises the task's cancel, and
    neither a finished nor a stopped job leaves a hook on the cached model."""
    from service.core.resolve import resolve
    from worker.chunk_execution import execute_chunk, merge_chunks
    from worker.engine.errors import InputError
    from worker.engine.sweep import SweepCancelled
    from worker.model_cache import load_model, model_info
    from worker.model_sources import ModelSource

    _, tokenizer = llama
    source = ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"])
    loaded = load_model(source)
    pairs = wire_pairs(tiny_ioi(tokenizer, 2, 4))
    request = msgspec.convert({"model": "tiny-llama", "intervention": "patch", "pairs": pairs,
                               "components": ["head.0.1.pattern", "head.1.0.q", "mlp.0"]}, JobRequest)
    spec = resolve(request, {"tiny-llama": model_info(source)}, Settings())

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())

    before = hooks()
    result = merge_chunks("job", spec, [execute_chunk("job", spec, loaded, 0, 0, 2)])
    assert present(result.patching).n_flagged + len(present(result.patching).pairs) >= 2
    assert hooks() == before
    calls = iter([False, True])
    with pytest.raises(SweepCancelled):
        execute_chunk("job", spec, loaded, 0, 0, 2, should_stop=lambda: next(calls))
    assert hooks() == before
    # Without a published tokenizer the API cannot check the pairs: the worker refuses them with the reason, which
    # becomes the job's error (InputError).
    uneven = msgspec.structs.replace(spec, corrupted=[spec.prompts[0] + " and more words", spec.prompts[1]])
    with pytest.raises(InputError, match=r"pairs\[0\]: .* make them the same length"):
        execute_chunk("job", uneven, loaded, 0, 0, 2)
    several = msgspec.structs.replace(spec, answers=[" Anna Maria Christina", spec.answers[1]])  # type: ignore[index]
    with pytest.raises(InputError, match=r"pairs\[0\]\.answer .* is \d+ tokens"):
        execute_chunk("job", several, loaded, 0, 0, 2)
    assert hooks() == before


def test_a_pair_dataset_is_drawn_on_the_models_tokenizer(live_url: str, llama: tuple[Any, Any]) -> None:
    """`pair_dataset` {"name": "ioi"} draws its pairs with the job's seed on the tokenizer the workers publish; the
    queued spec lists them, and the job runs them."""
    _, tokenizer = llama
    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", "intervention": "patch", "pair_dataset": {"name": "ioi", "limit": 3},
                            "seed": 7, "components": ["mlp.1"]})
        assert job.progress.total == 3
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        result = hydra.result(job.id)
    expected = tiny_ioi(tokenizer, 3, seed=7)
    patching = present(result.patching)
    assert [(p.clean, p.corrupted, p.answer, p.counterfactual) for p in patching.pairs] == [
        (p.clean, p.corrupted, p.answer, p.counterfactual) for p in expected
    ]
    spec = result.provenance.spec
    assert spec.pair_dataset is not None and spec.pair_dataset.name == "ioi"
    assert spec.prompts == [p.clean for p in expected]


ESTIMATED_SITES = ["resid_pre.1", "attn.0", "mlp.2", "head.1.2", "head.0.1.q", "head.2.3.pattern"]


@pytest.mark.parametrize(("direction", "positions"), [("denoise", "all"), ("noise", "final")])
def test_a_patching_job_with_estimates_serves_the_engines_numbers(
    live_url: str, llama: tuple[Any, Any], worker_setting: Any, direction: str, positions: str
) -> None:
    """`estimates` on a patching job: every pair's AtP, AtP + QK fix and AtP* equal the engine's on an independently
    loaded copy of the model (worker/engine/patch_attribution.py, checked against its own references in
    tests/test_patch_attribution.py) at 1e-4; the exact change and the estimated scores are divided as the patching
    score is; the summary's agreement and cost; the exports, the client's table and the CLI carry them."""
    from rich.console import Console

    from cli.views import result_view
    from worker.engine.patch_attribution import run_patch_attribution

    model, tokenizer = llama
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")  # three pairs in two chunks: costs are weighed by their pairs
    pairs = tiny_ioi(tokenizer, 3, seed=6)
    with HydraClient(live_url) as hydra:
        job = hydra.submit({"model": "tiny-llama", "intervention": "patch", "pairs": wire_pairs(pairs),
                            "components": ESTIMATED_SITES, "direction": direction, "positions": positions,
                            "estimates": ["atp", "atp_star"]})
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        result = hydra.result(job.id)
    patching = present(result.patching)
    engine_pairs = [
        PatchPair(clean_ids=torch.tensor(tokenizer(p.clean).input_ids),
                  corrupted_ids=torch.tensor(tokenizer(p.corrupted).input_ids),
                  answer_id=tokenizer(p.answer, add_special_tokens=False).input_ids[0],
                  counterfactual_id=tokenizer(p.counterfactual, add_special_tokens=False).input_ids[0])
        for p in pairs
    ]
    spec = PatchSpec(sites=tuple(ESTIMATED_SITES), direction=direction, positions=positions)  # type: ignore[arg-type]
    engine = run_patch_attribution(model, spec, engine_pairs)
    for served, expected in zip(patching.pairs, engine.pairs, strict=True):
        estimates = present(served.estimates)
        for method in ("atp", "atp_qkfix", "atp_star"):
            worst = (torch.tensor(getattr(estimates, method)) - torch.tensor(expected.values[method])).abs().max()
            assert worst.item() < ATOL, f"{method} off the engine's by {worst.item():.2e}"
        base, source = ((served.corrupted_metric, served.clean_metric) if direction == "denoise"
                        else (served.clean_metric, served.corrupted_metric))
        assert expected.base_metric == pytest.approx(base, abs=ATOL)
        for s in range(len(ESTIMATED_SITES)):
            for c in range(len(served.positions)):
                assert estimates.effect[s][c] == pytest.approx(served.patched_metric[s][c] - base, abs=1e-9)
                score = estimates.atp_score[s][c]
                star = present(estimates.atp_star_score)[s][c]
                if served.flagged:
                    assert score is None and star is None and served.patching_score[s][c] is None
                else:
                    assert score == pytest.approx(estimates.atp[s][c] / (source - base), rel=1e-9)
                    assert star == pytest.approx(present(estimates.atp_star)[s][c] / abs(source - base), rel=1e-9)

    block = present(patching.attribution)
    assert block.methods == ["atp", "atp_qkfix", "atp_star"] and block.errors == []
    assert [c.method for c in block.cost] == ["exact", "atp", "atp_qkfix", "atp_star"]
    cost = {c.method: c for c in block.cost}
    assert cost["atp"].model_evaluations == 3 and cost["atp"].forward_passes == 2
    per_pair = sum(len(p.positions) for p in patching.pairs) / 3 * len(ESTIMATED_SITES)
    assert cost["exact"].model_evaluations == pytest.approx(2 + per_pair)
    common = sorted(set.intersection(*(set(p.positions) for p in patching.pairs)))
    width = len(ESTIMATED_SITES) * (len(common) if positions == "all" else 1)
    for agreement in block.agreement:
        assert agreement.n_prompts == 3 and agreement.n_components == width
        assert agreement.compared_with == ("abs_total_effect" if agreement.method == "atp_star" else "total_effect")
        for miss in agreement.largest_misses:  # each miss names its pair and site (and position) and both values
            site, _, at = miss.component.partition("@")
            pair = patching.pairs[miss.index]
            column = pair.positions.index(int(at)) if at else len(pair.positions) - 1
            exact = present(pair.estimates).effect[ESTIMATED_SITES.index(site)][column]
            assert miss.exact == pytest.approx(abs(exact) if agreement.method == "atp_star" else exact, abs=1e-9)
    summary = httpx.get(f"{live_url}/v1/jobs/{job.id}/summary").raise_for_status().json()
    assert summary["attribution"]["methods"] == block.methods

    rows = [(pair, s, c) for pair in patching.pairs for s in range(len(ESTIMATED_SITES))
            for c in range(len(pair.positions))]
    table = result.to_pandas()
    for name in ("effect", "atp", "atp_qkfix", "atp_star", "atp_score", "atp_qkfix_score", "atp_star_score"):
        assert name in table.columns
    assert list(table["atp"]) == [present(p.estimates).atp[s][c] for p, s, c in rows]
    export = f"{live_url}/v1/jobs/{job.id}/result"
    csv_rows = list(csv.DictReader(io.StringIO(httpx.get(export, params={"format": "csv"}).raise_for_status().text)))
    assert [r["atp_star"] for r in csv_rows] == [repr(present(present(p.estimates).atp_star)[s][c]) for p, s, c in rows]
    raw = httpx.get(export, params={"format": "parquet"}).raise_for_status().content
    parquet = pq.read_table(io.BytesIO(raw))
    assert parquet.column("effect").to_pylist() == [present(p.estimates).effect[s][c] for p, s, c in rows]
    from service.rendering.parquet import from_parquet

    assert from_parquet(parquet) == result  # the estimates come back from the file's rows

    console = Console(width=80, record=True)
    console.print(result_view(result))
    shown = console.export_text()
    assert "estimates against exact (Spearman ρ per pair, pooled; top-k recall; speed):" in shown
    for method in ("atp", "atp_qkfix", "atp_star"):  # one unbroken line each in 80 columns
        assert re.search(rf"^  {method} +ρ [^\n]*; top-\d+ [^\n]*; [^\n]*exact *$", shown, re.MULTILINE), shown
    assert "estimated patching score per site" in shown
    assert "how much of the miss" not in shown  # patching measures no compensatory effect: no errors to show
    assert all(site in shown for site in ESTIMATED_SITES)

    # The job page shows the same agreement per pair, each method's cost and its largest misses.
    assert_estimates_on_page(httpx.get(f"{live_url}/ui/jobs/{result.id}").raise_for_status().text, result, "pair")
