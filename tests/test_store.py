"""JobStore against a real Redis: the job state machine (including cancel races), TTLs, paging and models."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import msgspec
import pytest
import redis

from hydra_ablate_client.wire import JobSpec, ModelInfo
from service.core.redis_replies import bytes_or_none
from service.core.store import JobStore
from tests.checks import present

TTL_S = 3600


def make_spec(n_prompts: int = 2, components: list[str] | None = None) -> JobSpec:
    return JobSpec(
        model="tiny",
        prompts=[f"prompt {i}" for i in range(n_prompts)],
        answers=None,
        counterfactuals=None,
        components=components or ["attn.0", "mlp.0"],
        ablation="resample",
        positions="final",
        metric="logit",
        norm_scale="clean",
        resample_samples=1,
        resample_from="next",
        mean_reference_prompts=None,
        seed=0,
    )


def model_info(model_id: str, n_layers: int = 4) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        architecture="LlamaForCausalLM",
        n_layers=n_layers,
        n_heads=2,
        n_kv_heads=1,
        d_model=8,
        vocab_size=100,
        parallel_blocks=False,
        source="local",
    )


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    """A store whose keys live under a prefix of this test's own; removed afterwards."""
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-store:{uuid.uuid4().hex}:"
    yield JobStore(client, key_prefix=prefix, ttl_s=TTL_S)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def test_create_registers_a_queued_job(store: JobStore) -> None:
    status = store.create(make_spec(), total=4)
    assert len(status.id) == 32 and int(status.id, 16) >= 0  # uuid4 hex
    assert status.status == "queued"
    assert (status.progress.done, status.progress.total) == (0, 4)
    assert status.created_at.endswith("Z")
    datetime.fromisoformat(status.created_at)
    assert store.status(status.id) == status
    assert store.spec(status.id) == make_spec()
    assert store.result(status.id) is None
    assert not store.is_cancelled(status.id)


def test_unknown_ids_read_as_absent(store: JobStore) -> None:
    missing = uuid.uuid4().hex
    assert store.status(missing) is None
    assert store.spec(missing) is None
    assert store.result(missing) is None
    assert store.request_cancel(missing) is None
    assert store.mark_running(missing) is False
    assert store.set_progress(missing, 1, 2) is False
    assert store.mark_succeeded(missing, b"{}") is False
    assert store.mark_failed(missing, "boom") is False
    assert store.status(missing) is None  # nothing was created by the attempts


def test_success_path(store: JobStore) -> None:
    job = store.create(make_spec(), total=4)
    assert store.set_progress(job.id, 1, 4) is False  # not running yet
    assert store.mark_running(job.id) is True
    assert store.mark_running(job.id) is False  # claimed once only
    running = store.status(job.id)
    assert running is not None and running.status == "running" and running.started_at is not None
    assert store.set_progress(job.id, 3, 4) is True
    assert present(store.status(job.id)).progress.done == 3
    assert store.mark_succeeded(job.id, b'{"id": "x"}') is True
    done = present(store.status(job.id))
    assert done.status == "succeeded" and done.finished_at is not None
    assert (done.progress.done, done.progress.total) == (4, 4)
    assert store.result(job.id) == b'{"id": "x"}'
    # a finished job no longer moves
    assert store.mark_failed(job.id, "late") is False
    assert store.set_progress(job.id, 1, 4) is False
    assert store.mark_succeeded(job.id, b"other") is False
    assert store.result(job.id) == b'{"id": "x"}'


def test_failure_from_queued_and_from_running(store: JobStore) -> None:
    queued = store.create(make_spec(), total=4)
    assert store.mark_failed(queued.id, "spec could not be read") is True
    failed = present(store.status(queued.id))
    assert failed.status == "failed" and failed.error == "spec could not be read" and failed.finished_at
    assert store.mark_running(queued.id) is False

    running = store.create(make_spec(), total=4)
    store.mark_running(running.id)
    assert store.mark_failed(running.id, "CUDA out of memory") is True
    assert present(store.status(running.id)).error == "CUDA out of memory"
    assert store.mark_succeeded(running.id, b"{}") is False
    assert store.result(running.id) is None


def test_cancel_queued_job_never_starts(store: JobStore) -> None:
    job = store.create(make_spec(), total=4)
    cancelled = store.request_cancel(job.id)
    assert cancelled is not None and cancelled.status == "cancelled" and cancelled.finished_at
    assert store.is_cancelled(job.id)
    assert store.mark_running(job.id) is False
    assert store.mark_failed(job.id, "x") is False
    assert present(store.status(job.id)).status == "cancelled"
    assert present(store.request_cancel(job.id)).status == "cancelled"  # idempotent


def test_cancel_running_job_wins_over_the_worker_finishing(store: JobStore) -> None:
    job = store.create(make_spec(), total=4)
    store.mark_running(job.id)
    store.set_progress(job.id, 2, 4)
    assert present(store.request_cancel(job.id)).status == "cancelled"
    assert store.is_cancelled(job.id)
    assert store.set_progress(job.id, 3, 4) is False
    assert store.mark_succeeded(job.id, b"{}") is False
    assert store.mark_failed(job.id, "stopped") is False
    final = present(store.status(job.id))
    assert final.status == "cancelled" and final.progress.done == 2
    assert store.result(job.id) is None


def test_cancel_after_finishing_changes_nothing(store: JobStore) -> None:
    job = store.create(make_spec(), total=4)
    store.mark_running(job.id)
    store.mark_succeeded(job.id, b"{}")
    before = store.status(job.id)
    assert store.request_cancel(job.id) == before
    assert not store.is_cancelled(job.id)
    assert store.result(job.id) == b"{}"


def _race(*actions: Callable[..., Any]) -> list[Any]:
    """Run the actions at the same instant on threads; their return values in order."""
    barrier = threading.Barrier(len(actions))
    results: list[Any] = [None] * len(actions)

    def run(i: int, action) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        results[i] = action()

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_cancel_racing_a_finishing_worker_leaves_one_consistent_outcome(store: JobStore) -> None:
    outcomes = set()
    for _ in range(40):
        job = store.create(make_spec(), total=4)
        store.mark_running(job.id)
        succeeded, cancel = _race(
            lambda j=job.id: store.mark_succeeded(j, b'{"ok": true}'), lambda j=job.id: store.request_cancel(j)
        )
        final = present(store.status(job.id))
        if succeeded:
            assert final.status == "succeeded" and cancel.status == "succeeded"
            assert store.result(job.id) == b'{"ok": true}' and not store.is_cancelled(job.id)
        else:
            assert final.status == "cancelled" and cancel.status == "cancelled"
            assert store.result(job.id) is None and store.is_cancelled(job.id)
        outcomes.add(final.status)
    assert outcomes <= {"succeeded", "cancelled"}


def test_cancel_racing_a_claiming_worker(store: JobStore) -> None:
    for _ in range(40):
        job = store.create(make_spec(), total=4)
        claimed, _ = _race(lambda j=job.id: store.mark_running(j), lambda j=job.id: store.request_cancel(j))
        assert present(store.status(job.id)).status == "cancelled"  # cancel applies whether or not the claim came first
        assert store.is_cancelled(job.id)  # so a worker that claimed it sees the flag at its next check
        if not claimed:
            assert present(store.status(job.id)).started_at is None


def test_exactly_one_worker_claims_a_job(store: JobStore) -> None:
    job = store.create(make_spec(), total=4)
    claims = _race(*[lambda: store.mark_running(job.id) for _ in range(8)])
    assert claims.count(True) == 1


def test_every_job_key_expires(store: JobStore) -> None:
    client = store.client
    job = store.create(make_spec(), total=4)
    assert 0 < client.ttl(store.keys.job(job.id)) <= TTL_S
    store.mark_running(job.id)
    store.mark_succeeded(job.id, b"{}")
    assert 0 < client.ttl(store.keys.job(job.id)) <= TTL_S
    assert 0 < client.ttl(store.keys.result(job.id)) <= TTL_S

    other = store.create(make_spec(), total=4)
    store.request_cancel(other.id)
    assert 0 < client.ttl(store.keys.cancel(other.id)) <= TTL_S
    assert 0 < client.ttl(store.keys.job(other.id)) <= TTL_S


def test_expired_jobs_disappear(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    short = JobStore(client, key_prefix=f"test-store:{uuid.uuid4().hex}:", ttl_s=1)
    job = short.create(make_spec(), total=4)
    time.sleep(1.2)
    assert short.status(job.id) is None
    page = short.page(0, 10)
    assert page.total == 0 and page.items == []
    assert client.zcard(short.keys.jobs) == 0  # the index forgot it too


def test_paging_newest_first(store: JobStore) -> None:
    ids = [store.create(make_spec(), total=i + 1).id for i in range(5)]
    first = store.page(0, 2)
    assert first.total == 5 and (first.offset, first.limit) == (0, 2)
    assert [s.id for s in first.items] == ids[::-1][:2]
    last = store.page(4, 2)
    assert [s.id for s in last.items] == [ids[0]]
    assert store.page(10, 2).items == []
    everything = store.page(0, 500)
    assert [s.id for s in everything.items] == ids[::-1]


def test_paging_prunes_only_dead_index_entries(store: JobStore) -> None:
    alive_old = store.create(make_spec(), total=1)
    dead = store.create(make_spec(), total=1)
    fresh = store.create(make_spec(), total=1)
    long_ago = time.time() - 2 * TTL_S
    # a job created long ago but still alive (it finished late, so its TTL was refreshed) ...
    store.client.zadd(store.keys.jobs, {alive_old.id: long_ago})
    # ... and one whose hash expired
    store.client.zadd(store.keys.jobs, {dead.id: long_ago - 1})
    store.client.delete(store.keys.job(dead.id))
    page = store.page(0, 10)
    assert page.total == 2
    assert [s.id for s in page.items] == [fresh.id, alive_old.id]
    assert store.client.zscore(store.keys.jobs, dead.id) is None


def test_models_are_advertised_and_listed(store: JobStore) -> None:
    assert store.models() == []
    store.advertise_model(model_info("zeta"))
    store.advertise_model(model_info("alpha"))
    store.advertise_model(model_info("zeta", n_layers=6))  # re-advertising replaces the record
    store.client.hset(store.keys.models, "broken", b"not json")
    store.client.set(store.keys.served("broken"), b"1")  # served, but its record is unreadable: skipped
    listed = store.models()
    assert [m.id for m in listed] == ["alpha", "zeta"]
    assert listed[1].n_layers == 6
    record = present(bytes_or_none(store.client.hget(store.keys.models, "alpha")))
    assert msgspec.json.decode(record, type=ModelInfo) == model_info("alpha")


def test_a_model_no_live_worker_renews_stops_being_offered(store: JobStore) -> None:
    store.advertise_model(model_info("kept"), ttl_s=1)
    store.advertise_model(model_info("lapsed"), ttl_s=1)
    assert [m.id for m in store.models()] == ["kept", "lapsed"]
    time.sleep(0.6)
    store.keep_serving(["kept"], ttl_s=1)  # a worker's heartbeat
    time.sleep(0.6)
    assert [m.id for m in store.models()] == ["kept"]
