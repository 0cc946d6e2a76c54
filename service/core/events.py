"""A job's event stream (JobStore `events:{id}`), read without blocking the event loop: SSE and long polls.

Every state change of a job appends its status snapshot to a Redis stream, so a listener that connects late
replays what it missed (every phase included) and then waits on XREAD BLOCK. A listener never waits forever: each
quiet interval it re-reads the job, and a job that ended (or vanished) ends the stream even if its final event was
lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import redis.asyncio

from hydra_ablate_client.vocabulary import TERMINAL_STATES
from hydra_ablate_client.wire import JobStatus
from service.core.redis_replies import bytes_hash, stream_read
from service.core.store import JobStore

QUIET_MS = 5000  # how long one XREAD blocks before the job is re-read (and a keep-alive comment sent)


@dataclass(frozen=True)
class JobEvent:
    """One item of a job's stream: `status` (state or phase changed), `progress`, `keepalive` or `end`."""

    kind: str
    event_id: str | None = None
    status: JobStatus | None = None


async def _status(client: redis.asyncio.Redis, store: JobStore, job_id: str) -> JobStatus | None:
    return JobStore._decode_status(bytes_hash(await client.hgetall(store.job_key(job_id))))


def _kind(previous: JobStatus | None, current: JobStatus) -> str:
    if previous is None or (previous.status, previous.phase) != (current.status, current.phase):
        return "status"
    return "progress"


async def follow(
    client: redis.asyncio.Redis, store: JobStore, job_id: str, after: str = "0", quiet_ms: int = QUIET_MS
) -> AsyncIterator[JobEvent]:
    """Status snapshots after event `after` ("0": all kept), until the job has ended; then one `end` event."""
    key = store.events_key(job_id)
    cursor = after
    previous: JobStatus | None = None
    while True:
        answer = stream_read(await client.xread({key: cursor}, block=quiet_ms, count=200))
        entries = [entry for _, batch in answer or [] for entry in batch]
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
        if entries:
            continue
        latest = await _status(client, store, job_id)
        if latest is None or latest.status in TERMINAL_STATES:
            if latest is not None and (previous is None or previous.status != latest.status):
                yield JobEvent("status", None, latest)
            yield JobEvent("end", None, latest)
            return
        yield JobEvent("keepalive")


async def wait_for_change(
    client: redis.asyncio.Redis, store: JobStore, job_id: str, after: str, timeout_s: float
) -> None:
    """Return once the job has an event after `after`, or after `timeout_s` (the long poll of GET /v1/jobs/{id})."""
    if timeout_s <= 0:
        return
    await client.xread({store.events_key(job_id): after}, block=max(1, int(timeout_s * 1000)), count=1)


async def last_event_id(client: redis.asyncio.Redis, store: JobStore, job_id: str) -> str:
    latest = await client.xrevrange(store.events_key(job_id), count=1)
    if not latest:
        return "0-0"
    raw = latest[0][0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)
