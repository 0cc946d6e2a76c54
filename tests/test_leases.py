"""Chunk leases, recovery sweeps, Redis retries and worker settings, on the session's real Redis.

The fault tests (tests/test_faults.py, tests/test_redis_outage.py) run the same pieces inside real `celery worker`
processes; these pin down each rule on its own and fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hydra_ablate_client.wire import JobSpec
from service.core.chunk_book import LEASE_LOST, ChunkBook, plan_chunks
from service.core.leases import REQUEUED, ChunkRef, Leases
from service.core.queue import JobQueue
from service.core.recovery import requeue_expired_chunks, resend_unplanned
from service.core.settings import Settings
from service.core.store import RESEND_AFTER_S, JobStore
from tests.conftest import private_settings
from worker.redis_retry import RedisOutage, RedisRetry
from worker.worker_settings import WorkerConfigError, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "leases") as settings:
        yield settings  # type: ignore[misc]


@pytest.fixture()
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings)
    yield store
    store.close()


def _spec(n_prompts: int = 4) -> JobSpec:
    return JobSpec(
        model="tiny-llama",
        prompts=[f"Prompt {i} is" for i in range(n_prompts)],
        answers=None,
        counterfactuals=None,
        components=["mlp.0"],
        ablation="zero",
        positions="final",
        metric="logit",
        norm_scale="clean",
        resample_samples=1,
        resample_from="random",
        mean_reference_prompts=None,
        seed=0,
    )


def _queued_tasks(store: JobStore, queue_name: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of the messages waiting on a Celery queue in Redis (kombu's JSON envelope)."""
    found = []
    for raw in store.client.lrange(queue_name, 0, -1):
        message = json.loads(raw)
        body = json.loads(__import__("base64").b64decode(message["body"]))
        found.append((message["headers"]["task"], body[0]))
    return found


# --- leases ------------------------------------------------------------------------------------------------------


def test_a_live_lease_keeps_a_second_run_out_and_a_lapsed_one_is_taken_over(store: JobStore) -> None:
    leases = Leases.for_store(store)
    assert leases.acquire("job", 0, "run-a", lease_s=0.5) is None
    assert leases.acquire("job", 0, "run-b", lease_s=0.5) == "run-a"  # never twice at once
    assert leases.renew("job", 0, "run-a", lease_s=0.5)
    time.sleep(0.7)  # run-a stopped renewing (paused, partitioned, dead)
    assert leases.acquire("job", 0, "run-b", lease_s=5) is None
    assert not leases.renew("job", 0, "run-a", lease_s=5)  # the stale holder learns it lost the lease
    assert not leases.still_holds("job", 0, "run-a") and leases.still_holds("job", 0, "run-b")
    assert not leases.release("job", 0, "run-a")  # and cannot release someone else's
    assert leases.holder("job", 0) == "run-b"
    assert leases.release("job", 0, "run-b") and leases.holder("job", 0) is None


def test_a_holder_known_dead_is_taken_over_before_its_lease_expires(store: JobStore) -> None:
    leases = Leases.for_store(store)
    assert leases.acquire("job", 1, "host:1:a", lease_s=60) is None
    assert leases.acquire("job", 1, "host:2:b", lease_s=60, dead=lambda holder: False) == "host:1:a"
    assert leases.acquire("job", 1, "host:2:b", lease_s=60, dead=lambda holder: holder == "host:1:a") is None
    assert leases.holder("job", 1) == "host:2:b"


def test_recording_is_fenced_by_the_lease(store: JobStore) -> None:
    from service.core.chunk_book import ChunkResult

    book, leases = ChunkBook.for_store(store), Leases.for_store(store)
    job_id = store.create(_spec(), 4).id
    store.mark_running(job_id)
    leases.acquire(job_id, 0, "stale", lease_s=0.2)
    time.sleep(0.3)
    leases.acquire(job_id, 0, "fresh", lease_s=30)
    empty: Any = None
    result = ChunkResult(
        index=0, start=0, stop=2, components=[], response_basis=[], near_tie_gap=0.0, prompts=[], provenance=empty
    )
    assert book.record_result(job_id, 0, result, "stale") == LEASE_LOST
    assert not book.is_done(job_id, 0)
    assert leases.fail_if_holder(store, job_id, 0, "stale", "a stale failure") == -1
    assert store.status(job_id).status == "running"  # type: ignore[union-attr]
    assert book.record_result(job_id, 0, result, "fresh") == 1
    assert leases.fail_if_holder(store, job_id, 0, "fresh", "a real failure") == 1
    assert store.status(job_id).error == "a real failure"  # type: ignore[union-attr]


def test_the_sweep_sends_a_lapsed_chunk_again_once_and_notes_why(store: JobStore, settings: Settings) -> None:
    book, leases = ChunkBook.for_store(store), Leases.for_store(store)
    job_id = store.create(_spec(4), 4).id
    store.mark_running(job_id)
    book.record_plan(job_id, plan_chunks(4, 2), 2)
    leases.acquire(job_id, 1, "vanished", lease_s=0.2)
    leases.acquire(job_id, 0, "alive", lease_s=60)
    ended = store.create(_spec(4), 4).id
    book.record_plan(ended, plan_chunks(4, 2), 2)
    leases.acquire(ended, 0, "vanished", lease_s=0.2)
    store.request_cancel(ended)
    time.sleep(0.3)

    sent: list[tuple[str, int, str]] = []

    def send_chunk(job: str, chunk: Any, model: str) -> str:
        sent.append((job, chunk.index, model))
        return f"task-{len(sent)}"

    assert requeue_expired_chunks(store, book, leases, send_chunk, recheck_s=60) == [ChunkRef(job_id, 1)]
    assert sent == [(job_id, 1, "tiny-llama")]
    assert book.task_ids(job_id) == {1: "task-1"}
    assert (leases.holder(job_id, 1) or "").startswith(REQUEUED)
    assert leases.holder(ended, 0) is None  # a lease of an ended job is dropped, not sent
    note = store.status(job_id).note  # type: ignore[union-attr]
    assert note is not None and "chunk 1 (prompts 2-3) was sent again: the worker running it stopped renewing" in note
    assert requeue_expired_chunks(store, book, leases, send_chunk, recheck_s=60) == []  # once, not every sweep
    # The run the sweep sent takes the requeued lease at once; the vanished holder cannot come back.
    assert leases.acquire(job_id, 1, "rerun", lease_s=60) is None
    assert not leases.renew(job_id, 1, "vanished", lease_s=60)


def test_a_chunk_whose_message_was_lost_before_it_started_is_sent_again(store: JobStore, settings: Settings) -> None:
    from service.core.queue import TASK_RUN_CHUNK, make_celery_client, model_queue, waiting_task_ids

    book, leases = ChunkBook.for_store(store), Leases.for_store(store)
    job_id = store.create(_spec(4), 4).id
    book.record_plan(job_id, plan_chunks(4, 2), 2)
    celery = make_celery_client(settings)
    queue = model_queue(settings.queue_name, "tiny-llama")
    try:
        waiting_id = celery.send_task(TASK_RUN_CHUNK, args=[job_id, 0, 0, 2], queue=queue).id  # a real message
    finally:
        celery.close()
    assert waiting_task_ids(store.client, queue) == {waiting_id}
    book.record_task(job_id, 0, waiting_id)
    book.record_task(job_id, 1, "a-message-lost-with-a-redis-crash")
    for index, task_id in book.task_ids(job_id).items():
        assert leases.mark_queued(job_id, index, task_id, recheck_s=0.2)
    assert leases.acquire(job_id, 0, "a-run", lease_s=60) is None  # a marker never keeps a run out...
    assert not leases.mark_queued(job_id, 0, waiting_id, recheck_s=0.2)  # ...and never replaces a run's lease
    leases.release(job_id, 0, "a-run")
    leases.mark_queued(job_id, 0, waiting_id, recheck_s=0.2)
    time.sleep(0.3)

    sent: list[int] = []

    def send_chunk(job: str, chunk: Any, model: str) -> str:
        sent.append(chunk.index)
        return "resent-task"

    def waiting(model_id: str, task_id: str) -> bool:
        return task_id in waiting_task_ids(store.client, model_queue(settings.queue_name, model_id))

    assert requeue_expired_chunks(store, book, leases, send_chunk, 60, waiting) == [ChunkRef(job_id, 1)]
    assert sent == [1]  # chunk 0 still waits in the queue: not duplicated
    assert (leases.holder(job_id, 0) or "").startswith("queued:") and leases.holder(job_id, 1) is not None
    note = store.status(job_id).note  # type: ignore[union-attr]
    assert note is not None and "chunk 1 (prompts 2-3) was sent again: its message was not in the queue" in note


# --- jobs stored but never sent ------------------------------------------------------------------------------------


def test_a_stored_job_is_recorded_unplanned_with_the_job_and_sent_again(store: JobStore, settings: Settings) -> None:
    plain = store.create(_spec(), 4).id
    owned = store.create(_spec(), 4, owner="alice", max_active=5).id  # the capped script writes it as well
    assert set(store.unplanned()) == {plain, owned}
    assert store.unplanned(due_by=time.time()) == []  # not due yet: the API is about to send them
    cancelled = store.create(_spec(), 4).id
    store.request_cancel(cancelled)

    queue = JobQueue(settings)
    try:
        sent = resend_unplanned(store, queue.enqueue, everything=True)  # what the API does at start-up
    finally:
        queue.close()
    assert sorted(sent) == sorted([plain, owned])
    assert sorted(_queued_tasks(store, settings.queue_name)) == sorted(
        [("hydra.run_job", [plain]), ("hydra.run_job", [owned])]
    )
    assert cancelled not in store.unplanned()  # ended jobs leave the set
    # Sent again later only if still unplanned, and with a growing wait.
    due = store.client.zscore(store.keys.unplanned, plain)
    assert due is not None and due >= time.time() + RESEND_AFTER_S - 5
    store.mark_planned(plain)
    assert store.unplanned() == [owned]


# --- riding out Redis outages ----------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_redis_calls_are_retried_with_backoff_within_the_budget() -> None:
    clock = _Clock()
    retry = RedisRetry(10.0, clock=clock, sleep=clock.sleep)
    failures = iter([redis.ConnectionError("down")] * 5)

    def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    assert retry.call("read", flaky) == "ok"
    assert 0.1 + 0.2 + 0.4 + 0.8 + 1.6 == pytest.approx(clock.now)  # doubling waits
    assert retry.outage_since is None

    def down() -> str:
        raise redis.ConnectionError("down")

    assert retry.poll("check", down, "default") == "default"  # a poll does not wait...
    clock.now += 11
    with pytest.raises(RedisOutage, match=r"more than 10 s \(HYDRA_REDIS_OUTAGE_S\) while the worker tried to"):
        retry.poll("check", down, "default")  # ...until the outage outlasts the budget
    with pytest.raises(ValueError):
        retry.call("read", lambda: (_ for _ in ()).throw(ValueError("not a connection error")))


# --- worker settings -------------------------------------------------------------------------------------------------


def test_worker_settings_are_checked_once_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.model_cache import DTYPES
    from worker.worker_settings import DTYPE_NAMES

    assert tuple(DTYPES) == DTYPE_NAMES
    monkeypatch.setenv("HYDRA_MODEL_CACHE_BYTES", "8e9")
    monkeypatch.setenv("HYDRA_LEASE_S", "30")
    monkeypatch.setenv("HYDRA_REDIS_OUTAGE_S", "10")
    parsed = WorkerSettings.from_env()
    assert (parsed.model_cache_bytes, parsed.lease_s, parsed.renew_s) == (8_000_000_000, 30.0, 7.5)
    assert parsed.clean_cache_bytes == 1 << 30  # the default
    monkeypatch.setenv("HYDRA_CLEAN_CACHE_BYTES", "0")  # off
    assert WorkerSettings.from_env().clean_cache_bytes == 0
    for name, value, message in [
        ("HYDRA_CLEAN_CACHE_BYTES", "-1", "HYDRA_CLEAN_CACHE_BYTES must be 0 or more, got -1"),
        ("HYDRA_CLEAN_CACHE_BYTES", "1GB", "HYDRA_CLEAN_CACHE_BYTES must be a number of bytes, got '1GB'"),
        ("HYDRA_MODEL_CACHE_SIZE", "two", "HYDRA_MODEL_CACHE_SIZE must be an integer, got 'two'"),
        ("HYDRA_MODEL_CACHE_SIZE", "0", "HYDRA_MODEL_CACHE_SIZE must be at least 1"),
        ("HYDRA_DTYPE", "fp8", "HYDRA_DTYPE must be one of float32, bfloat16, float16"),
        ("HYDRA_REDIS_OUTAGE_S", "45", "HYDRA_REDIS_OUTAGE_S (45) must be below HYDRA_LEASE_S (30)"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(WorkerConfigError, match=re.escape(message)):
                WorkerSettings.from_env()


def test_a_worker_with_a_bad_setting_does_not_start(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "HYDRA_MODEL_CACHE_SIZE": "two", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "solo", "-Q", "nothing"]
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode != 0
    assert "hydra-ablate worker: bad configuration: HYDRA_MODEL_CACHE_SIZE must be an integer, got 'two'" in (
        finished.stderr + finished.stdout
    )


def test_a_real_redis_restart_is_ridden_out_by_the_retry(tmp_path: Path) -> None:
    """A private Redis (append-only file) shut down and started again 2 s later: a store call made while it is
    away returns once it is back, with the data written before the outage."""
    import threading

    from service.core.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = JobStore.from_settings(Settings(redis_url=server.url, key_prefix="restart:"), socket_timeout=5)
    try:
        job_id = store.create(_spec(), 4).id
        server.stop()  # SIGTERM: Redis writes its append-only file and exits, as `redis-cli shutdown` does
        restart = threading.Timer(2.0, server.start)
        restart.start()
        retry = RedisRetry(budget_s=30)
        status = retry.call("read the job", lambda: store.status(job_id))
        restart.join()
        assert status is not None and status.status == "queued"
        assert retry.outage_since is None
    finally:
        store.close()
        server.stop()
