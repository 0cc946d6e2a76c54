"""An API that dies between storing a job and queueing it, for real: a uvicorn process SIGKILLs itself the moment
Celery is about to publish the job's message (after the job is stored). The job must still run: the restarted API
sends every stored-but-unplanned job at start-up (workers' sweeps do so periodically as well, see
tests/test_leases.py), and a retry with the same Idempotency-Key answers with that job, which then succeeds.

The API runs against the session's stack (its Redis, prefix and queue); the session's in-thread worker runs the
job (it does not sweep: only the restarted API can have sent the job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.embedded_redis import free_port
from service.settings import Settings
from service.store import JobStore

ROOT = Path(__file__).resolve().parents[1]

# uvicorn serving the app; with DIE_BEFORE_PUBLISH set the process kills itself when Celery is about to publish a
# task (the job is stored by then), which is what a crash between the two steps of POST /v1/jobs leaves behind.
SERVER = """
import os, signal, sys
if os.environ.get("DIE_BEFORE_PUBLISH"):
    from celery.signals import before_task_publish

    @before_task_publish.connect(weak=False)
    def _die(**_):
        os.kill(os.getpid(), signal.SIGKILL)

import uvicorn
uvicorn.run("service.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@contextmanager
def api_process(env: dict[str, str], port: int, log: Path, die_before_publish: bool = False) -> Iterator[str]:
    extra = {"DIE_BEFORE_PUBLISH": "1"} if die_before_publish else {}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port)], env={**os.environ, **env, **extra, "PYTHONPATH": str(ROOT)},
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the API did not start\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_job_stored_by_an_api_that_died_before_queueing_it_still_runs(
    celery_worker: object, stack_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    marker = uuid.uuid4().hex[:8]
    body = {"model": "tiny-llama", "prompts": [f"first {marker} prompt", "second prompt"], "components": ["mlp.0"]}
    key = {"Idempotency-Key": f"crash-{marker}"}
    with api_process(stack_env, port, tmp_path / "dying-api.log", die_before_publish=True) as url:
        with pytest.raises(httpx.TransportError):  # the server died mid-request
            httpx.post(f"{url}/v1/jobs", json=body, headers=key, timeout=60)

    store = JobStore.from_settings(Settings.from_env())
    try:
        stored = [
            job_id for job_id in store.unplanned()
            if (spec := store.spec(job_id)) is not None and spec.prompts == body["prompts"]
        ]  # fmt: skip
        assert len(stored) == 1, "the job was stored before the crash"
        job_id = stored[0]
        time.sleep(1.0)
        assert store.status(job_id).status == "queued"  # type: ignore[union-attr]  # nothing sent it

        with api_process(stack_env, port, tmp_path / "restarted-api.log") as url:
            retried = httpx.post(f"{url}/v1/jobs", json=body, headers=key, timeout=60)
            assert retried.status_code == 202, retried.text
            assert retried.json()["id"] == job_id and retried.headers["Idempotent-Replayed"] == "true"
            deadline = time.monotonic() + 90
            while (status := httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["status"] == "succeeded", status
        assert job_id not in store.unplanned()  # planned: never sent again
    finally:
        store.close()
