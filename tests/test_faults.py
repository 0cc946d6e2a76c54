"""Workers that die mid-chunk, for real: `celery worker` subprocesses (prefork, one pool process) are SIGKILLed.

- Pool process killed (what the out-of-memory killer does): the worker's main process requeues the chunk at once
  (acks_late + reject_on_worker_lost); the new run sees that the lease holder's process is gone, takes the lease
  over and runs the chunk again; the job's numbers are unchanged.
- Pool process killed at every delivery: the delivery after HYDRA_MAX_DELIVERIES fails the job with a message.
- A worker paused past its lease (SIGSTOP: a frozen machine, a partition): another worker's sweep sends the chunk
  again and it runs there; the paused one, resumed, finds its lease gone and stops without recording.
- Whole worker killed (the machine vanished): its lease lapses and another worker runs the chunk within
  lease + sweep (8 s + 1 s here; 120 s + 30 s by default), not after the broker's visibility timeout (600 s here,
  7 h by default).

The workers run against their own Redis database (own broker keys), key prefix and queue, with their own tiny
model, so the session's in-thread worker never sees these tasks. The reference is the job run in one piece
in-process.
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

from hydra_ablate_client.wire import JobResult, JobSpec, JobStatus
from service.core.chunk_book import ChunkBook
from service.core.leases import Leases
from service.core.queue import JobQueue
from service.core.settings import Settings
from service.core.store import JobStore
from tests.numbers import assert_same_numbers
from tests.worker_gate import GATE_ENV, Gate, Held

MODEL = "tiny-fault"
PROMPTS = [f"Sentence number {i} is about the weather in the city of Paris, which is famous for" for i in range(9)]
COMPONENTS = [f"{kind}.{layer}" for layer in range(3) for kind in ("attn", "mlp")] + [
    f"head.{layer}.{head}" for layer in range(3) for head in range(4)
]
SAMPLES = 8
CHUNK_PROMPTS = 3  # 3 chunks of a few seconds each (one ablated run per batch, see fault_env)
VISIBILITY_TIMEOUT_S = 600  # far above the lease: recovery below must come from the lease, not the broker
LEASE_S = 8
SWEEP_S = 1


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
        # Every chunk runs its own clean passes (none kept from an earlier job or chunk), or a chunk of prompts
        # seen before ends before the fault can be injected mid-chunk.
        "HYDRA_CLEAN_CACHE_BYTES": "0",
        "HYDRA_MAX_DELIVERIES": "3",
        "HYDRA_CHUNK_TIME_LIMIT_S": "300",  # generous: a loaded machine runs these chunks slowly
        "HYDRA_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "HYDRA_LEASE_S": str(LEASE_S),
        "HYDRA_SWEEP_S": str(SWEEP_S),
        "HYDRA_REDIS_OUTAGE_S": "4",
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
    """`celery -A worker.celery_app worker -P prefork -c 1 -Q <queue>` in its own session, logging to a file
    (`queue` and `pool` for another kind of worker, e.g. the webhook queue's: tests/test_webhook_isolation.py;
    `gate`, a folder, for one the test can hold at its progress reports: tests/worker_gate.py)."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        queue: str | None = None,
        pool: tuple[str, str] = ("prefork", "1"),
        gate: Path | None = None,
    ) -> None:
        self.log = log
        if gate is not None:
            env = {**env, GATE_ENV: str(gate)}
        entry = "celery" if gate is None else "tests.worker_gate"  # the same command line, with the gate installed
        command = [
            sys.executable, "-m", entry, "-A", "worker.celery_app", "worker", "-P", pool[0], "-c", pool[1],
            "-Q", queue or env["HYDRA_QUEUE"], "-n", f"fault-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
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

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Until the worker consumes (its log says `ready.`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text(errors="replace"):
                return
            if not self.alive:
                break
            time.sleep(0.1)
        raise AssertionError(f"the worker did not get ready\n{self.tail()}")

    def runs(self, pid: int) -> bool:
        """True when `pid` is this worker's pool process."""
        return self.alive and any(child.pid == pid for child in psutil.Process(self.process.pid).children())

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

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
def gate(tmp_path_factory: pytest.TempPathFactory) -> Gate:
    return Gate(tmp_path_factory.mktemp("fault-gate"))


@pytest.fixture(autouse=True)
def _gate_opened_after_each_test(gate: Gate) -> Iterator[None]:
    yield
    gate.open()  # a test that failed while holding a worker must not leave it waiting for the next test


@pytest.fixture(scope="module")
def worker(
    fault_env: dict[str, str], gate: Gate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    process = WorkerProcess(fault_env, tmp_path_factory.mktemp("fault-logs") / "worker.log", gate=gate.folder)
    try:
        yield process
    finally:
        process.stop()


def compute_reference(env: dict[str, str], spec: JobSpec) -> JobResult:
    """The job in one piece, in this process, on the workers' model folder and batching (so the numbers agree to
    float32 rounding; compared within tolerance)."""
    from worker.chunk_execution import execute
    from worker.model_cache import load_model
    from worker.model_sources import ModelSource

    location = env["HYDRA_MODELS"].split("=", 1)[1]
    loaded = load_model(ModelSource(id=MODEL, location=location))
    return execute("reference", spec, loaded, batch_tokens=int(env["HYDRA_BATCH_TOKENS"]))


@pytest.fixture(scope="module")
def reference(fault_env: dict[str, str]) -> JobResult:
    return compute_reference(fault_env, job_spec(PROMPTS))


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


def mid_chunk(
    book: ChunkBook, job_id: str, index: int, delivery: int, samples: int = SAMPLES
) -> Callable[[Held], bool]:
    """A worker held (tests/worker_gate.py) once the chunk's `delivery`-th run has measured at least one prompt and
    more are left."""
    per_prompt = len(COMPONENTS) * samples

    def wanted(held: Held) -> bool:
        return (
            held.job_id == job_id
            and held.chunk == index
            and per_prompt <= held.done < CHUNK_PROMPTS * per_prompt
            and book.deliveries(job_id).get(index) == delivery
        )

    return wanted


def assert_result_matches(store: JobStore, job_id: str, reference: JobResult) -> None:
    """The workers' chunks against the job in one piece here: another process and split, so within tolerance."""
    raw = store.result(job_id)
    assert raw is not None
    result = msgspec.json.decode(raw, type=JobResult)
    assert_same_numbers(msgspec.to_builtins(result.prompts), msgspec.to_builtins(reference.prompts))
    assert_same_numbers(msgspec.to_builtins(result.summary), msgspec.to_builtins(reference.summary))


def test_a_chunk_whose_pool_process_is_killed_runs_again_with_the_same_numbers(
    worker: WorkerProcess, gate: Gate, store: JobStore, book: ChunkBook, queue: JobQueue, reference: JobResult
) -> None:
    job_id = submit(store, queue, job_spec(PROMPTS))
    held = gate.catch(mid_chunk(book, job_id, 1, delivery=1), 180, "chunk 1 to be running", worker.tail)
    assert held.pid == worker.pool_process().pid
    worker.kill_pool_process()
    gate.open()

    status = wait_terminal(store, job_id, 90, worker)
    assert status.status == "succeeded", f"{status.error}\n{worker.tail()}"
    assert book.deliveries(job_id) == {0: 1, 1: 2, 2: 1}  # chunk 1 ran twice, counted once
    total = len(PROMPTS) * len(COMPONENTS) * SAMPLES
    assert (status.progress.done, status.progress.total) == (total, total)
    assert_result_matches(store, job_id, reference)
    assert worker.alive


def test_a_chunk_whose_worker_keeps_dying_fails_the_job(
    worker: WorkerProcess, gate: Gate, store: JobStore, book: ChunkBook, queue: JobQueue
) -> None:
    job_id = submit(store, queue, job_spec(PROMPTS[:3], samples=2))  # one chunk
    for delivery in (1, 2, 3):

        def in_delivery(held: Held, delivery: int = delivery) -> bool:
            return held.job_id == job_id and book.deliveries(job_id).get(0) == delivery

        held = gate.catch(in_delivery, 120, f"delivery {delivery} of chunk 0", worker.tail)
        worker.kill_pool_process()
        gate.release(held)  # its process is gone; the next delivery waits at its own first report
    gate.open()

    status = wait_terminal(store, job_id, 60, worker)
    assert status.status == "failed"
    assert status.error is not None
    assert f"chunk 0 (prompts 0-2) of job {job_id} was delivered 4 times" in status.error
    assert "its worker keeps dying (out of memory?)" in status.error
    assert book.deliveries(job_id) == {0: 4}
    # The worker itself lives on and serves the next job.
    quick = submit(store, queue, job_spec(PROMPTS[:2], components=["mlp.0"], samples=1))
    assert wait_terminal(store, quick, 60, worker).status == "succeeded"


@pytest.fixture(scope="module")
def standby(
    fault_env: dict[str, str], gate: Gate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A second worker on the same queues, ready before the fault (a machine standing by)."""
    process = WorkerProcess(fault_env, tmp_path_factory.mktemp("standby-logs") / "standby.log", gate=gate.folder)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


SMALL = job_spec(PROMPTS[:6], samples=4)  # two chunks: enough to lose one, quick to rerun


@pytest.fixture(scope="module")
def small_reference(fault_env: dict[str, str]) -> JobResult:
    return compute_reference(fault_env, SMALL)


def running_chunk_0(
    gate: Gate, store: JobStore, book: ChunkBook, workers: list[WorkerProcess], job_id: str
) -> tuple[WorkerProcess, WorkerProcess]:
    """Hold chunk 0 mid-chunk at the gate; returns (the worker running it, the other one), found by the lease
    holder's process id. The gate stays closed: the caller opens it once it has struck."""
    held = gate.catch(mid_chunk(book, job_id, 0, delivery=1, samples=4), 180, "chunk 0 to be running", workers[0].tail)
    holder = Leases.for_store(store).holder(job_id, 0)
    assert holder is not None
    pid = int(holder.split(":")[1])
    assert pid == held.pid, (holder, held)
    running = [w for w in workers if w.runs(pid)]
    assert len(running) == 1, holder
    return running[0], next(w for w in workers if w is not running[0])


def test_a_paused_worker_loses_its_chunk_to_another_and_records_nothing_when_it_resumes(
    worker: WorkerProcess, standby: WorkerProcess, gate: Gate, store: JobStore, book: ChunkBook, queue: JobQueue,
    small_reference: JobResult,
) -> None:  # fmt: skip
    job_id = submit(store, queue, SMALL)
    holder, other = running_chunk_0(gate, store, book, [worker, standby], job_id)
    holder.pause()  # frozen: no heartbeat, but its process lives
    gate.open()  # resumed, it goes on from the report it was held at
    try:
        wait_for(lambda: book.deliveries(job_id).get(0) == 2, 180, "chunk 0 to run on the other worker", other)
        assert "chunk 0 (prompts 0-2) was sent again" in (store.status(job_id).note or "")  # type: ignore[union-attr]
    finally:
        holder.resume()  # while the other worker runs chunk 0: the old holder must notice and stop
    status = wait_terminal(store, job_id, 180, other)
    assert status.status == "succeeded", f"{status.error}\n{other.tail()}"
    wait_for(lambda: "chunk 0 lost its lease" in holder.log.read_text(errors="replace") or
             "another run holds its lease" in holder.log.read_text(errors="replace"),
             60, "the resumed worker to notice it lost the lease", holder)  # fmt: skip
    assert book.deliveries(job_id) == {0: 2, 1: 1}
    assert_result_matches(store, job_id, small_reference)


def test_a_chunk_of_a_vanished_worker_runs_on_another_worker_within_the_lease(
    worker: WorkerProcess, standby: WorkerProcess, gate: Gate, store: JobStore, book: ChunkBook, queue: JobQueue,
    small_reference: JobResult,
) -> None:  # fmt: skip
    job_id = submit(store, queue, SMALL)
    holder, other = running_chunk_0(gate, store, book, [worker, standby], job_id)
    holder.kill()  # main and pool process at once: no shutdown, chunk 0 stays unacknowledged in the broker
    gate.open()
    killed_at = time.monotonic()
    # The lapsed lease is noticed and the chunk sent to the live worker within lease + sweep (+ slack for a loaded
    # machine), far below the broker's visibility timeout; it runs there once that worker is free.
    wait_for(lambda: "chunk 0 (prompts 0-2) was sent again" in (store.status(job_id).note or ""),  # type: ignore[union-attr]
             LEASE_S + SWEEP_S + 30, "chunk 0 to be sent to the other worker", other)  # fmt: skip
    assert time.monotonic() - killed_at < LEASE_S + SWEEP_S + 30 < VISIBILITY_TIMEOUT_S
    status = wait_terminal(store, job_id, 180, other)
    assert status.status == "succeeded", f"{status.error}\n{other.tail()}"
    assert book.deliveries(job_id) == {0: 2, 1: 1}
    assert_result_matches(store, job_id, small_reference)
