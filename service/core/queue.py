"""The Celery side of the API: publish job ids, ping workers. No task code here, so no torch is ever imported.

The worker builds its Celery app from the same `celery_config`, so both ends agree on broker, queues and the
delivery guarantees long GPU jobs need.

Publishing: the API builds each task message with Celery's own `as_task_v2` (protocol 2, JSON body) in the form
kombu's Redis transport stores it, and pushes it with a Redis client of its own: the sync one from threads, the
event loop's asyncio one from the submit route. kombu's producer cost 0.33 ms of CPU per publish (a new
redis.Redis object and a binding lookup each time, a producer pool that grows by a connection per concurrent
thread), the message and its LPUSH 0.07 ms, and the submit route no longer needs a thread. Celery's
`before_task_publish` / `after_task_publish` signals are sent as Celery sends them. tests/test_queue_messages.py
checks the message against one kombu publishes, and every stack test has a real worker consume them.

Queues and tasks
  `{HYDRA_QUEUE}` (default `hydra`)   `hydra.run_job(job_id)`: sent by the API; cheap, any worker plans the job's
                                      chunks and sends one `hydra.run_chunk` per chunk.
  `{HYDRA_QUEUE}.{model}`             `hydra.run_chunk(job_id, index, start, stop)`: one chunk of prompts, consumed
                                      only by workers serving that model (`model_queue` sanitises the id). Workers
                                      add these queues themselves on start (worker/celery_app.py), so
                                      `celery -A worker.celery_app worker -Q hydra` is enough.

Delivery guarantees and time limits (the numbers, with the defaults)
  - `task_acks_late` + `task_reject_on_worker_lost`: a chunk is acknowledged after it ran. If the pool process
    running it dies (SIGKILL, out-of-memory killer), the worker's main process requeues the message at once and
    the chunk runs again (its writes are idempotent). The worker counts deliveries per chunk in Redis; the
    delivery after `HYDRA_MAX_DELIVERIES` (3) fails the job with a message naming the chunk.
  - If the whole worker dies without a shutdown (SIGKILL of the main process, the machine is lost), the message
    stays unacknowledged in Redis until the broker's visibility timeout passes; then a worker puts it back on the
    queue (at its start, or in its periodic sweep: every tenth of the timeout, at most every 100 s), and it runs
    again, counted as another delivery. A warm or cold shutdown (SIGTERM, SIGINT) hands unacknowledged messages
    back at once. The unacknowledged set (`unacked`, `unacked_index`) is per Redis database, not per queue:
    deployments sharing one database should share these settings too.
  - Hard time limit per task: `HYDRA_CHUNK_TIME_LIMIT_S` (21 600 s = 6 h); the pool process is killed and the
    job fails. The soft limit is 5 minutes before it (a tenth of the limit when that is shorter than 50 minutes)
    and fails the job cleanly from inside the chunk.
  - Broker visibility timeout: `HYDRA_VISIBILITY_TIMEOUT_S`, default the hard limit plus one hour (7 h), and never
    below the hard limit: a chunk still running can never be handed to a second worker. Keep chunks (prompts per
    chunk, `HYDRA_CHUNK_PROMPTS`, default 64) well inside the limit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from celery import Celery
from celery.signals import after_task_publish, before_task_publish
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps

from service.core.redis_connections import connection_class
from service.core.redis_options import driver_options
from service.core.settings import Settings

TASK_RUN_JOB = "hydra.run_job"
TASK_RUN_CHUNK = "hydra.run_chunk"
TASK_DELIVER_CALLBACK = "hydra.deliver_callback"  # worker/callback_delivery.py: one webhook attempt (issue 12)
DAY_S = 24 * 3600
HOUR_S = 3600

_QUEUE_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def time_limits(settings: Settings) -> tuple[float, float]:
    """(soft, hard) time limits of one task in seconds, from HYDRA_CHUNK_TIME_LIMIT_S."""
    hard = settings.chunk_time_limit_s
    return hard - min(300.0, hard / 10), hard


def visibility_timeout(settings: Settings) -> float:
    """Seconds before Redis hands an unacknowledged message to another worker: always above the hard limit."""
    _, hard = time_limits(settings)
    configured = settings.visibility_timeout_s
    if configured is None:
        configured = hard + min(float(HOUR_S), hard)
    return max(configured, hard + 1)


def broker_transport_options(settings: Settings) -> dict[str, float]:
    """The visibility timeout, and how often a consumer looks for messages past it: a tenth of it, at most 100 s
    (kombu's default sweep: every 10th check of 10 s), so a short timeout also recovers quickly."""
    timeout = visibility_timeout(settings)
    sweep = min(100.0, timeout / 10)
    interval = min(10.0, sweep)
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": max(1, round(sweep / interval)),
    }


# kombu's Redis transport keeps one list per queue and priority step: the queue's name for priority 0, then
# "<queue>\x06\x16<step>" (kombu.transport.redis: PRIORITY_STEPS, and the separator of its priority lists).
_PRIORITY_LIST_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def waiting_task_ids(client: redis.Redis, queue: str) -> set[str]:
    """Ids of the tasks waiting (not yet taken by a worker) in a Celery queue on the Redis broker."""
    found: set[str] = set()
    for suffix in _PRIORITY_LIST_SUFFIXES:
        for raw in client.lrange(queue + suffix, 0, -1):
            try:
                found.add(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found


def model_queue(queue_name: str, model_id: str) -> str:
    """The queue of one model's chunks: `hydra.smollm2-135m`; ids with other characters get a hash suffix."""
    safe = _QUEUE_SAFE.sub("_", model_id)
    if safe != model_id:
        safe = f"{safe}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"
    return f"{queue_name}.{safe}"


def webhook_queue(queue_name: str) -> str:
    """The queue of webhook deliveries: `hydra-webhooks`, consumed by a worker of its own (`-Q hydra-webhooks`), so
    that a slow receiver never holds a process that runs chunks or plans jobs (see worker/callback_delivery.py)."""
    return f"{queue_name}-webhooks"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker settings shared by the API and the worker."""
    soft, hard = time_limits(settings)
    return {
        "broker_url": settings.redis_url,
        # A task is acknowledged after it ran, so a worker killed mid-chunk hands it back to the queue...
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # ...and a worker holds one task at a time (chunks are long and share one GPU).
        "worker_prefetch_multiplier": 1,
        # A chunk past the soft limit fails its job cleanly; past the hard limit its process is killed.
        "task_soft_time_limit": soft,
        "task_time_limit": hard,
        # The Redis broker redelivers unacknowledged tasks after the visibility timeout: keep it above the limit.
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue_name,
        "task_routes": {
            TASK_RUN_JOB: {"queue": settings.queue_name},
            TASK_DELIVER_CALLBACK: {"queue": webhook_queue(settings.queue_name)},
        },
        # Job state and results live in the JobStore; Celery keeps none.
        "task_ignore_result": True,
        "result_backend": None,
        "enable_utc": True,
    }


def make_celery_client(settings: Settings) -> Celery:
    """A Celery app configured for hydra's broker; the API only sends, the worker also consumes."""
    app = Celery("hydra", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


@dataclass(frozen=True, slots=True)
class BrokerMessage:
    """One Celery task message as kombu's Redis transport keeps it: `payload` pushed (LPUSH) on the list `key`."""

    task_id: str
    key: str
    payload: bytes
    task: str  # and what Celery's after_task_publish signal is sent with
    headers: dict[str, Any]
    body: Any


class JobQueue:
    """What the API needs from Celery: hand a job to the workers, and know whether any are listening."""

    def __init__(self, settings: Settings, celery_app: Celery | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.celery_app = celery_app or make_celery_client(settings)
        # The broker is the Redis of `redis_url` (celery_config): this client pushes messages there (the app passes
        # its store's client: same server, one pool).
        self._owns_client = client is None
        self.client = client or redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=5,
            health_check_interval=30,
            connection_class=connection_class(settings.redis_url),
            **driver_options(),
        )

    def message(self, task: str, args: list[object], queue: str | None = None) -> BrokerMessage:
        """The message `Celery.send_task(task, args, queue=<hydra queue>, ignore_result=True)` publishes, built by
        Celery (`as_task_v2`) and serialised as kombu does (JSON body, base64 in the transport's envelope, the
        anonymous exchange routing to the queue's list); sends `before_task_publish` like Celery."""
        task_id = str(uuid.uuid4())
        queue = queue or self.settings.queue_name
        task_message = self.celery_app.amqp.as_task_v2(
            task_id, task, args=args, kwargs={}, ignore_result=True, reply_to=self.celery_app.oid,
            argsrepr=repr(args), kwargsrepr="{}",
        )  # fmt: skip
        headers, properties, body, _ = task_message
        if before_task_publish.receivers:
            before_task_publish.send(
                sender=task, body=body, exchange="", routing_key=queue, headers=headers, properties=properties,
                declare=[], retry_policy=None,
            )  # fmt: skip
        content_type, content_encoding, data = serialize(body, serializer="json")
        raw = data if isinstance(data, bytes) else data.encode(content_encoding)
        envelope = {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,  # persistent, kombu's default
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,  # the queue's own list (kombu keeps other priorities under suffixed names)
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        payload = json_dumps(envelope).encode()
        return BrokerMessage(task_id=task_id, key=queue, payload=payload, task=task, headers=headers, body=body)

    def enqueue(self, job_id: str) -> None:
        """Publish the job id on the hydra queue; a worker reads the spec from the JobStore and plans chunks."""
        self._push(self.message(TASK_RUN_JOB, [job_id]))

    async def enqueue_async(self, client: redis.asyncio.Redis, job_id: str) -> None:
        """`enqueue` with the event loop's client (`client`: the same Redis)."""
        message = self.message(TASK_RUN_JOB, [job_id])
        await client.lpush(message.key, message.payload)
        _published(message)

    def _push(self, message: BrokerMessage) -> None:
        self.client.lpush(message.key, message.payload)
        _published(message)

    def connect(self) -> None:
        """Open the broker connection now (the first publish would otherwise pay for it)."""
        self.client.ping()

    def notify(self, job_id: str) -> None:
        """Queue the webhook delivery of a finished job (worker/callback_delivery.py retries it)."""
        self._push(self.message(TASK_DELIVER_CALLBACK, [job_id, 1], webhook_queue(self.settings.queue_name)))

    def revoke(self, task_ids: list[str]) -> None:
        """Tell every worker to drop these queued tasks (e.g. a cancelled job's chunks; service/core/chunk_book.py)."""
        if task_ids:
            self.celery_app.control.revoke(task_ids)

    def worker_count(self, timeout: float = 1.0) -> int:
        """Workers that answered a broadcast ping within `timeout` seconds."""
        return len(self.celery_app.control.ping(timeout=timeout) or [])

    def close(self) -> None:
        self.celery_app.close()
        if self._owns_client:
            self.client.close()


def _published(message: BrokerMessage) -> None:
    if after_task_publish.receivers:
        after_task_publish.send(
            sender=message.task, body=message.body, headers=message.headers, exchange="", routing_key=message.key
        )
