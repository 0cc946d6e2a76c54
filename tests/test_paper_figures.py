"""Every figure, rendered by the real app from the result of a real job (the engine on a tiny Llama, known_1000
prompts, per-patch samples kept), in every format and at two sizes; each file opened and checked for its size and
for something drawn. Also: the only_correct selection survives chunking."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient
from PIL import Image

from hydra_ablate_client.vocabulary import FIGURE_NAMES, FigureName
from hydra_ablate_client.wire import DatasetRef, JobResult, JobSpec
from service.api.app import create_app
from service.core import datasets
from service.core.chunk_book import plan_chunks
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.figure_style import MIN_FONT_PT
from service.rendering.figures import render
from tests.checks import present
from tests.conftest import private_settings
from tests.test_figures import store_succeeded
from worker.model_sources import ModelSource

PROMPTS, ANSWERS = datasets.select(DatasetRef(name="known_1000", limit=10))


def _spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "model": "tiny-llama",
        "prompts": PROMPTS,
        "answers": None,
        "counterfactuals": None,
        "components": [f"{kind}.{layer}" for layer in range(3) for kind in ("attn", "mlp")],
        "ablation": "resample",
        "positions": "final",
        "metric": "centered_logit",
        "norm_scale": "clean",
        "resample_samples": 3,
        "resample_from": "random",
        "mean_reference_prompts": None,
        "seed": 5,
        "keep_samples": True,
    }
    fields.update(overrides)
    return JobSpec(**fields)


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, str]) -> Any:
    from worker.model_cache import load_model

    return load_model(ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"]))


@pytest.fixture(scope="module")
def real_result(loaded: Any) -> JobResult:
    from worker.chunk_execution import execute

    return execute("job", _spec(), loaded)


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "pfig", result_ttl_s=3600, auth_enabled=False, allow_no_auth=True) as settings:
        yield settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings)
    yield store
    store.close()


# self_repair is drawn from per-position statistics (tests/test_positions_service.py), estimates from a job with
# estimates (tests/test_estimate_jobs.py); every other figure here.
# knockout_response from a job with knockouts, patching_grid from patching jobs (tests/test_patch_figures.py).
FINAL_POSITION_FIGURES = tuple(name for name in FIGURE_NAMES
                               if name not in ("self_repair", "estimates", "knockout_response", "patching_grid"))


def _check_png(data: bytes, width: int, height: int) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (width, height)
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 245).mean() > 0.03, "almost everything is white: nothing was drawn"
    assert len(np.unique(pixels)) > 32


def _check_svg(data: bytes, width_pt: float, height_pt: float) -> None:
    root = ET.fromstring(data)
    assert root.get("width") == f"{width_pt:g}pt" and root.get("height") == f"{height_pt:g}pt"
    assert data.count(b"<path") > 50 or data.count(b"<use") > 50


def _check_pdf(data: bytes, width_pt: float, height_pt: float) -> None:
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", data)
    assert box is not None and (float(box[1]), float(box[2])) == (width_pt, height_pt)
    assert len(data) > 10_000


@pytest.mark.parametrize("name", FINAL_POSITION_FIGURES)
def test_every_figure_of_a_real_job_in_every_format(
    client: TestClient, store: JobStore, real_result: JobResult, name: str
) -> None:
    job_id = store_succeeded(store, real_result)
    for params, (w, h, dpi) in (({}, (1200, 800, 100)), ({"width": 900, "height": 600, "dpi": 150}, (900, 600, 150))):
        for fmt in ("png", "svg", "pdf"):
            response = client.get(f"/v1/jobs/{job_id}/figures/{name}", params={"format": fmt, **params})
            assert response.status_code == 200, response.text
            w_pt, h_pt = w / dpi * 72, h / dpi * 72
            if fmt == "png":
                assert response.headers["content-type"] == "image/png"
                _check_png(response.content, w, h)
            elif fmt == "svg":
                _check_svg(response.content, w_pt, h_pt)
            else:
                assert response.headers["content-type"] == "application/pdf"
                _check_pdf(response.content, w_pt, h_pt)


@pytest.mark.parametrize("name", FINAL_POSITION_FIGURES)
def test_no_text_below_eight_points(real_result: JobResult, name: FigureName) -> None:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        svg = render(real_result, name, "svg").decode()
    sizes = [float(size) for size in re.findall(r"font-size:\s*([\d.]+)px", svg)]
    sizes += [float(size) for size in re.findall(r"font:[^;\"]*?([\d.]+)px", svg)]
    assert sizes, "no text found"
    assert min(sizes) >= MIN_FONT_PT  # the SVG's user unit is the point (its size is given in pt)


def test_profile_draws_one_line_per_patch_and_labels_units(real_result: JobResult) -> None:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        svg = render(real_result, "profile", "svg", prompt=1, component="attn.1").decode()
    assert "one resample patch (3)" in svg and "ablated: attn.1" in svg and "centred logit" in svg
    assert real_result.prompts[1].prompt in svg.replace("&#39;", "'")


def test_figure_options_out_of_range_are_400(client: TestClient, store: JobStore, real_result: JobResult) -> None:
    job_id = store_succeeded(store, real_result)
    base = f"/v1/jobs/{job_id}/figures"
    for path, params, fragment in (
        (f"{base}/profile", {"prompt": 99}, "prompt must be"),
        (f"{base}/profile", {"component": "attn.7"}, "was not ablated"),
        (f"{base}/fig7", {"width": 100}, "width"),
        (f"{base}/fig7", {"dpi": 1000}, "dpi"),
    ):
        response = client.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
        assert fragment in response.text


def test_summary_of_a_real_job_is_consistent(real_result: JobResult) -> None:
    """The paper's fields reach the result: CE + norm = compensation exactly; the fits are on Δunembed."""
    for p in real_result.prompts:
        assert p.samples is not None and all(len(patches) == 3 for patches in p.samples)
        for k in range(len(real_result.components)):
            assert p.compensatory_effect[k] + p.norm_response[k] == p.compensation[k]
    c = real_result.summary.components[0]
    assert (present(c.ce_vs_unembed).y, present(c.ce_vs_unembed).x) == ("compensatory_effect", "unembed_effect")
    assert real_result.summary.selection.n_kept == len(PROMPTS)


def test_only_correct_chunks_merge_like_the_whole_job(loaded: Any) -> None:
    """Answers chosen so that every other prompt is answered correctly: those are kept, in order, chunked or not."""
    import torch

    from worker.chunk_execution import execute, execute_chunk, merge_chunks

    tops = []
    for text in PROMPTS:
        ids = torch.tensor(loaded.tokenizer(text).input_ids).unsqueeze(0)
        tops.append(int(loaded.model(input_ids=ids).logits[0, -1].argmax()))
    answers = [loaded.tokenizer.decode([t]) if i % 2 == 0 else " zzzz" for i, t in enumerate(tops)]
    first = [loaded.tokenizer(a, add_special_tokens=False).input_ids[0] for a in answers]
    expected = [i for i, (f, t) in enumerate(zip(first, tops, strict=True)) if f == t]
    assert expected, "no answer tokenised back to the top token"
    spec = _spec(answers=answers, only_correct=True, keep_samples=False)
    whole = execute("job", spec, loaded)
    assert [p.index for p in whole.prompts] == expected
    assert (whole.summary.selection.n_candidates, whole.summary.selection.n_kept) == (len(PROMPTS), len(expected))
    chunks = [execute_chunk("job", spec, loaded, c.index, c.start, c.stop) for c in plan_chunks(len(PROMPTS), 3)]
    merged = merge_chunks("job", spec, chunks)
    assert [p.index for p in merged.prompts] == expected
    for a, b in zip(whole.prompts, merged.prompts, strict=True):
        assert np.allclose(a.compensatory_effect, b.compensatory_effect, atol=1e-5)
        assert np.allclose(a.unembed_effect, b.unembed_effect, atol=1e-5)


def _with_outlier(result: JobResult, component: str, field: str, value: float) -> JobResult:
    """The result with one number, prompt 0's `field` for `component`, set far beyond every other point."""
    import msgspec

    c = result.components.index(component)
    first = result.prompts[0]
    values = list(getattr(first, field))
    if field == "response":  # the first downstream attention layer's response: part of CE's attention part
        row = list(values[c])
        row[result.response_basis.index("attn.2")] = value
        values[c] = row
    else:
        values[c] = value
    moved = msgspec.structs.replace(first, **{field: values})
    return msgspec.structs.replace(result, prompts=[moved, *result.prompts[1:]])


def test_fig2_draws_its_scatter_panel_and_writes_what_runs_off_the_axes(real_result: JobResult) -> None:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        svg = render(real_result, "fig2", "svg").decode()
        far = render(_with_outlier(real_result, "attn.1", "total_effect", 1e3), "fig2", "svg").decode()
        far7 = render(_with_outlier(real_result, "attn.1", "compensatory_effect", 1e3), "fig7", "svg").decode()
    for text in ("(c) drop against Δunembed, per prompt and layer", "y = x", "Δunembed (centred logit)",
                 "drop (centred logit)", "attention layer", "MLP layer", "(d) per layer", "attention: share"):
        assert text in svg, text
    # One drop of 1000 among values of order 1: the panels zoom on the central 99%, so it lies off
    # panel (a) (the attention layers' dots) and off the scatter (c), and each says so.
    notes = re.findall(r"(\d+) points? outside the axes", far)
    assert len(notes) >= 2 and all(int(n) >= 1 for n in notes), notes
    assert re.search(r"\d+ points? outside the axes", far7)  # Fig. 7's scatters of CE on Δunembed too


@pytest.mark.parametrize(("name", "field"), [("fig2", "total_effect"), ("fig7", "compensatory_effect"),
                                             ("fig8", "response")])
def test_paper_scatters_count_every_point_outside_the_axes(real_result: JobResult, name: str, field: str) -> None:
    """Independent of the notes' wording: each panel's count equals the points drawn there beyond its limits."""
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

    from service.rendering.paper_figures import fig2, fig7, fig8

    draw = {"fig2": fig2, "fig7": fig7, "fig8": fig8}[name]
    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    draw(fig, _with_outlier(real_result, "attn.1", field, 1e3))  # fig8's panel (c) is attn.1 (the middle of 3)
    checked = 0
    for ax in fig.axes:
        (x_low, x_high), (y_low, y_high) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        outside = 0
        for collection in ax.collections:  # the scatters' points (error bars and colour bars are other collections)
            points = np.asarray(collection.get_offsets(), dtype=float)
            if not isinstance(collection, PathCollection) or points.ndim != 2 or len(points) == 0:
                continue
            finite = points[np.isfinite(points).all(axis=1)]
            outside += int((~((finite[:, 0] >= x_low) & (finite[:, 0] <= x_high)
                              & (finite[:, 1] >= y_low) & (finite[:, 1] <= y_high))).sum())
        notes = [int(m[1]) for t in ax.texts if (m := re.match(r"(\d+) points? outside the axes", t.get_text()))]
        assert sum(notes) == outside, (ax.get_title(), notes, outside)
        checked += outside
    assert checked >= 1  # the outlier was drawn somewhere, off the axes
