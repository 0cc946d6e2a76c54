"""The patching_grid figure of patching jobs and the knockout_response figure of ablation jobs with knockouts,
through the real stack (uvicorn, Redis, Celery worker): the route serves PNGs of the asked size, the plotted
numbers (the pure functions behind each figure) equal values recomputed here from the result's per-pair scores and
per-prompt responses, an inapplicable figure is a 400 naming the ones that apply, and the web job page shows the
figures that apply inline.

With HYDRA_FIGURE_DIR set, the PNGs are also written there, to look at."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobResult, PatchingResult
from service.core.ioi_pairs import IoiPair, ioi_pairs
from service.rendering.estimate_figure import patch_points
from service.rendering.figures import applicable_figures, render, shown_figures
from service.rendering.knockout_figure import MAX_SETS, knockout_responses
from service.rendering.patch_figure import _token_label, patching_grids
from tests.checks import present
from tests.patch_fixtures import finished_job, wire_pairs
from tests.test_api import assert_problem

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dirs: dict[str, str]) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dirs["tiny-llama"])


def _pairs(tokenizer: Any, n: int, *, same_length: bool) -> list[IoiPair]:
    """n IOI pairs all of one token length, or of at least two lengths."""
    drawn = ioi_pairs(40, 7, lambda text: tokenizer(text, add_special_tokens=False).input_ids)
    length = {p.clean: len(tokenizer(p.clean).input_ids) for p in drawn}
    first = length[drawn[0].clean]
    if same_length:
        chosen = [p for p in drawn if length[p.clean] == first][:n]
    else:
        other = next(p for p in drawn if length[p.clean] != first)
        chosen = [drawn[0], other, *[p for p in drawn[1:] if p is not other]][:n]
    assert len(chosen) == n
    return chosen


def _figure(live_url: str, job_id: str, name: str, *, ink: float = 0.03, **params: Any) -> bytes:
    response = httpx.get(f"{live_url}/v1/jobs/{job_id}/figures/{name}", params=params, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    data = response.content
    assert data[:8] == PNG
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (params.get("width", 1200), params.get("height", 800))
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 245).mean() > ink, "almost everything is white: nothing was drawn"
    where = os.environ.get("HYDRA_FIGURE_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"{name}-{job_id[:8]}.png").write_bytes(data)
    return data


def _expected_cell(patching: PatchingResult, site: str, position: int | None) -> tuple[float, bool]:
    """The mean per-pair score at (site, position), or, where no pair was scored, the pooled score of the pairs'
    mean metrics; recomputed from the pairs, not read off the summary."""
    s = patching.sites.index(site)
    scores, patched, clean, corrupted = [], [], [], []
    for pair in patching.pairs:
        c = len(pair.positions) - 1 if position is None else (pair.positions.index(position)
                                                               if position in pair.positions else None)
        if c is None:
            continue
        score = pair.patching_score[s][c]
        if score is not None:
            scores.append(score)
        patched.append(pair.patched_metric[s][c])
        clean.append(pair.clean_metric)
        corrupted.append(pair.corrupted_metric)
    if scores:
        return sum(scores) / len(scores), False
    base, source = (corrupted, clean) if patching.direction == "denoise" else (clean, corrupted)
    gap = np.mean(source) - np.mean(base)
    if abs(gap) < patching.epsilon:
        return math.nan, False
    return float((np.mean(patched) - np.mean(base)) / gap), True


def _check_grids(result: JobResult) -> None:
    """Every cell of every grid against the recomputed value of its site (and position); every site drawn once."""
    patching = present(result.patching)
    plotted = patching_grids(result)
    drawn = []
    for grid in plotted.grids:
        assert len(grid.values) == len(grid.rows) and all(len(row) == len(grid.columns) for row in grid.values)
        for r in range(len(grid.rows)):
            for c in range(len(grid.columns)):
                site = grid.sites[r][c]
                if site is None:
                    assert math.isnan(grid.values[r][c])
                    continue
                drawn.append((site, c))
                position = c if patching.positions == "all" else None
                value, pooled = _expected_cell(patching, site, position)
                if math.isnan(value):
                    assert math.isnan(grid.values[r][c]), (site, position)
                else:
                    assert grid.values[r][c] == pytest.approx(value, abs=1e-9), (site, position)
                assert grid.pooled[r][c] == pooled
    sites = {site for site, _ in drawn}
    assert sites == set(patching.sites) and not plotted.left_out


def test_patching_grid_of_all_positions(live_url: str, tokenizer: Any) -> None:
    pairs = _pairs(tokenizer, 3, same_length=True)
    job_id, result = finished_job(live_url, {"intervention": "patch", "pairs": wire_pairs(pairs),
                                             "components": ["resid_pre", "attn", "mlp"], "positions": "all", "seed": 1})
    _check_grids(result)
    plotted = patching_grids(result)
    assert [g.title for g in plotted.grids] == ["resid_pre", "attn", "mlp"]
    assert all(g.rows == ["0", "1", "2"] for g in plotted.grids)  # the tiny model's three layers
    # The x labels are the first clean prompt's tokens, as the model read them.
    ids = tokenizer(pairs[0].clean).input_ids
    assert plotted.token_labels and not plotted.uneven
    assert plotted.grids[0].columns == [_token_label(tokenizer.decode([t])) for t in ids]
    assert present(result.patching).pairs[0].clean_tokens == [tokenizer.decode([t]) for t in ids]
    _figure(live_url, job_id, "patching_grid")
    _figure(live_url, job_id, "patching_grid", width=900, height=600)

    # Every other figure draws ablation results: a 400 that names the one that applies.
    problem = assert_problem(httpx.get(f"{live_url}/v1/jobs/{job_id}/figures/te_vs_de"), 400, "patching job",
                             "patching_grid")
    assert "te_vs_de" in problem["detail"]
    # No estimates asked for: no estimates figure, and a 400 that says how to ask.
    assert "estimates" not in applicable_figures(result)
    assert_problem(httpx.get(f"{live_url}/v1/jobs/{job_id}/figures/estimates"), 400, "has none", '"estimates"')
    with HydraClient(live_url) as hydra:
        assert hydra.figure(job_id, "patching_grid", "svg").lstrip().startswith(b"<?xml")
    page = httpx.get(f"{live_url}/ui/jobs/{job_id}")
    assert page.status_code == 200, page.text[:2000]
    assert f"/ui/jobs/{job_id}/figures/patching_grid" in page.text and "figures/te_vs_de" not in page.text
    ui_png = httpx.get(f"{live_url}/ui/jobs/{job_id}/figures/patching_grid")
    assert ui_png.status_code == 200 and ui_png.content[:8] == PNG


def test_patching_grid_of_pairs_of_different_lengths(live_url: str, tokenizer: Any) -> None:
    pairs = _pairs(tokenizer, 3, same_length=False)
    job_id, result = finished_job(live_url, {"intervention": "patch", "pairs": wire_pairs(pairs),
                                             "components": ["resid_pre"], "positions": "all", "direction": "noise"})
    _check_grids(result)
    plotted = patching_grids(result)
    longest = max(len(tokenizer(p.clean).input_ids) for p in pairs)
    assert plotted.uneven and not plotted.token_labels
    assert plotted.grids[0].columns == [str(p) for p in range(longest)]
    _figure(live_url, job_id, "patching_grid")


def test_patching_grid_of_heads_at_the_final_position(live_url: str, tokenizer: Any) -> None:
    pairs = _pairs(tokenizer, 4, same_length=False)
    sites = ["head", "head.1.1.q", "head.1.3.pattern", "head.2.2.pattern", "resid_pre.0", "attn.1", "mlp.2"]
    job_id, result = finished_job(live_url, {"intervention": "patch", "pairs": wire_pairs(pairs), "components": sites,
                                             "positions": "final", "seed": 2, "knockouts": [["head.1.0", "head.2.1"]]})
    _check_grids(result)
    plotted = patching_grids(result)
    titles = [g.title for g in plotted.grids]
    assert titles == ["resid_pre / attn / mlp", "head output", "head query (q)", "head attention pattern",
                      "knockout sets (patched together)"]
    assert plotted.grids[-1].rows == ["head.1.0+head.2.1"] and plotted.grids[-1].columns == ["final"]
    output = plotted.grids[1]
    assert output.rows == ["0", "1", "2"] and output.columns == ["0", "1", "2", "3"]  # 3 layers × 4 heads
    assert output.sites[2][3] == "head.2.3"
    layer_kinds = plotted.grids[0]
    assert layer_kinds.columns == ["resid_pre", "attn", "mlp"] and layer_kinds.sites[0][1] is None
    assert plotted.grids[2].columns == ["0", "1", "2", "3"]  # every head grid shares the head axis
    pattern = plotted.grids[3]
    assert pattern.rows == ["1", "2"] and pattern.sites[1][2] == "head.2.2.pattern" and pattern.sites[0][2] is None
    _figure(live_url, job_id, "patching_grid")


    # Where every pair is flagged there is no per-pair score: the cells fall back to the pooled score (of the pairs'
    # mean metrics), marked as such; recomputed from the metrics in _expected_cell.
    patching = present(result.patching)
    flagged = msgspec.structs.replace(
        patching,
        pairs=[msgspec.structs.replace(p, flagged=True, patching_score=[[None] * len(p.positions)
                                                                         for _ in patching.sites])
               for p in patching.pairs],
        summary=[msgspec.structs.replace(item, n_scored=0, score_mean=None, score_ci_low=None, score_ci_high=None)
                 for item in patching.summary],
        n_flagged=len(patching.pairs),
    )
    pooled_result = msgspec.structs.replace(result, patching=flagged)
    _check_grids(pooled_result)
    assert all(all(row) for grid in patching_grids(pooled_result).grids for row, sites in zip(grid.pooled, grid.sites,
               strict=True) if all(sites))
    data = render(pooled_result, "patching_grid", "png")
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (1200, 800)
    if os.environ.get("HYDRA_FIGURE_DIR"):
        (Path(os.environ["HYDRA_FIGURE_DIR"]) / "patching_grid-pooled.png").write_bytes(data)


def test_estimates_of_a_patching_job(live_url: str, tokenizer: Any) -> None:
    """A patching job with estimates draws them: one panel per method, every (pair, site) a point at (exact effect,
    estimate), |effect| for AtP*, grouped by site kind; the figure route and the job page serve it."""
    pairs = _pairs(tokenizer, 3, same_length=False)
    sites = ["resid_pre.1", "attn.0", "mlp.2", "head.1.2", "head.2.1.q", "head.0.3.pattern"]
    job_id, result = finished_job(live_url, {"intervention": "patch", "pairs": wire_pairs(pairs), "components": sites,
                                             "positions": "final", "estimates": ["atp", "atp_star"]})
    patching = present(result.patching)
    assert applicable_figures(result) == ("patching_grid", "estimates") == shown_figures(result)
    kinds = {"resid_pre": ["resid_pre.1"], "attn": ["attn.0"], "mlp": ["mlp.2"], "head": ["head.1.2"],
             "head q": ["head.2.1.q"], "head pattern": ["head.0.3.pattern"]}
    for method in ("atp", "atp_star"):
        points = patch_points(patching, method)
        assert list(points) == list(kinds)  # in the legend's order
        for kind, members in kinds.items():
            s = patching.sites.index(members[0])
            exact = [present(p.estimates).effect[s][0] for p in patching.pairs]
            expected_x = [abs(v) for v in exact] if method == "atp_star" else exact
            expected_y = [getattr(present(p.estimates), method)[s][0] for p in patching.pairs]
            assert points[kind] == (expected_x, expected_y), (method, kind)
            # The exact effect is the patched run's metric less the base (corrupted, for denoise) run's.
            assert exact == pytest.approx([p.patched_metric[s][0] - p.corrupted_metric for p in patching.pairs],
                                          abs=1e-6)
    _figure(live_url, job_id, "estimates")
    page = httpx.get(f"{live_url}/ui/jobs/{job_id}")
    assert page.status_code == 200, page.text[:2000]
    assert "figures/estimates" in page.text and "figures/patching_grid" in page.text
    assert httpx.get(f"{live_url}/ui/jobs/{job_id}/figures/estimates").content[:8] == PNG

    # Flagged pairs are drawn too (nothing is divided by their gap).
    flagged = msgspec.structs.replace(patching, pairs=[msgspec.structs.replace(p, flagged=True)
                                                       for p in patching.pairs], n_flagged=len(patching.pairs))
    assert patch_points(flagged, "atp") == patch_points(patching, "atp")
    data = render(msgspec.structs.replace(result, patching=flagged), "estimates", "png")
    assert data[:8] == PNG


KNOCKOUTS = [["attn.0", "head.2.1"], ["head.0.1", "head.1.2", "mlp.1"], ["mlp.0", "mlp.2"], ["attn.1", "attn.2"],
             ["mlp.0", "head.1.0"]]
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "My favourite colour is",
           "The opposite of hot is"]


def test_knockout_response_against_the_per_prompt_responses(live_url: str) -> None:
    job_id, result = finished_job(live_url, {"prompts": PROMPTS, "components": ["mlp.2"], "knockouts": KNOCKOUTS,
                                             "ablation": "mean", "metric": "logit"})
    drawn, left_out = knockout_responses(result)
    assert left_out == len(KNOCKOUTS) - MAX_SETS == 1
    assert [b.knockout for b in drawn] == ["+".join(s) for s in KNOCKOUTS[:MAX_SETS]]
    n = len(result.prompts)
    t = 3.182  # t(0.975, 3): four prompts
    for bars, members in zip(drawn, KNOCKOUTS, strict=False):
        head_layers = {int(m.split(".")[1]) for m in members if m.startswith("head.")}
        c = result.components.index(bars.knockout)
        assert bars.basis == result.response_basis
        for d, name in enumerate(result.response_basis):
            values = np.array([p.response[c][d] for p in result.prompts])
            half = t * values.std(ddof=1) / math.sqrt(n)
            assert bars.mean[d] == pytest.approx(values.mean(), abs=1e-9)
            assert present(bars.ci_low[d]) == pytest.approx(values.mean() - half, abs=1e-9)
            assert present(bars.ci_high[d]) == pytest.approx(values.mean() + half, abs=1e-9)
            assert bars.in_set[d] == (name in members), (bars.knockout, name)
            holds = name.startswith("attn.") and int(name.split(".")[1]) in head_layers
            assert bars.holds_member[d] == holds, (bars.knockout, name)
        # CE is the sum of the response row: the bars add up to the set's mean compensatory effect.
        ce = np.mean([p.compensatory_effect[c] for p in result.prompts])
        assert sum(bars.mean) == pytest.approx(ce, abs=1e-6)
    _figure(live_url, job_id, "knockout_response")

    problem = assert_problem(httpx.get(f"{live_url}/v1/jobs/{job_id}/figures/patching_grid"), 400,
                             "draws a patching job", "ablation job")
    assert "knockout_response" in problem["detail"] and "te_vs_de" in problem["detail"]
    page = httpx.get(f"{live_url}/ui/jobs/{job_id}")
    assert page.status_code == 200, page.text[:2000]
    assert "figures/knockout_response" in page.text and "figures/patching_grid" not in page.text


def test_knockout_response_of_a_job_without_sets_says_how_to_ask(live_url: str) -> None:
    job_id, result = finished_job(live_url, {"prompts": PROMPTS[:2], "components": ["mlp.2"]})
    assert knockout_responses(result) == ([], 0)
    _figure(live_url, job_id, "knockout_response", ink=0.002)  # a line of text saying how to ask for sets
    page = httpx.get(f"{live_url}/ui/jobs/{job_id}").text
    assert "figures/knockout_response" not in page and "figures/te_vs_de" in page
