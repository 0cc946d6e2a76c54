"""The OpenAPI contract, used the way a lab's tooling would: generate a Python client from openapi/openapi.json with
openapi-python-client, then submit, poll, fetch the result and a figure through it against a live server (uvicorn
on a free port, the session's Redis and Celery worker)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.api.app import create_app
from tests.live_server import serve

ROOT = Path(__file__).resolve().parents[1]
# The generator knows binary bodies as application/octet-stream; figures are image/png and image/svg+xml.
CONFIG = "content_type_overrides:\n  image/png: application/octet-stream\n  image/svg+xml: application/octet-stream\n"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    generator = shutil.which("openapi-python-client") or str(Path(sys.executable).parent / "openapi-python-client")
    root = tmp_path_factory.mktemp("generated")
    (root / "config.yaml").write_text(CONFIG)
    package = root / "hydra_generated"
    completed = subprocess.run(
        [generator, "generate", "--path", str(ROOT / "openapi" / "openapi.json"), "--output-path", str(package),
         "--meta", "none", "--config", str(root / "config.yaml")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Warning" not in completed.stdout, completed.stdout  # every operation and response was understood
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("hydra_generated")
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name.startswith("hydra_generated")]:
            del sys.modules[name]


@pytest.fixture()
def live_server(celery_worker: object, stack_settings: Any) -> Iterator[str]:
    with serve(create_app(stack_settings)) as url:
        yield url


def test_a_generated_client_submits_polls_and_fetches_result_and_figure(generated: Any, live_server: str) -> None:
    from hydra_generated.api.figures import get_job_figure
    from hydra_generated.api.jobs import get_job, get_job_result, list_jobs, submit_job
    from hydra_generated.models import JobRequest, JobResult, JobStatus
    from hydra_generated.models.job_status_status import JobStatusStatus

    client = generated.AuthenticatedClient(
        base_url=live_server, token="unused", prefix="", auth_header_name="X-API-Key"
    )
    request = JobRequest.from_dict(
        {"model": "tiny-llama", "prompts": ["The capital of France is", "Rome is in"], "components": ["attn", "mlp"],
         "name": "generated", "tags": ["contract"]}
    )
    job = submit_job.sync(client=client, body=request)
    assert isinstance(job, JobStatus) and job.status == JobStatusStatus.QUEUED and job.name == "generated"

    deadline = time.monotonic() + 300
    status = get_job.sync(job.id, client=client)
    while isinstance(status, JobStatus) and status.status.value in ("queued", "running"):
        assert time.monotonic() < deadline
        status = get_job.sync(job.id, client=client, wait=5.0)
    assert isinstance(status, JobStatus) and status.status == JobStatusStatus.SUCCEEDED, status
    assert status.progress.done == status.progress.total

    result = get_job_result.sync(job.id, client=client)
    assert isinstance(result, JobResult)
    assert result.id == job.id and len(result.prompts) == 2
    assert {name.split(".")[0] for name in result.components} == {"attn", "mlp"}
    assert len(result.prompts[0].total_effect) == len(result.components)

    figure = get_job_figure.sync(job.id, "te_vs_de", client=client)
    assert figure is not None and not hasattr(figure, "status")
    assert figure.payload.read().startswith(b"\x89PNG\r\n\x1a\n")

    page = list_jobs.sync(client=client, tag="contract")
    assert page is not None and [item.id for item in page.items] == [job.id]
