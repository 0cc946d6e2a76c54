"""What users see of the ablations' efficacy: the CLI's first lines and its 80-column table, the UI's job summary,
the profile, layer-effects and Fig. 7 figures (their text read back from SVG), and the export columns."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import cast

import matplotlib
import msgspec
import pytest
from litestar.testing import TestClient
from rich.console import Console

from cli.views import result_view, summary_lines
from hydra_ablate_client.wire import JobResult
from service.api.app import create_app
from service.core.settings import Settings
from service.core.store import JobStore
from service.rendering.figures import render
from service.rendering.result_csv import CSV_COLUMNS, to_csv
from tests.conftest import private_settings
from tests.test_figures import build_result, store_succeeded
from worker.engine.types import PromptMeasures, SweepResult
from worker.summary import EFFICACY_THRESHOLD, summarise

KEPT = {"attn.1": 0.8, "mlp.1": 0.6}  # the share of Δunembed these ablations leave in place: weak ones


@pytest.fixture(scope="module")
def result() -> JobResult:
    """A result whose ablations leave 80% (attn.1) and 60% (mlp.1) of Δunembed in place, 10% elsewhere."""
    base = build_result(n_layers=4)
    prompts = [
        msgspec.structs.replace(p, ablated_unembed_effect=[
            u * KEPT.get(name, 0.1) for u, name in zip(p.unembed_effect, base.components, strict=True)
        ])
        for p in base.prompts
    ]
    sweep = SweepResult(base.components, base.response_basis, cast(list[PromptMeasures], prompts))
    return msgspec.structs.replace(base, prompts=prompts, summary=summarise(sweep, 1e-4))


def test_the_summary_flags_exactly_the_weak_ablations(result: JobResult) -> None:
    weak = {c.component for c in result.summary.components if c.weak_ablation}
    assert weak == set(KEPT) and result.summary.efficacy_threshold == EFFICACY_THRESHOLD
    for c in result.summary.components:
        assert c.unembed_removed_share == pytest.approx(1 - KEPT.get(c.component, 0.1))


def test_the_cli_leads_with_ce_on_unembed_and_names_the_weak_ablations(result: JobResult) -> None:
    lines = summary_lines(result)
    assert lines[1].startswith("CE on Δunembed (paper's Fig. 7): slope CI within (0, 1) for ")
    assert lines[2].startswith("  best fit ")
    assert lines[3] == "ablation efficacy: 2 of 8 rated removed < 50% of Δunembed (! below)"
    assert lines[4] == "  weakest: attn.1 20%, mlp.1 40%"
    assert all(len(line) <= 80 for line in lines)
    console = Console(width=80, record=True, color_system=None)
    console.print(result_view(result, width=80))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert re.search(r"attn\.1 .* 20%!", text) and re.search(r"attn\.0 .* 90% ", text), text


def test_the_exports_carry_the_new_columns(result: JobResult) -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv(result).decode())))
    assert tuple(rows[0]) == CSV_COLUMNS and "ablated_unembed_effect" in CSV_COLUMNS
    first = result.prompts[0]
    assert float(rows[0]["ablated_unembed_effect"]) == first.ablated_unembed_effect[0]  # type: ignore[index]
    long = result.to_pandas("long")
    assert "ablated_unembed_effect" in long.columns
    assert set(result.to_pandas("summary").columns) >= {"unembed_removed_share", "weak_ablation"}


def test_the_figures_say_what_the_ablation_left(result: JobResult) -> None:
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        profile = render(result, "profile", "svg", component="attn.1").decode()
        layers = render(result, "layer_effects", "svg").decode()
        fig7 = render(result, "fig7", "svg").decode()
    assert "ablation efficacy: attn.1 still writes" in profile and "removed 20% of Δunembed" in profile
    assert "(weak: below 50%)" in profile
    assert "left after ablation" in layers and layers.count(">weak<") == 2
    # Panel (b): the best fit of the middle layers 1–2 whose ablation is not weak (attn.1 is weak: attn.2).
    assert "(b) attention layer 2 (best fit of layers 1–2, ablations not weak); removed 90% of Δunembed" in fig7


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "eff", result_ttl_s=3600, auth_enabled=False, allow_no_auth=True) as made:
        yield made


def test_the_job_page_leads_with_the_papers_table_and_the_weak_ablations(settings: Settings,
                                                                         result: JobResult) -> None:
    store = JobStore.from_settings(settings)
    try:
        job_id = store_succeeded(store, result)
        with TestClient(create_app(settings)) as client:
            page = client.get(f"/ui/jobs/{job_id}").text
    finally:
        store.close()
    assert page.index('id="paper-table"') < page.index("Comp. on DE slope")  # the paper's statistic first
    weak = re.search(r'<strong id="weak-ablations">(.*?)</strong> \((.*?)\)', page, re.S)
    assert weak and " ".join(weak.group(1).split()) == "2 of 8 components removed less than 50%", page
    assert weak.group(2) == "attn.1, mlp.1"
    assert page.count('class="weak-ablation"') == 2 and "20% <strong>weak</strong>" in page
