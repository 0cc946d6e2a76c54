"""Redis goes away mid-chunk, for real: a private redis-server with append-only persistence is shut down (as
`redis-cli shutdown` does) while a `celery worker` subprocess runs a chunk, then restarted on the same port.

- Back within the budget (4 s after the worker met the outage, HYDRA_REDIS_OUTAGE_S=20 here; 60 s by default):
  the chunk rides it out and the job succeeds with the same numbers, every chunk run once.
- Away longer than the budget (24 s after the worker met it): the job fails with a reason naming the outage, once
  Redis is back; nothing stays "running".

The worker is held at a progress report mid-chunk (tests/worker_gate.py) while Redis goes down, so the outage
lands mid-chunk however loaded the machine is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from hydra_ablate_client.wire import JobResult
from service.core.chunk_book import ChunkBook
from service.core.embedded_redis import EmbeddedRedis
from service.core.queue import JobQueue
from service.core.settings import Settings
from service.core.store import JobStore
from tests.test_faults import (
    CHUNK_PROMPTS,
    MODEL,
    PROMPTS,
    WorkerProcess,
    assert_result_matches,
    compute_reference,
    job_spec,
    mid_chunk,
    submit,
    wait_for,
    wait_terminal,
)
from tests.worker_gate import Gate

OUTAGE_BUDGET_S = 20
UNREACHABLE = "Redis unreachable while trying to"  # worker/redis_retry.py's first line of an outage
# How long Redis stays away once the worker has met the outage (the budget runs from then).
SHORT_OUTAGE_S = 4
LONG_OUTAGE_S = OUTAGE_BUDGET_S + 4


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("outage-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def outage_env(private_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny_models import build_tiny_model

    model_dir = build_tiny_model("llama", tmp_path_factory.mktemp("outage-model") / MODEL)
    tag = uuid.uuid4().hex[:8]
    return {
        "REDIS_URL": private_redis.url,
        "HYDRA_KEY_PREFIX": f"test-outage-{tag}:",
        "HYDRA_QUEUE": f"hydra-outage-{tag}",
        "HYDRA_MODELS": f"{MODEL}={model_dir}",
        "HYDRA_CHUNK_PROMPTS": str(CHUNK_PROMPTS),
        "HYDRA_BATCH_TOKENS": "1",  # slow enough chunks (seconds) to take Redis away mid-chunk
        # Every chunk runs its own clean passes (none kept from an earlier job or chunk), or a chunk of prompts
        # seen before ends before the fault can be injected mid-chunk.
        "HYDRA_CLEAN_CACHE_BYTES": "0",
        "HYDRA_REDIS_OUTAGE_S": str(OUTAGE_BUDGET_S),
        "HYDRA_LEASE_S": "40",  # above the budget: an outage the chunk survives never costs it its lease
        "HYDRA_SWEEP_S": "1",
        "HYDRA_CHUNK_TIME_LIMIT_S": "300",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def store(outage_env: dict[str, str]) -> Iterator[JobStore]:
    store = JobStore.from_settings(
        Settings(redis_url=outage_env["REDIS_URL"], key_prefix=outage_env["HYDRA_KEY_PREFIX"])
    )
    yield store
    store.close()


@pytest.fixture(scope="module")
def queue(outage_env: dict[str, str]) -> Iterator[JobQueue]:
    queue = JobQueue(Settings(redis_url=outage_env["REDIS_URL"], queue_name=outage_env["HYDRA_QUEUE"]))
    yield queue
    queue.close()


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    gate = Gate(tmp_path_factory.mktemp("outage-gate"))
    yield gate
    gate.open()


@pytest.fixture(scope="module")
def worker(
    outage_env: dict[str, str], gate: Gate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    process = WorkerProcess(outage_env, tmp_path_factory.mktemp("outage-logs") / "worker.log", gate=gate.folder)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def _times_met(worker: WorkerProcess) -> int:
    return worker.log.read_text(errors="replace").count(UNREACHABLE)


def take_redis_away(server: EmbeddedRedis, worker: WorkerProcess, gate: Gate, seconds: float) -> None:
    """With `worker` held mid-chunk at `gate`: shut Redis down (it writes its append-only file and exits), let the
    worker go on, keep Redis away until the worker has met the outage (its log says so: on a loaded machine its
    next prompt may take seconds) and `seconds` more, then start it again on the same port."""
    met_before = _times_met(worker)
    server.stop()
    gate.open()
    wait_for(lambda: _times_met(worker) > met_before, 180, "the worker to meet the outage", worker)
    time.sleep(seconds)
    server.start()


def test_a_redis_outage_within_the_budget_is_ridden_out_with_the_same_numbers(
    worker: WorkerProcess,
    gate: Gate,
    private_redis: EmbeddedRedis,
    store: JobStore,
    queue: JobQueue,
    outage_env: dict[str, str],
) -> None:
    reference: JobResult = compute_reference(outage_env, job_spec(PROMPTS))
    book = ChunkBook.for_store(store)
    job_id = submit(store, queue, job_spec(PROMPTS))
    gate.catch(mid_chunk(book, job_id, 1, delivery=1), 180, "chunk 1 to be running", worker.tail)
    take_redis_away(private_redis, worker, gate, SHORT_OUTAGE_S)

    status = wait_terminal(store, job_id, 120, worker)
    assert status.status == "succeeded", f"{status.error}\n{worker.tail()}"
    assert book.deliveries(job_id) == {0: 1, 1: 1, 2: 1}  # rode out, not run again
    assert_result_matches(store, job_id, reference)


def test_a_longer_redis_outage_fails_the_job_with_the_reason_once_redis_is_back(
    worker: WorkerProcess, gate: Gate, private_redis: EmbeddedRedis, store: JobStore, queue: JobQueue
) -> None:
    book = ChunkBook.for_store(store)
    job_id = submit(store, queue, job_spec(PROMPTS[:3], samples=2))  # one chunk
    gate.catch(mid_chunk(book, job_id, 0, delivery=1, samples=2), 180, "chunk 0 to be running", worker.tail)
    take_redis_away(private_redis, worker, gate, LONG_OUTAGE_S)
    back_at = time.monotonic()

    status = wait_terminal(store, job_id, 60, worker)
    assert status.status == "failed", worker.tail()
    assert status.error is not None
    assert f"chunk 0 (prompts 0-2) of job {job_id} stopped: Redis was unreachable for more than" in status.error
    assert "HYDRA_REDIS_OUTAGE_S" in status.error
    assert time.monotonic() - back_at < 30  # recorded as soon as Redis is back, not after some long timeout
    # The worker serves the next job.
    quick = submit(store, queue, job_spec(PROMPTS[:2], components=["mlp.0"], samples=1))
    assert wait_terminal(store, quick, 60, worker).status == "succeeded"
