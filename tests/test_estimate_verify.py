"""Estimates-first jobs (JobRequest.verify): each refusal a 422 naming `verify`; a job through the real stack (uvicorn,
Redis, Celery worker) whose estimates of every component equal those of the plain all-components estimates job,
whose verification set is `verification_set` recomputed here from the returned estimates, and whose verified
components' exact numbers equal those of a plain job of exactly those components (same seed and sources); and a
redelivered estimate chunk that does not send the exact phase twice."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from litestar.testing import TestClient

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobResult
from service.core.chunk_book import Chunk, ChunkBook, plan_chunks
from service.core.resolve import ablation_count
from service.core.settings import Settings
from service.core.store import JobStore
from tests import estimate_fixtures
from tests.checks import present
from tests.estimate_fixtures import (
    EXACT_FIELDS,
    JOB,
    METHODS,
    PROMPTS,
    assert_errors_in_lines,
    assert_estimates_on_page,
    run_job,
)
from tests.numbers import assert_same_numbers
from tests.test_api import TWO, assert_problem, client, settings, store  # noqa: F401 (fixtures)
from worker.attribution_summary import verification_set

ESTIMATE_TOL = 1e-5  # the same engine on other chunk splits: float32 rounding only
TINY_JOB = {"model": "tiny", "prompts": TWO, "components": ["mlp"], "estimates": ["atp"]}  # 4 components

REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("without estimates", {"estimates": [], "verify": {"top": 1}}, ("add estimates", "drop verify")),
    ("more than the job's components", {"verify": {"top": 3, "random": 2}},
     ("top 3 + random 2 = 5 components", "the job has 4", "lower top or random")),
    ("a negative top", {"verify": {"top": -1, "random": 2}}, ("use 0 or more",)),
    ("a negative random", {"verify": {"top": 1, "random": -1}}, ("use 0 or more",)),
    ("nothing to verify", {"verify": {"top": 0, "random": 0}}, ("nothing would run exactly",)),
]


@pytest.mark.parametrize(("body", "fragments"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_unsupported_verify_is_a_422_naming_verify(
    client: TestClient,  # noqa: F811
    store: JobStore,  # noqa: F811
    body: dict[str, Any],
    fragments: tuple[str, ...],
) -> None:
    problem = assert_problem(client.post("/v1/jobs", json={**TINY_JOB, **body}), 422, *fragments)
    assert problem["field"] == "verify"
    assert client.get("/v1/jobs").json()["total"] == 0


def test_verify_is_resolved_into_the_spec_and_counts_only_the_verified_runs(
    client: TestClient, store: JobStore  # noqa: F811
) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "verify": {"top": 1, "random": 2}})
    assert response.status_code == 202, response.text
    assert response.json()["progress"]["total"] == 2 * 3  # two prompts × three verified components × one run
    spec = present(store.spec(response.json()["id"]))
    assert spec.verify is not None and (spec.verify.top, spec.verify.random) == (1, 2)


def test_a_patching_job_refuses_verify(client: TestClient) -> None:  # noqa: F811
    body = {"model": "tiny", "intervention": "patch", "pairs": [{"clean": TWO[0], "corrupted": TWO[1],
                                                                 "answer": " France", "counterfactual": " Germany"}],
            "verify": {"top": 1}}
    problem = assert_problem(client.post("/v1/jobs", json=body), 422, "verify")
    assert problem["field"] == "verify"


# --- through the real stack -----------------------------------------------------------------------------------------

live_url = estimate_fixtures.live_url  # the live API, one per module

TOP, RANDOM = 3, 2


def test_a_verify_job_equals_the_estimates_job_and_the_plain_job_of_its_verified_components(
    live_url: str, stack_env: dict[str, str], worker_setting: Callable[[str, str], None]
) -> None:
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")  # three estimate chunks, then three exact chunks
    with HydraClient(live_url) as hydra:
        estimated, _ = run_job(hydra, {**JOB, "estimates": ["atp", "atp_star"]})
        result, status = run_job(hydra, {**JOB, "estimates": ["atp", "atp_star"],
                                      "verify": {"top": TOP, "random": RANDOM}})
        block = present(result.summary.attribution)
        verified = present(block.verified)
        exact, _ = run_job(hydra, {**JOB, "components": verified})

    every = estimated.components
    verification = present(block.verification)
    assert verification.components == every and verification.ranked_by == "atp"
    assert (verification.top, verification.random, verification.seed) == (TOP, RANDOM, 3)

    # Its estimates of every component are the all-components estimates job's.
    assert [p.index for p in result.prompts] == [p.index for p in estimated.prompts] == list(range(len(PROMPTS)))
    for mine, theirs in zip(result.prompts, estimated.prompts, strict=True):
        everything, plain = present(mine.all_estimates), present(theirs.estimates)
        for method in METHODS:
            assert getattr(everything, method) == pytest.approx(getattr(plain, method), abs=ESTIMATE_TOL), method

    # The verification set: verification_set over the returned estimates' means, with the job's seed.
    means = np.array([present(p.all_estimates).atp for p in result.prompts]).mean(axis=0)
    assert verification.mean_estimates == pytest.approx(list(means), abs=1e-12)
    expected = [every[i] for i in verification_set(means, TOP, RANDOM, 3)]
    assert verified == expected == verification.verified == result.components
    assert len(verified) == TOP + RANDOM
    # (The top part, by the test's own sort: the TOP largest |mean atp|.)
    assert {every[i] for i in np.argsort(-np.abs(means), kind="stable")[:TOP]} <= set(verified)

    # The verified components' exact numbers are those of the plain job of exactly those components.
    assert exact.components == verified
    for mine, theirs in zip(result.prompts, exact.prompts, strict=True):
        assert mine.sources == theirs.sources and mine.target_id == theirs.target_id
        for field in EXACT_FIELDS:
            assert_same_numbers(msgspec.to_builtins(getattr(mine, field)),
                                msgspec.to_builtins(getattr(theirs, field)), field)
        # The per-prompt estimates beside them are phase 1's for those columns; the magnitudes are exact values.
        columns = [every.index(name) for name in verified]
        assert present(mine.estimates).atp == [present(mine.all_estimates).atp[c] for c in columns]
        assert len(present(mine.estimates).abs_total_effect) == len(verified)
    assert_same_numbers(msgspec.to_builtins(result.summary.components), msgspec.to_builtins(exact.summary.components))

    # The agreement is over the verified components; both phases' costs are reported.
    assert all(a.n_components == len(verified) for a in block.agreement)
    assert [e.component for e in block.errors if e.method == "atp"] == verified
    phases = {p.phase: p for p in verification.phases}
    assert list(phases) == ["estimates", "exact"]
    assert phases["estimates"].n_components == len(every) and phases["exact"].n_components == len(verified)
    assert all(p.seconds > 0 for p in phases.values())
    assert phases["exact"].model_evaluations_per_prompt == 1 + 2 + len(verified) * 2
    assert verification.exact_all_model_evaluations_per_prompt == 1 + 2 + len(every) * 2
    costs = {c.method: c for c in block.cost}
    assert phases["estimates"].model_evaluations_per_prompt == pytest.approx(
        sum(costs[m].model_evaluations for m in METHODS), rel=1e-12)
    # Progress counts the exact phase's ablated runs only.
    assert status.progress.total == status.progress.done == len(PROMPTS) * len(verified) * 2
    assert result.provenance.spec.verify is not None and result.provenance.spec.components == every

    # The exports have a row per prompt × verified component, with the estimates beside the exact values.
    export = f"{live_url}/v1/jobs/{result.id}/result"
    rows = list(csv.DictReader(io.StringIO(httpx.get(export, params={"format": "csv"}).raise_for_status().text)))
    assert [r["component"] for r in rows[: len(verified)]] == verified and len(rows) == len(PROMPTS) * len(verified)
    assert float(rows[1]["atp"]) == present(result.prompts[0].estimates).atp[1]
    assert httpx.get(export, params={"format": "parquet"}).status_code == 200
    with HydraClient(live_url) as hydra:
        assert hydra.figure(result.id, "estimates", "png")[:4] == b"\x89PNG"  # a point per prompt × verified one

    # `hydra-ablate result` says which components were verified, within 80 columns.
    from cli.views import summary_lines

    lines = summary_lines(result)
    assert f"  verified {len(verified)} of {len(every)} components exactly" in "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    assert_errors_in_lines(lines, present(result.summary.attribution))  # over the verified components

    # So does the job page, above the same agreement table as any job with estimates.
    page = httpx.get(f"{live_url}/ui/jobs/{result.id}").raise_for_status().text
    section = assert_estimates_on_page(page, result, "prompt")
    assert (
        f"{len(verified)} of {len(every)} components were ablated exactly (the top {TOP} by |mean atp|, "
        f"{RANDOM} more drawn with seed 3); the agreement and cost cover those"
    ) in section


def test_a_redelivered_estimate_chunk_does_not_send_the_exact_phase_twice(
    live_url: str, stack_env: dict[str, str]
) -> None:
    """The chunk that completed the estimates died before sending the exact phase: its redelivery sends it, once;
    every later redelivery of an estimate chunk sends nothing and runs nothing."""
    from worker.tasks import model_cache, run_chunk
    from worker.verify_jobs import estimate_only_chunk

    with HydraClient(live_url) as hydra:
        done, _ = run_job(hydra, {**JOB, "components": ["mlp", "attn"], "estimates": ["atp"],
                               "verify": {"top": 2, "random": 1}})
    spec = done.provenance.spec
    jobs = JobStore.from_settings(Settings.from_env())
    try:
        book = ChunkBook.for_store(jobs)
        job_id = jobs.create(spec, ablation_count(spec)).id
        estimate = plan_chunks(len(PROMPTS), 3)  # prompts 0-2 and 3-4, then the same ranges for the exact phase
        plan = estimate + [Chunk(2 + c.index, c.start, c.stop) for c in estimate]
        book.record_plan(job_id, plan, 3, estimate_chunks=2)

        assert run_chunk.apply(args=[job_id, 0, 0, 3]).get() == "recorded"
        # Chunk 1 finished and was recorded, but its worker died before sending the exact phase.
        loaded = model_cache().get("tiny-llama")
        assert book.record_result(job_id, 1, estimate_only_chunk(job_id, spec, loaded, 1, 3, 5)) == 2
        assert book.verified(job_id) is None and set(book.task_ids(job_id)) == set()
        # Its message comes back: the chunk is not run again, the exact phase is sent.
        assert run_chunk.apply(args=[job_id, 1, 3, 5]).get() == "estimated"
        sent = book.task_ids(job_id)
        assert set(sent) == {2, 3}
        # Any further redelivery of an estimate chunk sends nothing more.
        for _ in range(2):
            assert run_chunk.apply(args=[job_id, 1, 3, 5]).get() == "duplicate"
            assert run_chunk.apply(args=[job_id, 0, 0, 3]).get() == "duplicate"
        deadline = time.monotonic() + 120
        while present(jobs.status(job_id)).status not in {"succeeded", "failed"} and time.monotonic() < deadline:
            time.sleep(0.05)
        final = present(jobs.status(job_id))
        assert final.status == "succeeded", final.error
        time.sleep(0.3)  # a second exact phase would have been sent by now
        assert book.task_ids(job_id) == sent
        assert book.deliveries(job_id) == {0: 1, 2: 1, 3: 1}  # each exact chunk ran once; chunk 1 never re-ran
        result = msgspec.json.decode(jobs.result(job_id) or b"", type=JobResult)
        assert present(result.summary.attribution).verified == present(done.summary.attribution).verified
        assert_same_numbers(msgspec.to_builtins(result.prompts), msgspec.to_builtins(done.prompts))
    finally:
        jobs.close()



def test_the_ranking_uses_atp_or_atp_star_when_only_it_was_asked_for() -> None:
    """The ranking estimate and the chosen names, on hand-made phase-1 rows (no model)."""
    from types import SimpleNamespace

    from hydra_ablate_client.wire import ComponentEstimates, JobSpec, Verify
    from service.core.chunk_book import PromptEstimates
    from worker.verify_jobs import choose_verified, ranked_method

    components = ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2"]
    spec = JobSpec(model="tiny-llama", prompts=PROMPTS[:2], answers=None, counterfactuals=None, components=components,
                   ablation="resample", positions="final", metric="logit", norm_scale="clean", resample_samples=1,
                   resample_from="random", mean_reference_prompts=None, seed=3, estimates=["atp_star"],
                   verify=Verify(top=1, random=1))
    both = msgspec.structs.replace(spec, estimates=["atp", "atp_star"])
    assert ranked_method(spec) == "atp_star" and ranked_method(both) == "atp"
    # atp says mlp.1 (|mean| 3), atp_star says attn.0 (mean 5).
    atp = [[0.0, 1.0, 0.0, -3.0, 0.5], [0.0, 1.0, 0.0, -3.0, 0.5]]
    star = [[5.0, 0.0, 1.0, 0.0, 0.0], [5.0, 0.0, 1.0, 0.0, 0.0]]
    rows = [PromptEstimates(index=i, estimates=ComponentEstimates(atp=a, atp_star=b))
            for i, (a, b) in enumerate(zip(atp, star, strict=True))]
    chunk: Any = SimpleNamespace(index=0, estimated=rows)  # choose_verified reads only these two fields
    star_pick, atp_pick = choose_verified(spec, [chunk]), choose_verified(both, [chunk])
    assert "attn.0" in star_pick and "mlp.1" in atp_pick and len(star_pick) == len(atp_pick) == 2
    assert star_pick == [components[i] for i in verification_set(np.mean(star, axis=0), 1, 1, 3)]
    assert atp_pick == [components[i] for i in verification_set(np.mean(atp, axis=0), 1, 1, 3)]
