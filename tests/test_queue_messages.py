"""The API publishes Celery task messages itself (service/core/queue.py): built by Celery's `as_task_v2` and pushed with
the API's own Redis clients instead of kombu's producer. These tests hold that message to the one kombu publishes
for the same `send_task`, field by field, for both the thread and the event-loop paths, and check Celery's publish
signals. Every stack test then has a real worker consume what the API pushed.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from celery.signals import after_task_publish, before_task_publish

from service.core.queue import TASK_DELIVER_CALLBACK, TASK_RUN_JOB, JobQueue, webhook_queue
from service.core.settings import Settings
from tests.conftest import private_settings

# Fields that differ between any two messages: ids, the delivery tag and the sender's process.
PER_MESSAGE_HEADERS = {"id", "root_id", "origin"}
PER_MESSAGE_PROPERTIES = {"correlation_id", "delivery_tag", "reply_to"}


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "messages") as settings:
        yield settings


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    hooks = webhook_queue(settings.queue_name)
    client.delete(settings.queue_name, f"_kombu.binding.{settings.queue_name}", hooks, f"_kombu.binding.{hooks}")
    client.close()


def _pop(client: redis.Redis, queue: str) -> dict[str, Any]:
    raw = client.rpop(queue)  # kombu's Redis transport pushes on the left and consumes from the right
    assert isinstance(raw, bytes), f"nothing on {queue}"
    message: dict[str, Any] = json.loads(raw)
    return message


def _kombu_message(
    settings: Settings, client: redis.Redis, task: str, args: list[object], on: str | None = None
) -> dict[str, Any]:
    """What Celery's send_task through kombu's producer puts on the queue `on` (default: the main queue; the API's
    former publish)."""
    name = on or settings.queue_name
    queue = JobQueue(settings)
    try:
        queue.celery_app.send_task(task, args=args, queue=name, ignore_result=True)
    finally:
        queue.close()
    return _pop(client, name)


def _assert_same_message(ours: dict[str, Any], kombu: dict[str, Any], task: str, args: list[object]) -> None:
    assert set(ours) == set(kombu)
    for name in ("content-type", "content-encoding"):
        assert ours[name] == kombu[name]
    decode = lambda message: json.loads(base64.b64decode(message["body"]))  # noqa: E731
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert decode(ours) == decode(kombu) == [args, {}, embed]
    assert set(ours["headers"]) == set(kombu["headers"])
    for name in set(kombu["headers"]) - PER_MESSAGE_HEADERS:
        assert ours["headers"][name] == kombu["headers"][name], name
    assert ours["headers"]["task"] == task
    assert ours["headers"]["root_id"] == ours["headers"]["id"] == ours["properties"]["correlation_id"]
    assert set(ours["properties"]) == set(kombu["properties"])
    for name in set(kombu["properties"]) - PER_MESSAGE_PROPERTIES:
        assert ours["properties"][name] == kombu["properties"][name], name


@pytest.mark.parametrize(("task", "args"), [(TASK_RUN_JOB, ["job-1"]), (TASK_DELIVER_CALLBACK, ["job-1", 1])])
def test_the_message_is_the_one_kombu_publishes(
    settings: Settings, client: redis.Redis, task: str, args: list[object]
) -> None:
    # Webhook deliveries go to a queue of their own (a webhook worker consumes it), jobs to the main queue.
    on = settings.queue_name if task == TASK_RUN_JOB else webhook_queue(settings.queue_name)
    kombu = _kombu_message(settings, client, task, args, on)
    queue = JobQueue(settings)
    try:
        if task == TASK_RUN_JOB:
            queue.enqueue("job-1")
        else:
            queue.notify("job-1")
    finally:
        queue.close()
    _assert_same_message(_pop(client, on), kombu, task, args)
    assert client.llen(on) == 0


def test_the_event_loop_pushes_the_same_message(settings: Settings, client: redis.Redis) -> None:
    kombu = _kombu_message(settings, client, TASK_RUN_JOB, ["job-2"])
    queue = JobQueue(settings)

    async def push() -> None:
        aclient = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            await queue.enqueue_async(aclient, "job-2")
        finally:
            await aclient.aclose()

    try:
        asyncio.run(push())
    finally:
        queue.close()
    _assert_same_message(_pop(client, settings.queue_name), kombu, TASK_RUN_JOB, ["job-2"])


def test_celery_publish_signals_are_sent_before_and_after_the_push(settings: Settings, client: redis.Redis) -> None:
    """tests/test_submit_recovery.py kills the API from `before_task_publish`: it must come before the push."""
    seen: list[tuple[str, object, int]] = []

    def before(sender: object = None, routing_key: str = "", **_: object) -> None:
        seen.append(("before", sender, int(client.llen(routing_key))))

    def after(sender: object = None, routing_key: str = "", **_: object) -> None:
        seen.append(("after", sender, int(client.llen(routing_key))))

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    queue = JobQueue(settings)
    try:
        queue.enqueue("job-3")
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
        queue.close()
    assert seen == [("before", TASK_RUN_JOB, 0), ("after", TASK_RUN_JOB, 1)]
