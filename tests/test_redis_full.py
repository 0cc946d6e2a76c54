"""Redis refusing writes mid-job, for real: a private redis-server (tests/redis_faults.py) is put at maxmemory
(noeviction) or made unable to write its append-only file while a `celery worker` subprocess runs a chunk and an API
process (keys on) serves two keys.

- Writes refused for less than the budget (HYDRA_REDIS_OUTAGE_S, 12 s here): the worker stays up, its chunk rides it
  out and the job succeeds, every chunk run once. Meanwhile reads keep working (another key's status and list, the
  job's own status: 200) and a submit is a 503 that says why, never a 500.
- Refused for longer than the budget: the job fails with that reason as soon as writes are accepted again, and the
  same worker serves the next job.
- An idle worker taking a message while writes are refused (kombu writes its unacked index then; with the append-only
  file failing, even the pop is refused) stays up: its consumer reconnects until writes are accepted, and the job
  runs (a message popped but not recorded is sent again by the recovery sweep, within 30 s).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hydra_ablate_client.wire import JobStatus
from service.core.chunk_book import ChunkBook
from service.core.embedded_redis import free_port
from service.core.queue import JobQueue
from service.core.settings import Settings
from service.core.store import JobStore
from tests.redis_faults import FaultyRedis
from tests.test_faults import CHUNK_PROMPTS, MODEL, PROMPTS, WorkerProcess, job_spec, mid_chunk, wait_for
from tests.test_submit_recovery import api_process
from tests.worker_gate import Gate

BUDGET_S = 12
# How long writes stay refused once the worker has met the refusal (the budget runs from then).
SHORT_S = 6  # within the budget: the refusal spans chunk 1's end (its result, its acknowledgement) and more
LONG_S = 20  # past it
REFUSED = "Redis refused a write"  # what the worker logs when it meets the refusal
SAMPLES = 6
KEY_A = "redis-full-key-of-alice"
KEY_B = "redis-full-key-of-bob"


@dataclass
class FullStack:
    redis: FaultyRedis
    url: str
    worker: WorkerProcess
    gate: Gate
    store: JobStore
    queue: JobQueue
    api_log: Path

    def submit(self, prompts: list[str], **kwargs: object) -> str:
        """What the API does, as alice: register the job, then publish its id."""
        spec = job_spec(prompts, **kwargs)  # type: ignore[arg-type]
        total = len(spec.prompts) * len(spec.components) * spec.resample_samples
        job_id = self.store.create(spec, total, "alice").id
        self.queue.enqueue(job_id)
        return job_id

    def wait_terminal(self, job_id: str, timeout_s: float) -> JobStatus:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.store.status(job_id)
            if status is not None and status.status in ("succeeded", "failed", "cancelled"):
                return status
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish: {self.store.status(job_id)}\n{self.worker.tail()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    from tests.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("redis-full")
    server = FaultyRedis(root / "redis")
    server.start()
    tag = uuid.uuid4().hex[:8]
    env = {
        "REDIS_URL": server.url,
        "HYDRA_KEY_PREFIX": f"test-full-{tag}:",
        "HYDRA_QUEUE": f"hydra-full-{tag}",
        "HYDRA_MODELS": f"{MODEL}={build_tiny_model('llama', root / MODEL)}",
        "HYDRA_API_KEYS": f"alice:{KEY_A},bob:{KEY_B}",
        "HYDRA_AUTH": "on",
        "HYDRA_ALLOW_NO_AUTH": "0",
        "HYDRA_ACCESS_LOG": "off",
        "HYDRA_CHUNK_PROMPTS": str(CHUNK_PROMPTS),
        "HYDRA_BATCH_TOKENS": "1",  # slow enough chunks (seconds) to refuse writes mid-chunk
        "HYDRA_CLEAN_CACHE_BYTES": "0",
        "HYDRA_REDIS_OUTAGE_S": str(BUDGET_S),
        "HYDRA_LEASE_S": "40",
        "HYDRA_SWEEP_S": "1",
        "HYDRA_CHUNK_TIME_LIMIT_S": "300",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    settings = Settings(redis_url=server.url, key_prefix=env["HYDRA_KEY_PREFIX"], queue_name=env["HYDRA_QUEUE"])
    store, queue = JobStore.from_settings(settings), JobQueue(settings)
    gate = Gate(root / "gate")
    worker = WorkerProcess(env, root / "worker.log", gate=gate.folder)
    try:
        with api_process(env, free_port(), root / "api.log") as url:
            worker.wait_ready()
            yield FullStack(server, url, worker, gate, store, queue, root / "api.log")
    finally:
        gate.open()
        worker.stop()
        store.close()
        queue.close()
        server.stop()


class Reader:
    """Reads through the API while writes are refused: the job's status (alice), bob's list, a submit (bob)."""

    def __init__(self, url: str, job_id: str) -> None:
        self.url, self.job_id = url, job_id
        self.codes: dict[str, list[int]] = {"status": [], "list": [], "health": []}
        self.refusals: list[str] = []  # what a read answered other than 200
        self.submits: list[httpx.Response] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            body = {"model": MODEL, "prompts": ["Paris is in"], "components": ["attn.0"], "ablation": "zero"}
            while not self._stop.is_set():
                alice, bob = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
                self._read("status", client.get(f"/v1/jobs/{self.job_id}", headers=alice))
                self._read("list", client.get("/v1/jobs", headers=bob))
                self._read("health", client.get("/health"))
                if len(self.submits) < 3:
                    self.submits.append(client.post("/v1/jobs", json=body, headers=bob))
                self._stop.wait(0.3)

    def _read(self, route: str, response: httpx.Response) -> None:
        self.codes[route].append(response.status_code)
        if response.status_code != 200:
            self.refusals.append(f"{route}: {response.status_code} {response.text[:400]}")

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def refuse_writes_mid_chunk(stack: FullStack, kind: str, seconds: float) -> tuple[str, str, Reader]:
    """Submit a three-chunk job, refuse writes (`full` or `failing_aof`) while chunk 1 is held mid-chunk (see
    tests/worker_gate.py), let the worker go on and keep refusing them until it has met the refusal and `seconds`
    more; returns (job id, the error writes got, what the API answered meanwhile)."""
    book = ChunkBook.for_store(stack.store)
    job_id = stack.submit(PROMPTS, samples=SAMPLES)
    # Generous: on a loaded machine the worker may still be finishing the module's previous job (a chunk riding
    # out refused writes) before it takes this one.
    stack.gate.catch(mid_chunk(book, job_id, 1, delivery=1, samples=SAMPLES), 300, "chunk 1", stack.worker.tail)
    met_before = stack.worker.log.read_text(errors="replace").count(REFUSED)
    fault = stack.redis.full() if kind == "full" else stack.redis.failing_aof()
    with fault as error, Reader(stack.url, job_id) as reader:
        stack.gate.open()
        wait_for(
            lambda: stack.worker.log.read_text(errors="replace").count(REFUSED) > met_before,
            180, "the worker to meet the refusal", stack.worker,
        )  # fmt: skip
        time.sleep(seconds)
    return job_id, error, reader


def assert_reads_kept_working(reader: Reader, error_word: str, api_log: Path) -> None:
    redis_errors = [line for line in api_log.read_text(errors="replace").splitlines() if "redis error" in line]
    for route, codes in reader.codes.items():
        assert codes and set(codes) == {200}, (route, codes, reader.refusals, redis_errors[-5:])
    assert reader.submits
    for response in reader.submits:
        assert response.status_code == 503, response.text
        assert error_word in response.text, response.text


@pytest.mark.parametrize(("kind", "error_word"), [("full", "maxmemory"), ("failing_aof", "AOF")])
def test_writes_refused_within_the_budget_are_ridden_out_and_reads_keep_working(
    stack: FullStack, kind: str, error_word: str
) -> None:
    job_id, error, reader = refuse_writes_mid_chunk(stack, kind, SHORT_S)
    assert error_word in error

    status = stack.wait_terminal(job_id, 120)
    assert stack.worker.alive, stack.worker.tail()
    assert status.status == "succeeded", f"{status.error}\n{stack.worker.tail()}"
    assert ChunkBook.for_store(stack.store).deliveries(job_id) == {0: 1, 1: 1, 2: 1}  # rode out, not run again
    assert_reads_kept_working(reader, error_word, stack.api_log)


def test_writes_refused_past_the_budget_fail_the_job_with_the_reason(stack: FullStack) -> None:
    job_id, _, _ = refuse_writes_mid_chunk(stack, "full", LONG_S)
    back_at = time.monotonic()

    status = stack.wait_terminal(job_id, 60)
    assert stack.worker.alive, stack.worker.tail()
    assert status.status == "failed", stack.worker.tail()
    assert status.error is not None
    assert "Redis refused writes for more than" in status.error, status.error
    assert "maxmemory" in status.error and "HYDRA_REDIS_OUTAGE_S" in status.error, status.error
    assert time.monotonic() - back_at < 30
    quick = stack.submit(PROMPTS[:2], components=["mlp.0"], samples=1)
    assert stack.wait_terminal(quick, 60).status == "succeeded"


# The failing AOF takes the same path as the full Redis here (a refused write): CI runs the full one.
@pytest.mark.parametrize("kind", ["full", pytest.param("failing_aof", marks=pytest.mark.slow)])
def test_an_idle_worker_taking_a_message_while_writes_are_refused_stays_up(stack: FullStack, kind: str) -> None:
    stack.worker.pause()  # the message waits for the worker's next pop, which comes once writes are refused
    try:
        job_id = stack.submit(PROMPTS[:2], components=["mlp.0"], samples=1)
        with stack.redis.full() if kind == "full" else stack.redis.failing_aof():
            stack.worker.resume()
            time.sleep(SHORT_S)
            assert stack.worker.alive, stack.worker.tail()
    finally:
        stack.worker.resume()
    status = stack.wait_terminal(job_id, 90)
    assert stack.worker.alive, stack.worker.tail()
    assert status.status == "succeeded", f"{status.error}\n{stack.worker.tail()}"
