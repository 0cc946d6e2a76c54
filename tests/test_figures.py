"""Figures of a finished job: rendered by the real app from a real JobResult stored in the session's real Redis.

`build_result` makes a small, internally consistent JobResult (3 layers × attn/mlp, 4 prompts by default): the
summary is computed from the per-prompt numbers exactly as docs/concepts/definitions.md defines it. test_exports uses
it too.
"""

from __future__ import annotations

import io
import random
import struct
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any, cast

import msgspec
import pytest
from litestar.testing import TestClient
from PIL import Image

from hydra_ablate_client.vocabulary import FIGURE_NAMES
from hydra_ablate_client.wire import JobResult, JobSpec, PromptResult, Provenance
from service.api.app import create_app
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.figure_style import FigureOptionError
from service.rendering.figures import ABLATION_FIGURES, HEIGHT_PX, WIDTH_PX, render, shown_figures
from tests.conftest import private_settings
from worker.engine.types import PromptMeasures, SweepResult
from worker.summary import summarise

PROBLEM = "application/problem+json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["The Eiffel Tower is in", "The capital of Japan is", 'She said "yes", then', "Rome, Italy; Paris,"]


# --- a plausible JobResult ------------------------------------------------------------------------------------------


def _downstream(ablated: str, basis: list[str]) -> list[bool]:
    """Sequential blocks: attn.L reaches mlp.L and every later block; mlp.L every later block."""
    kind, layer = ablated.split(".")[0], int(ablated.split(".")[1])
    out = []
    for name in basis:
        d_kind, d_layer = name.split(".")[0], int(name.split(".")[1])
        out.append(d_layer > layer or (kind in ("attn", "head") and d_kind == "mlp" and d_layer == layer))
    return out


def build_result(
    n_layers: int = 3, prompts: list[str] | None = None, heads: int = 0, seed: int = 0, head_basis: int = 0
) -> JobResult:
    """A JobResult whose summary follows from its prompts; late MLPs write negatively (erasure) and compensate.
    `head_basis` H > 0: responses over H heads per layer and the MLPs (`response_basis: "heads"`)."""
    rng = random.Random(seed)
    texts = list(prompts or PROMPTS)
    layer_basis = [f"{kind}.{layer}" for layer in range(n_layers) for kind in ("attn", "mlp")]
    basis = (
        [name for layer in range(n_layers) for name in [*(f"head.{layer}.{h}" for h in range(head_basis)),
                                                         f"mlp.{layer}"]]
        if head_basis else layer_basis
    )
    components = layer_basis + [f"head.1.{h}" for h in range(heads)]
    rows: list[PromptResult] = []
    for i, text in enumerate(texts):
        clean_direct = [
            rng.uniform(0.1, 1.5)
            if not (name.startswith("mlp") and int(name[4:]) == n_layers - 1)
            else -rng.uniform(0.2, 0.8)
            for name in basis
        ]
        de, te, comp, norm, response = [], [], [], [], []
        for name in components:
            d = rng.uniform(0.2, 2.0)
            mask = _downstream(name, basis)
            reach = sum(mask)
            repair = 0.4 * d * rng.uniform(0.6, 1.0) if reach else 0.0
            r = [repair / reach if m else 0.0 for m in mask] if reach else [0.0] * len(basis)
            n = rng.uniform(-0.05, 0.05)
            c = sum(r) + n
            de.append(d)
            te.append(d - c)
            comp.append(c)
            norm.append(n)
            response.append(r)
        rows.append(
            PromptResult(
                index=i,
                prompt=text,
                target_id=1000 + i,
                target_token=f" tok{i}",
                clean_metric=rng.uniform(5, 12),
                top2_gap=0.0005 if i == 3 else rng.uniform(0.5, 3),
                near_tie=i == 3,
                sources=[(i + 1) % len(texts)],
                total_effect=te,
                direct_effect=de,
                compensation=comp,
                norm_response=norm,
                response=response,
                clean_direct_effect=clean_direct,
                unembed_effect=[d + rng.uniform(-0.1, 0.1) for d in de],
                compensatory_effect=[sum(r) for r in response],
            )
        )
    # The summary follows from the prompts by the service's own summarise (tested against numpy in test_stats).
    sweep = SweepResult(components=components, response_basis=basis, prompts=cast(list[PromptMeasures], rows))
    summary = summarise(sweep, 1e-4, seed=seed)
    spec = JobSpec(
        model="tiny",
        prompts=texts,
        answers=None,
        counterfactuals=None,
        components=components,
        ablation="resample",
        positions="final",
        metric="centered_logit",
        norm_scale="clean",
        resample_samples=1,
        resample_from="next",
        mean_reference_prompts=None,
        seed=seed,
        response_basis="heads" if head_basis else "layers",
    )
    return JobResult(
        id="placeholder",
        model="tiny",
        components=components,
        response_basis=basis,
        prompts=rows,
        summary=summary,
        provenance=Provenance(
            spec=spec,
            model_id="tiny",
            model_source="local",
            model_revision=None,
            model_file_sha256=None,
            architecture="llama",
            dtype="float32",
            device="cpu",
            library_versions={"torch": "2.13.0"},
            seed=seed,
            engine="test",
            worker="test",
            elapsed_s=0.25,
        ),
    )


def store_succeeded(store: JobStore, result: JobResult) -> str:
    """Put a job through queued → running → succeeded in the real store, as a worker would; returns its id."""
    status = store.create(result.provenance.spec, total=len(result.prompts) * len(result.components))
    assert store.mark_running(status.id)
    assert store.mark_succeeded(status.id, msgspec.json.encode(msgspec.structs.replace(result, id=status.id)))
    return status.id


# --- fixtures: the real app on a private key prefix of the session's Redis ------------------------------------------


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    # Jobs here are stored without an owner, as in the local single-user setup: auth off.
    with private_settings(redis_url, "fig", result_ttl_s=3600, auth_enabled=False, allow_no_auth=True) as settings:
        yield settings


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings)
    yield store
    store.close()


@pytest.fixture
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def result() -> JobResult:
    return build_result(heads=2)


def assert_problem(response: Any, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], f"{fragment!r} not in {body['detail']!r}"
    return body


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG format requires to come first."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_png(data: bytes) -> None:
    assert png_size(data) == (WIDTH_PX, HEIGHT_PX) == (1200, 800)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # the whole stream decodes: chunks and CRCs intact
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (1200, 800)
        assert len(image.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 16  # something was drawn


def assert_svg(data: bytes) -> ET.Element:
    root = ET.fromstring(data)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == "864pt" and root.get("height") == "576pt"  # 12 × 8 in
    return root


# --- rendering ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ABLATION_FIGURES)  # patching_grid: tests/test_patch_figures.py
def test_every_figure_renders_as_png_and_svg(client: TestClient, store: JobStore, result: JobResult, name: str) -> None:
    job_id = store_succeeded(store, result)
    png = client.get(f"/v1/jobs/{job_id}/figures/{name}")  # png is the default
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert png.headers["vary"] == "Accept"
    assert_png(png.content)

    svg = client.get(f"/v1/jobs/{job_id}/figures/{name}", params={"format": "svg"})
    assert svg.status_code == 200, svg.text
    assert svg.headers["content-type"].startswith("image/svg+xml")
    root = assert_svg(svg.content)
    texts = " ".join(t.strip() for t in root.itertext() if t.strip())
    assert texts or svg.content.count(b"<path") > 10  # matplotlib writes glyphs as paths; either way it drew


def test_figures_label_what_they_show(result: JobResult) -> None:
    """SVG text is kept as text here (svg.fonttype none) so the labels can be read back."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        te_vs_de = render(result, "te_vs_de", "svg").decode()
        layers = render(result, "layer_effects", "svg").decode()
        heatmap = render(result, "response_heatmap", "svg").decode()
        erasure = render(result, "erasure", "svg").decode()
    assert "direct effect (centred logit)" in te_vs_de and "total effect (centred logit)" in te_vs_de
    slope, r2 = result.summary.total_vs_direct.slope, result.summary.total_vs_direct.r2
    assert f"slope {slope:.3f}" in te_vs_de and f"R² {r2:.3f}" in te_vs_de
    assert "y = x" in te_vs_de
    assert "attn ablated" in layers and "mlp ablated" in layers and "2 head components not shown" in layers
    assert "Δunembed (paper's x)" in layers and "CE (downstream layers)" in layers and "final norm's part" in layers
    assert "ablated attn layer" in heatmap and "responding mlp layer" in heatmap and "norm" in heatmap
    assert "colour clipped at" in heatmap
    assert "mlp.2: " in erasure and "erasure" in erasure  # the late MLP's negative bar is called out


def test_figures_of_a_final_position_job_with_the_head_basis_show_heads() -> None:
    """response_basis "heads" on a final-position job: the heatmap's attention columns are heads (layer.head), head
    ablations are rows of their own (the head → head matrix), erasure sums a layer's heads, and profile says why it
    does not apply."""
    import matplotlib

    heads = build_result(heads=3, head_basis=4)
    assert heads.response_basis[:5] == ["head.0.0", "head.0.1", "head.0.2", "head.0.3", "mlp.0"]
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        heatmap = render(heads, "response_heatmap", "svg").decode()
        erasure = render(heads, "erasure", "svg").decode()
    assert "head responses" in heatmap and "responding head (layer.head)" in heatmap
    assert "ablated head (layer.head)" in heatmap and ">2.3<" in heatmap and ">1.2<" in heatmap
    assert "attention (its heads summed)" in erasure
    for name in ABLATION_FIGURES:
        if name != "profile":
            assert_png(render(heads, name, "png"))
    with pytest.raises(FigureOptionError, match="response_basis 'layers'"):
        render(heads, "profile", "png")
    assert "profile" not in shown_figures(heads) and "response_heatmap" in shown_figures(heads)
    assert "profile" in shown_figures(build_result())


def test_figures_of_a_wide_model_fit_the_fixed_size() -> None:
    """30 layers and 60 components (the built-in model's full sweep) still render at exactly 1200 × 800."""
    wide = build_result(n_layers=30, prompts=[f"prompt {i}" for i in range(3)])
    for name in ABLATION_FIGURES:
        assert_png(render(wide, name, "png"))


def test_accept_header_chooses_the_format(client: TestClient, store: JobStore, result: JobResult) -> None:
    job_id = store_succeeded(store, result)
    path = f"/v1/jobs/{job_id}/figures/erasure"
    svg = client.get(path, headers={"Accept": "image/svg+xml, application/problem+json"})
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert_svg(svg.content)
    png = client.get(path, headers={"Accept": "image/png, application/problem+json"})  # what the client sends
    assert png.headers["content-type"] == "image/png" and png.content.startswith(PNG_SIGNATURE)
    assert client.get(path, headers={"Accept": "image/*"}).headers["content-type"] == "image/png"
    # the query parameter wins over the header
    assert client.get(path, params={"format": "png"}, headers={"Accept": "image/svg+xml"}).content.startswith(
        PNG_SIGNATURE
    )
    assert client.get(path, headers={"Accept": "application/pdf"}).content.startswith(b"%PDF-")
    assert_problem(client.get(path, headers={"Accept": "text/csv"}), 406, "image/png", "image/svg+xml",
                   "application/pdf")
    assert_problem(client.get(path, params={"format": "gif"}), 400, "format")


# --- caching --------------------------------------------------------------------------------------------------------


def test_rendered_figures_are_cached_in_redis_with_the_results_ttl(
    client: TestClient, store: JobStore, settings: Settings, result: JobResult
) -> None:
    job_id = store_succeeded(store, result)
    key = f"{settings.key_prefix}figure:{job_id}:te_vs_de:png"
    assert not store.client.exists(key)
    first = client.get(f"/v1/jobs/{job_id}/figures/te_vs_de")
    assert first.status_code == 200
    assert store.client.get(key) == first.content
    result_ttl = store.client.pttl(store.keys.result(job_id))
    assert 0 < store.client.pttl(key) <= result_ttl <= 3600 * 1000  # expires with the result, not after it

    second = client.get(f"/v1/jobs/{job_id}/figures/te_vs_de")
    assert second.content == first.content
    # served from the cache, not re-rendered: replace the cached bytes and the endpoint answers with them
    store.client.set(key, PNG_SIGNATURE + b"cached", keepttl=True)
    assert client.get(f"/v1/jobs/{job_id}/figures/te_vs_de").content == PNG_SIGNATURE + b"cached"
    # each format is its own entry
    assert not store.client.exists(f"{settings.key_prefix}figure:{job_id}:te_vs_de:svg")
    client.get(f"/v1/jobs/{job_id}/figures/te_vs_de", params={"format": "svg"})
    assert store.client.exists(f"{settings.key_prefix}figure:{job_id}:te_vs_de:svg")


# --- errors ---------------------------------------------------------------------------------------------------------


def test_unknown_job_and_unknown_figure_are_specific_404s(
    client: TestClient, store: JobStore, result: JobResult
) -> None:
    missing = uuid.uuid4().hex
    assert_problem(client.get(f"/v1/jobs/{missing}/figures/te_vs_de"), 404, f"job {missing} not found")
    job_id = store_succeeded(store, result)
    body = assert_problem(client.get(f"/v1/jobs/{job_id}/figures/pie_chart"), 404, "unknown figure 'pie_chart'")
    for name in FIGURE_NAMES:
        assert name in body["detail"]


def test_figures_are_409_until_the_job_succeeded(client: TestClient, store: JobStore, result: JobResult) -> None:
    spec = result.provenance.spec
    job = store.create(spec, total=24)
    path = f"/v1/jobs/{job.id}/figures/te_vs_de"
    assert_problem(client.get(path), 409, f"job {job.id} is queued", "0/24", "no result yet")
    store.mark_running(job.id)
    store.set_progress(job.id, 5, 24)
    assert_problem(client.get(path), 409, "running", "5/24")
    store.mark_failed(job.id, "CUDA out of memory")
    assert_problem(client.get(path), 409, "failed", "CUDA out of memory")

    cancelled = store.create(spec, total=24)
    store.request_cancel(cancelled.id)
    assert_problem(client.get(f"/v1/jobs/{cancelled.id}/figures/erasure"), 409, "cancelled")


def test_note_outside_counts_finite_points_beyond_the_limits_and_writes_the_count() -> None:
    from matplotlib.figure import Figure

    from service.rendering.figure_style import note_outside

    ax = Figure().add_subplot()
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # an inverted axis counts the same
    xs = [0.5, 2.0, 0.5, float("nan"), 1.0, -0.1]
    ys = [0.5, 0.5, -1.0, 0.5, 1.0, 3.0]
    assert note_outside(ax, xs, ys) == 3  # (2, .5), (.5, -1), (-.1, 3); the NaN is not drawn, (1, 1) is on the edge
    assert [t.get_text() for t in ax.texts] == ["3 points outside the axes"]
    alone = Figure().add_subplot()
    alone.set_ylim(-1, 1)
    assert note_outside(alone, None, [0.0, 1.5, float("inf")], what="norm share") == 1
    assert [t.get_text() for t in alone.texts] == ["1 norm share outside the axes"]
    inside = Figure().add_subplot()
    inside.set_xlim(0, 1)
    inside.set_ylim(0, 1)
    assert note_outside(inside, [0.2], [0.8]) == 0 and not inside.texts  # nothing off the axes: nothing written
