"""`Idempotency-Key` on POST /v1/jobs against the real app, Redis and broker queue: a retried submit never queues a
second job, and a reused key with another body is refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from litestar.testing import TestClient

from service.api.app import create_app
from service.core.redis_replies import bytes_or_none
from service.core.settings import Settings
from service.core.store import JobStore
from tests.checks import present
from tests.test_api import assert_problem
from tests.test_auth import ALICE, BOB, JOB, TWO, auth, client, settings, store

__all__ = ["client", "settings", "store"]


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def post(client: TestClient, key: str | None, body: Any = None, api_key: str = ALICE, **kwargs: Any) -> Any:
    headers = {**auth(api_key), **({"Idempotency-Key": key} if key is not None else {})}
    if isinstance(body, bytes):
        return client.post("/v1/jobs", content=body, headers={**headers, "content-type": "application/json"})
    return client.post("/v1/jobs", json=JOB if body is None else body, headers=headers, **kwargs)


def test_the_same_key_and_body_return_the_same_job(
    client: TestClient, settings: Settings, broker: redis.Redis
) -> None:
    first = post(client, "retry-me")
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = post(client, "retry-me")
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    # The same JSON spelled differently (key order, whitespace) is the same request.
    respelled = b'{ "components": ["attn.0"],  "prompts": %s, "model": "tiny" }' % str(TWO).replace("'", '"').encode()
    assert post(client, "retry-me", respelled).json()["id"] == first.json()["id"]

    assert broker.llen(settings.queue_name) == 1  # queued once
    assert client.get("/v1/jobs", headers=auth(ALICE)).json()["total"] == 1


def test_the_same_key_with_another_body_is_409(client: TestClient, settings: Settings, broker: redis.Redis) -> None:
    first = post(client, "k1").json()
    problem = assert_problem(post(client, "k1", {**JOB, "components": ["mlp.0"]}), 409, "'k1'", "different request")
    assert first["id"] in problem["detail"]
    assert broker.llen(settings.queue_name) == 1
    # Without a key, or with a new key, the same body makes new jobs.
    assert post(client, None).json()["id"] != first["id"]
    assert post(client, "k2").json()["id"] != first["id"]
    assert broker.llen(settings.queue_name) == 3


def test_keys_are_per_api_key(client: TestClient) -> None:
    alice = post(client, "shared-name").json()
    bob = post(client, "shared-name", api_key=BOB).json()
    assert alice["id"] != bob["id"] and (alice["owner"], bob["owner"]) == ("alice", "bob")
    assert post(client, "shared-name", {**JOB, "seed": 1}, api_key=BOB).status_code == 409


def test_a_refused_submit_releases_its_key(client: TestClient, settings: Settings, broker: redis.Redis) -> None:
    bad = {**JOB, "components": ["attn.40"]}
    assert_problem(post(client, "fix-and-retry", bad), 422, "layer 40 is out of range")
    fixed = post(client, "fix-and-retry")
    assert fixed.status_code == 202 and "idempotent-replayed" not in fixed.headers
    assert broker.llen(settings.queue_name) == 1


def test_the_record_lives_as_long_as_jobs(client: TestClient, settings: Settings, store: JobStore) -> None:
    job = post(client, "ttl").json()
    records = list(store.client.scan_iter(match=f"{settings.key_prefix}idem:alice:*"))
    assert len(records) == 1
    assert settings.result_ttl_s - 5 <= store.client.ttl(records[0]) <= settings.result_ttl_s
    assert b"ttl" not in records[0]  # the client's key is hashed into the record's name
    assert job["id"].encode() in present(bytes_or_none(store.client.get(records[0])))


def test_concurrent_retries_make_one_job(settings: Settings, store: JobStore, broker: redis.Redis) -> None:
    """Four API processes get the same request at once: one creates the job, the others answer with it."""
    apps = [TestClient(create_app(settings)) for _ in range(4)]
    for app in apps:
        app.__enter__()
    barrier = threading.Barrier(len(apps))
    answers: list[Any] = [None] * len(apps)

    def send(index: int) -> None:
        barrier.wait()
        answers[index] = post(apps[index], "race")

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(apps))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for app in apps:
            app.__exit__(None, None, None)
    assert [answer.status_code for answer in answers] == [202] * 4
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert sum("idempotent-replayed" not in answer.headers for answer in answers) == 1
    assert broker.llen(settings.queue_name) == 1


def test_the_header_is_documented_and_bounded(client: TestClient) -> None:
    assert_problem(post(client, "x" * 256), 400, "idempotency_key", "length <= 255")
    operation = client.get("/schema/openapi.json").json()["paths"]["/v1/jobs"]["post"]
    (header,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert header["in"] == "header" and header["required"] is False
    assert "409" in operation["responses"]
