"""The Python client and the CLI against the real stack: a uvicorn server, the session's Celery worker, Redis."""

from __future__ import annotations

import asyncio
import csv
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from hydra_ablate_client.http import AsyncHydraClient, HydraClient, HydraError
from hydra_ablate_client.wire import JobResult, JobStatus
from service.api.app import create_app
from tests.live_server import serve

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "My favourite colour is"]
FIGURES = ("te_vs_de", "layer_effects", "response_heatmap", "erasure")


@pytest.fixture(scope="module")
def live_url(celery_worker: object, stack_env: dict[str, str]) -> Iterator[str]:
    """The real app served over HTTP by uvicorn in a thread."""
    from service.core.settings import Settings

    with serve(create_app(Settings.from_env())) as url:
        yield url


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_client_submits_waits_with_progress_and_reads_a_typed_result(live_url: str, tmp_path: Path) -> None:
    seen: list[JobStatus] = []
    with HydraClient(live_url) as client:
        assert client.ready()
        assert "tiny-llama" in {m.id for m in client.models()}
        job = client.submit({"model": "tiny-llama", "prompts": PROMPTS, "components": ["attn", "mlp"]})
        final = client.wait(job.id, poll_s=0.05, on_progress=seen.append)
        assert final.status == "succeeded"
        assert seen and seen[-1].progress.done == seen[-1].progress.total == 18
        result = client.result(job.id)
        assert isinstance(result, JobResult)
        assert result.components == ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
        first = result.prompts[0]
        for c in range(len(result.components)):
            closing = sum(first.response[c]) + first.norm_response[c]
            assert abs(first.compensation[c] - closing) < 1e-4
        # Every figure, rendered from this real job, is a valid image of the documented size.
        for name in FIGURES:
            assert png_size(client.figure(job.id, name, "png")) == (1200, 800)
            assert client.figure(job.id, name, "svg").lstrip().startswith(b"<?xml")
        assert job.id in {item.id for item in client.list(limit=500).items}
        with pytest.raises(HydraError) as missing:
            client.status("0" * 32)
        assert missing.value.status == 404


def test_async_client_and_cancel(live_url: str) -> None:
    async def scenario() -> tuple[JobStatus, JobStatus]:
        async with AsyncHydraClient(live_url) as client:
            quick = await client.submit({"model": "tiny-gpt2", "prompts": PROMPTS[:2], "components": ["mlp.1"]})
            done = await client.wait(quick.id, poll_s=0.05)
            slow = await client.submit(
                {"model": "tiny-llama", "prompts": [f"Item {i} of the list is" for i in range(300)],
                 "components": ["head"], "resample_samples": 16}
            )
            await client.cancel(slow.id)
            return done, await client.wait(slow.id, poll_s=0.1, timeout_s=60)

    done, cancelled = asyncio.run(scenario())
    assert done.status == "succeeded"
    assert cancelled.status == "cancelled"


def test_cli_submit_wait_result_figure(live_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--url", live_url]
    submitted = runner.invoke(
        cli_app,
        ["submit", "--model", "tiny-gpt_neox_parallel", "-p", PROMPTS[0], "-p", PROMPTS[1], "--components", "attn,mlp",
         "--wait", *base],
    )
    assert submitted.exit_code == 0, submitted.output
    assert "mlp.2" in submitted.output
    job_id = next(line.strip() for line in submitted.output.splitlines() if len(line.strip()) == 32)

    status = runner.invoke(cli_app, ["status", job_id, "--json", *base])
    assert status.exit_code == 0 and '"succeeded"' in status.output

    exported = runner.invoke(cli_app, ["result", job_id, "--format", "csv", *base])
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader(io.StringIO(exported.output)))
    assert len(rows) == 2 * 6 and {"total_effect", "direct_effect", "component"} <= set(rows[0])

    figure_path = tmp_path / "headline.png"
    figure = runner.invoke(cli_app, ["figure", job_id, "te_vs_de", "-o", str(figure_path), *base])
    assert figure.exit_code == 0, figure.output
    assert png_size(figure_path.read_bytes()) == (1200, 800)

    models = runner.invoke(cli_app, ["models", *base])
    assert models.exit_code == 0 and "smollm2-135m" in models.output
    unknown = runner.invoke(cli_app, ["status", "f" * 32, *base])
    assert unknown.exit_code == 1 and "not found" in unknown.output.lower()


def test_cli_reports_bad_input_as_one_clear_line(live_url: str) -> None:
    result = CliRunner().invoke(
        cli_app, ["submit", "--model", "tiny-llama", "-p", "a", "-p", "b", "--components", "mlp.99", "--url", live_url]
    )
    assert result.exit_code == 1
    assert "out of range" in result.output
    assert "Traceback" not in result.output
