"""An API that dies between storing a job and queueing it, for real: a uvicorn process SIGKILLs itself the moment
Celery is about to publish the job's message (after the job is stored). The job must still reach the queue: the
restarted API sends every stored-but-unplanned job at start-up (workers' sweeps do so periodically as well, see
tests/test_leases.py), and a retry with the same Idempotency-Key answers with that job and queues nothing more.

No worker consumes this test's queue, so the message can be read where the broker keeps it; `bench/chaos.py`
(`api_killed`) runs the same crash on a full stack and checks that the job then succeeds.
"""

from __future__ import annotations

import base64
import json
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

from service.core.embedded_redis import free_port
from service.core.queue import waiting_task_ids
from service.core.redis_replies import bytes_list
from service.core.settings import Settings
from service.core.store import JobStore
from tests.conftest import private_settings
from tests.test_api import TINY

API_KEY = "test-api-key-for-crash-tests"

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
uvicorn.run("service.api.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
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
        deadline = time.monotonic() + 300  # a loaded machine imports slowly
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


@pytest.fixture()
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "submit-recovery", api_keys=f"tester:{API_KEY}") as settings:
        yield settings  # type: ignore[misc]


def api_env(settings: Settings) -> dict[str, str]:
    return {
        "REDIS_URL": settings.redis_url,
        "HYDRA_KEY_PREFIX": settings.key_prefix,
        "HYDRA_QUEUE": settings.queue_name,
        "HYDRA_API_KEYS": settings.api_keys,
    }


def test_a_job_stored_by_an_api_that_died_before_queueing_it_reaches_the_queue(
    settings: Settings, tmp_path: Path
) -> None:
    store = JobStore.from_settings(settings)
    store.advertise_model(TINY)  # as a worker serving it would
    port = free_port()
    body = {"model": TINY.id, "prompts": ["first prompt here", "second prompt here"], "components": ["mlp.0"]}
    headers = {"X-API-Key": API_KEY, "Idempotency-Key": f"crash-{uuid.uuid4().hex}"}
    try:
        dying = api_process(api_env(settings), port, tmp_path / "dying-api.log", die_before_publish=True)
        with dying as url, pytest.raises(httpx.TransportError):  # the server dies mid-request
            httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
        stored = store.unplanned()
        assert len(stored) == 1, "the job was stored before the crash"
        job_id = stored[0]
        assert store.status(job_id).status == "queued"  # type: ignore[union-attr]
        assert waiting_task_ids(store.client, settings.queue_name) == set()  # and never sent

        with api_process(api_env(settings), port, tmp_path / "restarted-api.log") as url:
            # The restarted API sent it at start-up: its planning task waits on the queue for a worker.
            assert [body_args(raw) for raw in bytes_list(store.client.lrange(settings.queue_name, 0, -1))] == [
                ("hydra.run_job", [job_id])
            ]
            retried = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
            assert retried.status_code == 202, retried.text
            assert retried.json()["id"] == job_id and retried.headers["Idempotent-Replayed"] == "true"
            assert store.client.llen(settings.queue_name) == 1  # the retry queued nothing more
        assert store.unplanned() == [job_id]  # until a worker plans it (then run_job clears it: test_chunks.py)
    finally:
        store.close()


def body_args(raw: bytes) -> tuple[str, list[object]]:
    """(task name, args) of a Celery message as kombu stores it in a Redis list."""
    message = json.loads(raw)
    return message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0]
