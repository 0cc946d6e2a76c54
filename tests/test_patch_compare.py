"""The Compare page of activation-patching jobs, through the real stack (uvicorn, Redis, Celery worker): per site
(and position) each job's mean patching score with its interval side by side, recomputed here from the jobs'
per-pair scores; the figure, one panel per site kind; a selection of patching and ablation jobs is a 400 page that
says why, never a 500.

With HYDRA_FIGURE_DIR set, the comparison's PNG is also written there, to look at."""

from __future__ import annotations

import html
import io
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from hydra_ablate_client.wire import JobResult, PatchingResult
from service.rendering.job_comparison import Compared
from service.rendering.patch_comparison import (
    MAX_FIGURE_ROWS,
    MixedComparison,
    comparison_kind,
    figure_rows,
    patch_rows,
    site_kind,
)
from tests.checks import present
from tests.patch_fixtures import finished_job, tiny_ioi, wire_pairs

PNG = b"\x89PNG\r\n\x1a\n"
SITES = ["resid_pre", "attn.1", "mlp.0", "head.1.2", "head.2.0.pattern"]
KNOCKOUTS = [["head.1.2", "head.2.0"]]


def _mean_score(patching: PatchingResult, site: str, position: int | None) -> float | None:
    """The mean per-pair score at (site, position), recomputed from the pairs (None when no pair was scored)."""
    s = patching.sites.index(site)
    scores = []
    for pair in patching.pairs:
        if position is not None and position not in pair.positions:
            continue
        c = len(pair.positions) - 1 if position is None else pair.positions.index(position)
        score = pair.patching_score[s][c]
        if score is not None:
            scores.append(score)
    return sum(scores) / len(scores) if scores else None


@pytest.fixture(scope="module")
def jobs(live_url: str, llama: tuple[Any, Any]) -> dict[str, tuple[str, JobResult]]:
    """Three patching jobs over the same pairs (denoise and noise at the final position, denoise at every position)
    and one ablation job."""
    _, tokenizer = llama
    pairs = wire_pairs(tiny_ioi(tokenizer, 4, seed=3))
    body = {"intervention": "patch", "pairs": pairs, "components": SITES, "knockouts": KNOCKOUTS, "seed": 1}
    return {
        "denoise": finished_job(live_url, body),
        "noise": finished_job(live_url, {**body, "direction": "noise"}),
        "all": finished_job(live_url, {**body, "components": ["resid_pre", "mlp.0"], "knockouts": [],
                                       "positions": "all"}),
        "ablation": finished_job(live_url, {"prompts": [p["clean"] for p in pairs], "components": ["attn", "mlp"],
                                            "resample_samples": 2}),
    }


def test_the_compare_page_of_patching_jobs_puts_their_scores_side_by_side(
    live_url: str, jobs: dict[str, tuple[str, JobResult]]
) -> None:
    chosen = [jobs[name] for name in ("denoise", "noise", "all")]
    query = "&".join(f"ids={job_id}" for job_id, _ in chosen)
    page = httpx.get(f"{live_url}/ui/compare?{query}")
    assert page.status_code == 200, page.text[:2000]
    text = page.text
    assert "Compare 3 patching jobs" in text and 'id="compare-patching"' in text
    assert 'id="compare-paper"' not in text  # the ablation comparison's tables are not there
    table = text[text.index('id="compare-patching"'):]
    table = table[:table.index("</table>")]
    body_rows = table.split("<tr>")[2:]  # the header row first
    expected_keys = [(item.site, item.position) for item in present(chosen[0][1].patching).summary]
    expected_keys += [(item.site, item.position) for item in present(chosen[2][1].patching).summary
                      if (item.site, item.position) not in expected_keys]
    assert len(body_rows) == len(expected_keys)
    for row, (site, position) in zip(body_rows, expected_keys, strict=True):
        cells = [html.unescape(cell.split("</td>")[0]) for cell in row.split("<td>")[1:]]
        assert f'<th scope="row">{site}</th>' in row
        assert cells[0] == ("final" if position is None else str(position))
        for cell, (_, result) in zip(cells[1:], chosen, strict=True):
            patching = present(result.patching)
            item = next((i for i in patching.summary if (i.site, i.position) == (site, position)), None)
            if item is None:  # this job has no such row (another position scope)
                assert cell == "–", (site, position, cell)
                continue
            mean = _mean_score(patching, site, position)
            if mean is None:
                assert cell.startswith("–"), cell
            else:
                assert cell.startswith(f"{mean:.3f}"), (site, position, cell, mean)
            if item.score_ci_low is not None:
                assert f"[{item.score_ci_low:.3f}, {item.score_ci_high:.3f}]" in cell
            assert cell.endswith(f"({item.n_scored}/{item.n_pairs})")
    # The final-position jobs share every row; the every-position job has rows of its own.
    assert any(row.count("<td>–</td>") == 2 for row in body_rows)
    jobs_table = text[text.index('id="compare-jobs"'):]
    assert all(f"<td>{direction}</td>" in jobs_table for direction in ("denoise", "noise"))

    figure = httpx.get(f"{live_url}/ui/compare/figure?{query}", timeout=60)
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
    assert figure.content.startswith(PNG)
    image = Image.open(io.BytesIO(figure.content))
    assert image.size == (1200, 800)
    ink = float((np.asarray(image.convert("L")) < 245).mean())
    assert ink > 0.03, ink  # drawn, not blank
    folder = os.environ.get("HYDRA_FIGURE_DIR")
    if folder:
        Path(folder, "compare-patching.png").write_bytes(figure.content)


def test_patching_and_ablation_jobs_do_not_compare(live_url: str, jobs: dict[str, tuple[str, JobResult]]) -> None:
    """A selection of both kinds is a 400 page naming which job is which, for the page and for its figure."""
    patching_id, ablation_id = jobs["denoise"][0], jobs["ablation"][0]
    query = f"ids={patching_id}&ids={ablation_id}"
    for path in (f"/ui/compare?{query}", f"/ui/compare/figure?{query}"):
        reply = httpx.get(f"{live_url}{path}")
        assert reply.status_code == 400, (path, reply.status_code, reply.text[:500])
        assert reply.headers["content-type"].startswith("text/html")
        message = html.unescape(reply.text)
        assert "is an activation-patching job" in message and "an ablation job" in message
        assert "compare patching jobs with patching jobs and ablation jobs with ablation jobs" in message
    # Two ablation jobs still get the ablation comparison.
    other = finished_job(live_url, {"prompts": [f"Fact number {i} about the city of" for i in range(4)],
                                    "components": ["attn", "mlp"], "resample_samples": 2})[0]
    page = httpx.get(f"{live_url}/ui/compare?ids={ablation_id}&ids={other}")
    assert page.status_code == 200 and 'id="compare-paper"' in page.text


def test_the_comparisons_rows_and_kinds(jobs: dict[str, tuple[str, JobResult]]) -> None:
    """The pure parts: a selection's kind, the rows in the first job's order, one figure panel's rows."""
    compared = [Compared(name, jobs[name][1]) for name in ("denoise", "all")]
    assert comparison_kind(compared) == "patching"
    assert comparison_kind([Compared("a", jobs["ablation"][1])] * 2) == "ablation"
    with pytest.raises(MixedComparison, match="denoise is an activation-patching job and ablation an ablation job"):
        comparison_kind([compared[0], Compared("ablation", jobs["ablation"][1])])
    rows = patch_rows(compared)
    first = present(jobs["denoise"][1].patching)
    assert rows.keys[: len(first.summary)] == [(item.site, item.position) for item in first.summary]
    assert {site_kind(site) for site, _ in rows.keys} == {"resid_pre", "attn", "mlp", "head", "knockout"}
    every_position, left_out = figure_rows(rows, "resid_pre")
    n = len([key for key in rows.keys if key[0].startswith("resid_pre")])
    assert n > MAX_FIGURE_ROWS  # three layers at every position of the longer pairs, and the final position's
    assert len(every_position) == MAX_FIGURE_ROWS and left_out == n - MAX_FIGURE_ROWS

    def rank(key: tuple[str, int | None]) -> tuple[int, float]:  # jobs that scored the row, then its largest score
        scores = [abs(s) for job in rows.per_job if (item := job.get(key)) and (s := item.score_mean) is not None]
        return len(scores), max(scores, default=-1.0)

    dropped = [key for key in rows.keys if key[0].startswith("resid_pre") and key not in every_position]
    assert min(rank(key) for key in every_position) >= max(rank(key) for key in dropped)
    assert every_position == [key for key in rows.keys if key in set(every_position)]  # in the table's order
    # Rows both jobs scored come first: with the noise job's final-position rows beside the denoise job's, every
    # shared row is drawn.
    both = patch_rows([compared[1], compared[0], Compared("noise", jobs["noise"][1])])
    shared = [key for key in both.keys if key[0].startswith("resid_pre") and key[1] is None]
    assert set(shared) <= set(figure_rows(both, "resid_pre")[0])
