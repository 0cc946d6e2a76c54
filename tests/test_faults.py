"""Workers that die mid-chunk, for real: a `celery worker` subprocess (prefork, one pool process) is SIGKILLed.

- Pool process killed (what the out-of-memory killer does): the worker's main process requeues the chunk at once
  (acks_late + reject_on_worker_lost) and a new pool process runs it again; the job's numbers are unchanged.
- Pool process killed at every delivery: the delivery after HYDRA_MAX_DELIVERIES fails the job with a message.
- Whole worker killed: the chunk stays unacknowledged until the visibility timeout (21 s here, with a 20 s time
  limit), then a fresh worker runs it.

The worker runs against its own Redis database (own broker keys), key prefix and queue, with its own tiny model,
so the session's in-thread worker never sees these tasks. The reference is the job run in one piece in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from service.chunks import ChunkBook
from service.queue import JobQueue
from service.schemas import JobResult, JobSpec, JobStatus
from service.settings import Settings
from service.store import JobStore
from tests.numbers import assert_same_numbers

MODEL = "tiny-fault"
PROMPTS = [f"Sentence number {i} is about the weather in the city of Paris, which is famous for" for i in range(9)]
COMPONENTS = [f"{kind}.{layer}" for layer in range(3) for kind in ("attn", "mlp")] + [
    f"head.{layer}.{head}" for layer in range(3) for head in range(4)
]
SAMPLES = 8
CHUNK_PROMPTS = 3  # 3 chunks of a few seconds each (one ablated run per batch, see fault_env)
VISIBILITY_TIMEOUT_S = 21


def job_spec(prompts: list[str], components: list[str] = COMPONENTS, samples: int = SAMPLES) -> JobSpec:
    return JobSpec(
        model=MODEL,
        prompts=prompts,
        answers=None,
        counterfactuals=None,
        components=components,
        ablation="resample",
        positions="final",
        metric="logit",
        norm_scale="clean",
        resample_samples=samples,
        resample_from="random",
        mean_reference_prompts=None,
        seed=5,
    )


@pytest.fixture(scope="module")
def fault_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny_models import build_tiny_model

    model_dir = build_tiny_model("llama", tmp_path_factory.mktemp("fault-model") / MODEL)
    tag = uuid.uuid4().hex[:8]
    return {
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/3",  # a database of its own: its own broker keys
        "HYDRA_KEY_PREFIX": f"test-faults-{tag}:",
        "HYDRA_QUEUE": f"hydra-faults-{tag}",
        "HYDRA_MODELS": f"{MODEL}={model_dir}",
        "HYDRA_CHUNK_PROMPTS": str(CHUNK_PROMPTS),
        # One ablated run per batch: slow enough chunks (seconds) for the test to kill a worker mid-chunk.
        "HYDRA_BATCH_TOKENS": "1",
        "HYDRA_MAX_DELIVERIES": "3",
        "HYDRA_CHUNK_TIME_LIMIT_S": "20",
        "HYDRA_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def settings(fault_env: dict[str, str]) -> Settings:
    return Settings(
        redis_url=fault_env["REDIS_URL"], key_prefix=fault_env["HYDRA_KEY_PREFIX"], queue_name=fault_env["HYDRA_QUEUE"]
    )


@pytest.fixture(scope="module")
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings)
    yield store
    store.close()


@pytest.fixture(scope="module")
def book(store: JobStore) -> ChunkBook:
    return ChunkBook.for_store(store)


@pytest.fixture(scope="module")
def queue(settings: Settings) -> Iterator[JobQueue]:
    queue = JobQueue(settings)
    yield queue
    queue.close()


class WorkerProcess:
    """`celery -A worker.celery_app worker -P prefork -c 1 -Q <queue>` in its own session, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        command = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "prefork", "-c", "1",
            "-Q", env["HYDRA_QUEUE"], "-n", f"fault-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parents[1],
            )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def pool_process(self, timeout_s: float = 10.0) -> psutil.Process:
        """The prefork pool's one child process (the one running tasks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            children = psutil.Process(self.process.pid).children()
            if children:
                return children[0]
            time.sleep(0.02)
        raise AssertionError(f"the worker has no pool process\n{self.tail()}")

    def kill_pool_process(self) -> None:
        os.kill(self.pool_process().pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the worker and its pool process at once (no shutdown: nothing is handed back)."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def worker(fault_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(fault_env, tmp_path_factory.mktemp("fault-logs") / "worker.log")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reference(fault_env: dict[str, str]) -> JobResult:
    """The job in one piece, in this process, on the same model folder."""
    from worker.chunking import execute
    from worker.model_cache import load_model
    from worker.model_sources import ModelSource

    location = fault_env["HYDRA_MODELS"].split("=", 1)[1]
    loaded = load_model(ModelSource(id=MODEL, location=location))
    # The same batching as the workers (so the numbers agree to float32 rounding; compared within tolerance).
    saved = os.environ.get("HYDRA_BATCH_TOKENS")
    os.environ["HYDRA_BATCH_TOKENS"] = fault_env["HYDRA_BATCH_TOKENS"]
    try:
        return execute("reference", job_spec(PROMPTS), loaded)
    finally:
        if saved is None:
            os.environ.pop("HYDRA_BATCH_TOKENS")
        else:
            os.environ["HYDRA_BATCH_TOKENS"] = saved


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, worker: WorkerProcess | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n{worker.tail() if worker else ''}")


def submit(store: JobStore, queue: JobQueue, spec: JobSpec) -> str:
    """What the API does: register the job, then publish its id on the main queue."""
    job_id = store.create(spec, len(spec.prompts) * len(spec.components) * spec.resample_samples).id
    queue.enqueue(job_id)
    return job_id


def wait_terminal(store: JobStore, job_id: str, timeout_s: float, worker: WorkerProcess) -> JobStatus:
    def finished() -> bool:
        status = store.status(job_id)
        return status is not None and status.status in ("succeeded", "failed", "cancelled")

    wait_for(finished, timeout_s, f"job {job_id} to finish", worker)
    status = store.status(job_id)
    assert status is not None
    return status


def running_mid_chunk(book: ChunkBook, job_id: str, index: int, delivery: int) -> Callable[[], bool]:
    """True once the chunk's `delivery`-th run has measured at least one prompt (and more are left)."""
    per_prompt = len(COMPONENTS) * SAMPLES

    def check() -> bool:
        done = book.progress(job_id).get(index, 0)
        return book.deliveries(job_id).get(index) == delivery and per_prompt <= done < CHUNK_PROMPTS * per_prompt

    return check


def assert_result_matches(store: JobStore, job_id: str, reference: JobResult) -> None:
    """The workers' chunks against the job in one piece here: another process and split, so within tolerance."""
    raw = store.result(job_id)
    assert raw is not None
    result = msgspec.json.decode(raw, type=JobResult)
    assert_same_numbers(msgspec.to_builtins(result.prompts), msgspec.to_builtins(reference.prompts))
    assert_same_numbers(msgspec.to_builtins(result.summary), msgspec.to_builtins(reference.summary))


def test_a_chunk_whose_pool_process_is_killed_runs_again_with_the_same_numbers(
    worker: WorkerProcess, store: JobStore, book: ChunkBook, queue: JobQueue, reference: JobResult
) -> None:
    job_id = submit(store, queue, job_spec(PROMPTS))
    wait_for(running_mid_chunk(book, job_id, 1, delivery=1), 90, "chunk 1 to be running", worker)
    worker.kill_pool_process()

    status = wait_terminal(store, job_id, 90, worker)
    assert status.status == "succeeded", f"{status.error}\n{worker.tail()}"
    assert book.deliveries(job_id) == {0: 1, 1: 2, 2: 1}  # chunk 1 ran twice, counted once
    total = len(PROMPTS) * len(COMPONENTS) * SAMPLES
    assert (status.progress.done, status.progress.total) == (total, total)
    assert_result_matches(store, job_id, reference)
    assert worker.alive


def test_a_chunk_whose_worker_keeps_dying_fails_the_job(
    worker: WorkerProcess, store: JobStore, book: ChunkBook, queue: JobQueue
) -> None:
    job_id = submit(store, queue, job_spec(PROMPTS[:3], samples=2))  # one chunk
    for delivery in (1, 2, 3):
        wait_for(lambda: book.deliveries(job_id).get(0) == delivery, 60, f"delivery {delivery} of chunk 0", worker)
        worker.kill_pool_process()

    status = wait_terminal(store, job_id, 60, worker)
    assert status.status == "failed"
    assert status.error is not None
    assert f"chunk 0 (prompts 0-2) of job {job_id} was delivered 4 times" in status.error
    assert "its worker keeps dying (out of memory?)" in status.error
    assert book.deliveries(job_id) == {0: 4}
    # The worker itself lives on and serves the next job.
    quick = submit(store, queue, job_spec(PROMPTS[:2], components=["mlp.0"], samples=1))
    assert wait_terminal(store, quick, 60, worker).status == "succeeded"


def test_a_chunk_of_a_lost_worker_runs_on_a_fresh_worker_after_the_visibility_timeout(
    worker: WorkerProcess,
    fault_env: dict[str, str],
    store: JobStore,
    book: ChunkBook,
    queue: JobQueue,
    reference: JobResult,
    tmp_path: Path,
) -> None:
    job_id = submit(store, queue, job_spec(PROMPTS))
    wait_for(running_mid_chunk(book, job_id, 0, delivery=1), 90, "chunk 0 to be running", worker)
    worker.kill()  # the whole worker: no shutdown, so chunk 0 stays unacknowledged in Redis
    killed_at = time.monotonic()

    fresh = WorkerProcess(fault_env, tmp_path / "fresh-worker.log")
    try:
        status = wait_terminal(store, job_id, 120, fresh)
        assert status.status == "succeeded", f"{status.error}\n{fresh.tail()}"
        assert time.monotonic() - killed_at >= VISIBILITY_TIMEOUT_S - 3  # chunk 0 waited for the timeout
        assert book.deliveries(job_id) == {0: 2, 1: 1, 2: 1}
        assert_result_matches(store, job_id, reference)
    finally:
        fresh.stop()
