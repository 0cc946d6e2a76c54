"""Attribution-patching estimates as a job option (JobRequest.estimates): each refusal a 422 naming the field, and a
job through the real stack (uvicorn, Redis, Celery worker) whose estimates equal run_attribution called directly on
an independently loaded copy of the model, whose exact parts equal the same job without estimates, whose summary's
agreement numbers are recomputed here from the returned rows (a rank correlation and top-k recall written with
numpy argsort, not worker/attribution_summary.py), and whose exports, tables and figure carry the estimates."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from litestar.testing import TestClient
from PIL import Image
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobRequest, JobResult
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.figure_style import MIN_FONT_PT
from service.rendering.figures import render
from service.rendering.parquet import from_parquet
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
from tests.refusals import Refusal, assert_refused, refusal_cases
from tests.test_api import TWO, assert_problem, client, settings, store  # noqa: F401 (fixtures)
from worker.engine.attribution import run_attribution
from worker.engine.types import SweepInputs, SweepSpec

ESTIMATE_TOL = 1e-5
SUMMARY_TOL = 1e-9
TINY_JOB = {"model": "tiny", "prompts": TWO, "estimates": ["atp"]}

REFUSED: list[Refusal] = [
    (
        "knockout sets",
        {"knockouts": [["attn.0", "mlp.1"]]},
        ("estimates cover single components", "drop knockouts or estimates"),
        "estimates",
    ),
    (
        "sources with another top token",
        {"resample_sources": "different_target", "prompts": [*TWO, "Rome is the capital of"]},
        ("resample_sources 'different_target'", "use resample_sources 'any'"),
        "resample_sources",
    ),
    ("a method twice", {"estimates": ["atp", "atp"]}, ("'atp' twice", "name each method once"), "estimates"),
]


@refusal_cases(REFUSED)
def test_unsupported_estimates_are_a_422_naming_the_field(
    client: TestClient,  # noqa: F811
    store: JobStore,  # noqa: F811
    body: dict[str, Any],
    fragments: tuple[str, ...],
    field: str,
) -> None:
    assert_refused(client, TINY_JOB, body, fragments, field)


def test_an_unknown_method_is_refused_by_the_schema(client: TestClient) -> None:  # noqa: F811
    problem = assert_problem(client.post("/v1/jobs", json={**TINY_JOB, "estimates": ["ig"]}), 400, "estimates")
    assert "atp" in problem["detail"] or problem.get("errors")


def test_estimates_are_resolved_into_the_spec(client: TestClient, store: JobStore) -> None:  # noqa: F811
    """In the engine's order; the job's ablated runs (its progress) are the exact job's."""
    response = client.post("/v1/jobs", json={**TINY_JOB, "estimates": ["atp_star", "atp"], "components": ["mlp"]})
    assert response.status_code == 202, response.text
    assert response.json()["progress"]["total"] == 2 * 4
    spec = present(store.spec(response.json()["id"]))
    assert spec.estimates == ["atp", "atp_star"]
    plain = client.post("/v1/jobs", json={"model": "tiny", "prompts": TWO})
    assert present(store.spec(plain.json()["id"])).estimates == []


def test_the_result_size_limit_counts_the_estimates() -> None:
    """A job just under the limit without estimates is refused with them: their numbers are stored too."""
    from service.core.errors import ValidationProblem
    from service.core.resolve import resolve
    from tests.test_api import TINY

    body = {"model": "tiny", "prompts": TWO, "components": ["mlp"]}
    per_pair = 2 * TINY.n_layers + 8
    limit = Settings(max_result_values=2 * TINY.n_layers * per_pair)
    assert resolve(JobRequest(**body), {"tiny": TINY}, limit).estimates == []  # type: ignore[arg-type]
    with pytest.raises(ValidationProblem, match="numbers"):
        resolve(JobRequest(**body, estimates=["atp"]), {"tiny": TINY}, limit)  # type: ignore[arg-type]


# --- through the real stack -----------------------------------------------------------------------------------------

live_url = estimate_fixtures.live_url  # the live API, one per module

ESTIMATE_COLUMNS = [*METHODS, "abs_total_effect"]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks 1 … n (ties share their mean rank), by sorting: the test's own, not the summary's."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    rx, ry = _ranks(x) - _ranks(x).mean(), _ranks(y) - _ranks(y).mean()
    scale = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return None if scale == 0 else float((rx * ry).sum() / scale)


def _recall(exact: np.ndarray, estimate: np.ndarray, k: int) -> float:
    """The share of the k largest |exact| among the k largest |estimate| (ties: the lower index first)."""
    def top(values: np.ndarray) -> set[int]:
        return {int(i) for i in np.lexsort((np.arange(len(values)), -np.abs(values)))[:k]}

    return len(top(exact) & top(estimate)) / k


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def _run(hydra: HydraClient, body: dict[str, Any]) -> JobResult:
    return run_job(hydra, body)[0]


def test_an_estimates_job_matches_the_engine_and_the_plain_job_and_exports_and_draws(
    live_url: str, tiny_model_dirs: dict[str, str], tmp_path: Path
) -> None:
    from worker.tasks import model_cache

    cached = model_cache().get("tiny-llama").model  # the worker's own copy (an in-process worker)
    flags = [p.requires_grad for p in cached.parameters()]
    hooks = _hooks(cached)
    with HydraClient(live_url) as hydra:
        plain = _run(hydra, {**JOB, "keep_samples": True})
        result = _run(hydra, {**JOB, "estimates": ["atp", "atp_star"]})

    # Nothing left on the worker's model: no hook, no gradient, requires_grad as it was.
    assert [p.requires_grad for p in cached.parameters()] == flags
    assert all(p.grad is None for p in cached.parameters())
    assert _hooks(cached) == hooks

    # The exact parts are the plain job's; the per-run samples kept for the magnitudes are not returned.
    assert result.components == plain.components
    for mine, theirs in zip(result.prompts, plain.prompts, strict=True):
        assert mine.sources == theirs.sources and mine.target_id == theirs.target_id
        for field in EXACT_FIELDS:
            assert getattr(mine, field) == getattr(theirs, field), field
        assert mine.samples is None and theirs.estimates is None
        assert mine.estimates is not None and theirs.samples is not None
        magnitudes = [float(np.mean([abs(s.total_effect) for s in runs])) for runs in theirs.samples]
        assert mine.estimates.abs_total_effect == pytest.approx(magnitudes, abs=1e-12)
    assert plain.summary.attribution is None
    exact_summary = {c.component: c.total_effect_mean for c in plain.summary.components}
    assert {c.component: c.total_effect_mean for c in result.summary.components} == exact_summary

    # The estimates are run_attribution's on an independently loaded copy of the model, same inputs.
    location = tiny_model_dirs["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    ids = [torch.tensor(tokenizer(p).input_ids) for p in PROMPTS]
    spec = SweepSpec(components=tuple(result.components), ablation="resample", resample_samples=2,
                     resample_from="random", metric="logit", seed=3)
    direct = run_attribution(model, spec, SweepInputs(token_ids=ids), estimates=("atp", "atp_star"))
    assert direct.nodes == result.components and direct.methods == METHODS
    for served, expected in zip(result.prompts, direct.prompts, strict=True):
        assert served.index == expected.index and served.sources == expected.sources
        assert served.estimates is not None
        for method in METHODS:
            assert getattr(served.estimates, method) == pytest.approx(expected.values[method], abs=ESTIMATE_TOL)

    # The summary's agreement, recomputed from the returned rows.
    block = result.summary.attribution
    assert block is not None and block.methods == METHODS
    n_prompts, n_components = len(result.prompts), len(result.components)
    exact = np.array([p.total_effect for p in result.prompts])
    magnitude = np.array([present(p.estimates).abs_total_effect for p in result.prompts])
    for a in block.agreement:
        estimate = np.array([getattr(present(p.estimates), a.method) for p in result.prompts])
        truth = magnitude if a.method == "atp_star" else exact
        assert a.compared_with == ("abs_total_effect" if a.method == "atp_star" else "total_effect")
        assert (a.n_prompts, a.n_components, a.k) == (n_prompts, n_components, 10)
        per_prompt = [_spearman(truth[p], estimate[p]) for p in range(n_prompts)]
        assert a.spearman_per_prompt_mean == pytest.approx(np.mean([r for r in per_prompt if r is not None]),
                                                           abs=SUMMARY_TOL)
        assert a.spearman_pooled == pytest.approx(_spearman(truth.ravel(), estimate.ravel()), abs=SUMMARY_TOL)
        assert a.spearman_of_means == pytest.approx(_spearman(truth.mean(0), estimate.mean(0)), abs=SUMMARY_TOL)
        recalls = [_recall(truth[p], estimate[p], 10) for p in range(n_prompts)]
        assert a.recall_at_k_per_prompt_mean == pytest.approx(np.mean(recalls), abs=SUMMARY_TOL)
        assert a.recall_at_k_of_means == pytest.approx(_recall(truth.mean(0), estimate.mean(0), 10), abs=SUMMARY_TOL)
        assert a.mean_abs_error == pytest.approx(np.abs(estimate - truth).mean(), abs=SUMMARY_TOL)
        worst = a.largest_misses[0]
        assert abs(worst.error) == pytest.approx(np.abs(estimate - truth).max(), abs=SUMMARY_TOL)
        assert worst.estimate - worst.exact == pytest.approx(worst.error, abs=SUMMARY_TOL)
    costs = {c.method: c for c in block.cost}
    assert list(costs) == ["exact", *METHODS]
    assert costs["exact"].model_evaluations == 1 + 2 + n_components * 2
    assert costs["atp"].model_evaluations == 1 + 2 + 1  # clean, two noise runs, one backward pass
    assert all(c.seconds > 0 and c.speedup is not None for c in block.cost)
    errors = [e for e in block.errors if e.method == "atp"]
    assert [e.component for e in errors] == result.components
    ce = np.array([p.compensatory_effect for p in result.prompts])
    atp = np.array([present(p.estimates).atp for p in result.prompts])
    for c, e in enumerate(errors):
        assert e.error_mean == pytest.approx((atp[:, c] - exact[:, c]).mean(), abs=SUMMARY_TOL)
        assert e.compensatory_effect_mean == pytest.approx(ce[:, c].mean(), abs=SUMMARY_TOL)
        assert e.error_vs_ce.n == n_prompts and e.error_vs_ce.x == "compensatory_effect"
        if e.error_vs_ce.slope is not None:
            slope = np.polyfit(ce[:, c], atp[:, c] - exact[:, c], 1)[0]
            assert e.error_vs_ce.slope == pytest.approx(slope, rel=1e-6, abs=1e-9)

    # `hydra-ablate result` names each method's agreement in its summary lines, each within 80 columns.
    from cli.views import summary_lines

    lines = summary_lines(result)
    assert sum(line.startswith(f"  {m} ") for line in lines for m in METHODS) == 3
    assert all(len(line) <= 80 for line in lines)
    assert not any("estimates" in line for line in summary_lines(plain))
    # … and how much of each method's miss is compensation: the result's `errors`, in lines of 80 columns that an
    # 80-column terminal prints unbroken.
    assert_errors_in_lines(lines, block)
    from cli.views import result_view

    console = Console(width=80, record=True, color_system=None)
    console.print(result_view(result, width=80))
    printed = [line.rstrip() for line in console.export_text().splitlines()]
    assert all(len(line) <= 80 for line in printed)
    assert all(line in printed for line in lines if line.startswith("    ")), "an error row was wrapped"
    assert not any("how much of the miss" in line for line in summary_lines(plain))

    # The job page shows the same agreement per prompt, each method's cost and largest misses; none for the plain job.
    page = httpx.get(f"{live_url}/ui/jobs/{result.id}").raise_for_status().text
    section = assert_estimates_on_page(page, result, "prompt")
    assert "Position</th>" not in section and "Every position" not in section
    assert 'id="estimates"' not in httpx.get(f"{live_url}/ui/jobs/{plain.id}").raise_for_status().text

    # Tables and exports carry one column per method beside total_effect; empty for the plain job.
    table = result.to_pandas()
    assert set(ESTIMATE_COLUMNS) <= set(table.columns)
    row = table[(table["prompt_index"] == 1) & (table["component"] == result.components[3])].iloc[0]
    assert row["atp_star"] == present(result.prompts[1].estimates).atp_star[3]  # type: ignore[index]
    assert plain.to_pandas()["atp"].isna().all()
    export = f"{live_url}/v1/jobs/{result.id}/result"
    rows = list(csv.DictReader(io.StringIO(httpx.get(export, params={"format": "csv"}).raise_for_status().text)))
    assert len(rows) == n_prompts * n_components
    first = rows[n_components + 2]  # prompt 1, component 2
    assert first["prompt_index"] == "1" and first["component"] == result.components[2]
    for method in ESTIMATE_COLUMNS:
        assert float(first[method]) == getattr(result.prompts[1].estimates, method)[2]
    plain_rows = csv.DictReader(io.StringIO(
        httpx.get(f"{live_url}/v1/jobs/{plain.id}/result", params={"format": "csv"}).raise_for_status().text))
    assert all(r["atp"] == "" and r["atp_star"] == "" for r in plain_rows)
    raw = httpx.get(export, params={"format": "parquet"}).raise_for_status().content
    parquet = pq.read_table(io.BytesIO(raw))
    assert set(ESTIMATE_COLUMNS) <= set(parquet.schema.names)
    assert from_parquet(parquet).prompts == result.prompts  # the estimates come back from the file

    # The figure: every estimate against its exact value, coloured by CE.
    with HydraClient(live_url) as hydra:
        png = hydra.figure(result.id, "estimates", "png")
        with Image.open(io.BytesIO(png)) as image:
            assert image.size == (1200, 800)
            pixels = np.asarray(image.convert("L"))
        assert (pixels < 245).mean() > 0.03 and len(np.unique(pixels)) > 32  # drawn, not a blank page
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            svg = render(result, "estimates", "svg").decode()
        sizes = [float(size) for size in re.findall(r"font-size:\s*([\d.]+)px", svg)]
        assert sizes and min(sizes) >= MIN_FONT_PT
        assert "AtP* against the exact |total effect|" in svg and "compensatory effect CE" in svg
        (tmp_path / "estimates.png").write_bytes(png)
        Path("/tmp/estimates-figure.png").write_bytes(png)  # to look at once
        assert hydra.figure(plain.id, "estimates", "png")[:4] == b"\x89PNG"  # says how to ask for estimates


def test_chunks_merge_into_the_job_in_one_piece(live_url: str) -> None:
    """A job split into chunks (two here) carries the estimates of the job run in one piece, and its summary weighs
    the chunks' costs by their prompts."""
    from worker.chunk_execution import execute, execute_chunk, merge_chunks
    from worker.tasks import model_cache

    with HydraClient(live_url) as hydra:
        spec = _run(hydra, {**JOB, "estimates": ["atp"], "components": ["attn", "mlp"]}).provenance.spec
    loaded = model_cache().get("tiny-llama")
    whole = execute("whole", spec, loaded)
    chunks = [execute_chunk("split", spec, loaded, 1, 2, 5), execute_chunk("split", spec, loaded, 0, 0, 2)]
    merged = merge_chunks("split", spec, chunks)
    assert [p.index for p in merged.prompts] == list(range(len(PROMPTS)))
    for a, b in zip(merged.prompts, whole.prompts, strict=True):
        assert a.estimates is not None and b.estimates is not None and a.estimates.atp_star is None
        assert a.estimates.atp == pytest.approx(b.estimates.atp, abs=ESTIMATE_TOL)
        assert a.estimates.abs_total_effect == pytest.approx(b.estimates.abs_total_effect, abs=ESTIMATE_TOL)
    split, one = present(merged.summary.attribution), present(whole.summary.attribution)
    assert split.methods == one.methods == ["atp"]
    assert present(split.agreement[0].spearman_pooled) == pytest.approx(present(one.agreement[0].spearman_pooled),
                                                                          abs=1e-6)
    costs = [c.estimate_costs for c in sorted(chunks, key=lambda c: c.index)]
    assert all(c is not None for c in costs)
    exact_seconds = [present(c)[0].seconds for c in costs]
    expected = (2 * exact_seconds[0] + 3 * exact_seconds[1]) / 5
    assert split.cost[0].method == "exact" and split.cost[0].seconds == pytest.approx(expected, rel=1e-12)


COMBINATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("mean ablation at every position", {"ablation": "mean", "positions": "all"}, {"ablation": "mean",
                                                                                    "positions": "all"}),
    ("zero ablation, centred logit", {"ablation": "zero", "metric": "centered_logit"},
     {"ablation": "zero", "metric": "centered_logit"}),
    ("two source draws", {"resample_samples": 1, "resample_from": "random", "source_seeds": 2, "seed": 5},
     {"resample_samples": 1, "resample_from": "random", "source_seeds": 2, "seed": 5}),
]


@pytest.mark.parametrize(("body", "engine"), [c[1:] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_other_supported_jobs_carry_the_engines_estimates(
    live_url: str, tiny_model_dirs: dict[str, str], body: dict[str, Any], engine: dict[str, Any]
) -> None:
    components = ["attn.0", "mlp.1", "head.2.1", "attn.2"]
    with HydraClient(live_url) as hydra:
        result = _run(hydra, {"model": "tiny-gpt2", "prompts": PROMPTS, "components": components,
                              "estimates": ["atp", "atp_star"], **body})
    location = tiny_model_dirs["tiny-gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    ids = [torch.tensor(tokenizer(p).input_ids) for p in PROMPTS]
    direct = run_attribution(model, SweepSpec(components=tuple(components), **engine), SweepInputs(token_ids=ids))
    runs = 2 if body.get("source_seeds") == 2 else 1
    for served, expected in zip(result.prompts, direct.prompts, strict=True):
        assert served.sources == expected.sources and len(expected.per_run["atp"][0]) == runs
        estimates = present(served.estimates)
        for method in METHODS:
            assert getattr(estimates, method) == pytest.approx(expected.values[method], abs=ESTIMATE_TOL), method
        if runs == 1:
            assert estimates.abs_total_effect == [abs(v) for v in served.total_effect]
    block = present(result.summary.attribution)
    assert [a.method for a in block.agreement] == METHODS
