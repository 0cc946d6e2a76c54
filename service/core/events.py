"""A job's event stream (JobStore `events:{id}`), read without blocking the event loop: SSE and long polls.

Every state change of a job appends its status snapshot to a Redis stream, so a listener that connects late
replays what it missed (every phase included) and then waits for the process's subscription to say the job changed
(service/core/event_hub.py): no listener holds a Redis connection, or a blocking read, while it waits. A listener never
waits forever: each quiet interval it re-reads the stream and the job, and a job that ended (or vanished) ends the
stream even if its final event, or the hint about it, was lost. A stream rides out a short Redis outage (it sends
keep-alives and reads again each interval); after OUTAGE_S it ends, and its client resumes with Last-Event-ID.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import msgspec
import redis.asyncio

from hydra_ablate_client.vocabulary import TERMINAL_STATES
from hydra_ablate_client.wire import JobStatus
from service.core.event_hub import EventHub
from service.core.redis_replies import bytes_hash, stream_read
from service.core.store import JobStore
from service.core.store.job_records import decode_status

logger = logging.getLogger(__name__)

QUIET_S = 5.0  # a quiet listener re-reads its stream and the job this often (a stream also sends a keep-alive)
OUTAGE_S = 60.0  # how long a stream keeps trying while Redis is unreachable before it gives up


def _quiet_interval(quiet_s: float) -> float:
    """Each wait a little shorter at random: streams opened together (a dashboard's) would otherwise all wake in
    the same instant every interval and answer in one burst."""
    return quiet_s * random.uniform(0.8, 1.0)


@dataclass(frozen=True)
class JobEvent:
    """One item of a job's stream: `status` (state or phase changed), `progress`, `keepalive` or `end`."""

    kind: str
    event_id: str | None = None
    status: JobStatus | None = None


async def _status(hub: EventHub, client: redis.asyncio.Redis, store: JobStore, job_id: str) -> JobStatus | None:
    fields = await hub.read(partial(client.hgetall, store.keys.job(job_id)))
    return decode_status(bytes_hash(fields))


def _outage(job_id: str, down_since: float | None, outage_s: float, error: redis.RedisError) -> float:
    """When the stream's Redis outage began; re-raises `error` once it has lasted longer than `outage_s`."""
    now = time.monotonic()
    if down_since is None:
        logger.warning("event stream of job %s: Redis unavailable (%s); retrying for %g s", job_id, error, outage_s)
        return now
    if now - down_since > outage_s:
        raise error
    return down_since


def _kind(previous: JobStatus | None, current: JobStatus) -> str:
    if previous is None or (previous.status, previous.phase) != (current.status, current.phase):
        return "status"
    return "progress"


async def follow(
    client: redis.asyncio.Redis,
    hub: EventHub,
    store: JobStore,
    job_id: str,
    after: str = "0",
    quiet_s: float = QUIET_S,
    outage_s: float = OUTAGE_S,
) -> AsyncIterator[JobEvent]:
    """Status snapshots after event `after` ("0": all kept), until the job has ended; then one `end` event."""
    key = store.keys.events(job_id)
    cursor = after
    previous: JobStatus | None = None
    down_since: float | None = None  # when Redis stopped answering this stream's reads
    with hub.watch(job_id) as waiter:
        while True:
            waiter.clear()  # a change from here on wakes the wait below, even one made during this read
            try:
                answer = stream_read(await hub.read(partial(client.xread, {key: cursor}, count=200)))
                entries = [entry for _, batch in answer or [] for entry in batch]
                woken = bool(entries) or await waiter.wait(_quiet_interval(quiet_s))
                latest = None if woken else await _status(hub, client, store, job_id)
            except redis.RedisError as error:
                down_since = _outage(job_id, down_since, outage_s, error)
                yield JobEvent("keepalive")
                await waiter.wait(_quiet_interval(quiet_s))  # woken at once when the subscription is back
                continue
            down_since = None
            for raw_id, fields in entries:
                cursor = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                raw = fields.get(b"status")
                if raw is None:
                    continue
                current = msgspec.json.decode(raw, type=JobStatus)
                yield JobEvent(_kind(previous, current), cursor, current)
                previous = current
                if current.status in TERMINAL_STATES:
                    yield JobEvent("end", cursor, current)
                    return
            if woken:
                continue
            if latest is None or latest.status in TERMINAL_STATES:
                if latest is not None and (previous is None or previous.status != latest.status):
                    yield JobEvent("status", None, latest)
                yield JobEvent("end", None, latest)
                return
            yield JobEvent("keepalive")


async def wait_for_change(
    client: redis.asyncio.Redis,
    hub: EventHub,
    store: JobStore,
    job_id: str,
    after: str,
    timeout_s: float,
    quiet_s: float = QUIET_S,
) -> None:
    """Return once the job has an event after `after`, or after `timeout_s` (the long poll of GET /v1/jobs/{id})."""
    if timeout_s <= 0:
        return
    key = store.keys.events(job_id)
    deadline = time.monotonic() + timeout_s
    with hub.watch(job_id) as waiter:
        while True:
            waiter.clear()
            if stream_read(await hub.read(partial(client.xread, {key: after}, count=1))):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await waiter.wait(min(left, _quiet_interval(quiet_s)))


async def last_event_id(client: redis.asyncio.Redis, store: JobStore, job_id: str) -> str:
    latest = await client.xrevrange(store.keys.events(job_id), count=1)
    if not latest:
        return "0-0"
    raw = latest[0][0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)
