"""The job's event stream (events:{id}): a status snapshot per change, for server-sent events, long polls and
webhooks, and the Pub/Sub hint that wakes the API's waiters (service/core/event_hub.py)."""

from __future__ import annotations

import logging

import msgspec
import redis

from hydra_ablate_client.wire import JobStatus
from service.core.redis_replies import stream_entries, stream_read
from service.core.store.base import StoreBase

logger = logging.getLogger("service.core.store")
EVENTS_MAXLEN = 2000  # status snapshots kept per job: phases are never lost, per-prompt progress is thinned out


class EventLog(StoreBase):
    # events (issue 12): a snapshot per change, for server-sent events, long polls and webhooks
    def emit(self, job_id: str, status: JobStatus | None = None) -> None:
        """Append the job's current status to its event stream (capped, expiring with the job) and tell the API
        processes' subscriptions that the job changed."""
        status = status or self.status(job_id)
        if status is None:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.keys.events(job_id), {"status": msgspec.json.encode(status)}, maxlen=EVENTS_MAXLEN)
        pipe.expire(self.keys.events(job_id), self.ttl_s)
        pipe.publish(self.keys.events_channel, job_id)
        pipe.execute()

    def _emitting(self, job_id: str, changed: bool) -> bool:
        if changed:
            try:
                self.emit(job_id)
            except redis.RedisError:  # the state change stands; listeners re-read the status when they wake
                logger.warning("job %s: could not append its event", job_id, exc_info=True)
        return changed

    def _finishing(self, job_id: str, changed: bool) -> bool:
        self._emitting(job_id, changed)
        if changed and self.on_finished is not None:
            try:
                self.on_finished(job_id)
            except Exception:
                logger.warning("job %s: its finish hook failed", job_id, exc_info=True)
        return changed

    def events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, JobStatus]]:
        """(event id, status) appended after `after` ("0": from the start); with `block_ms`, waits that long for one."""
        answer = stream_read(self.client.xread({self.keys.events(job_id): after}, block=block_ms))
        found: list[tuple[str, JobStatus]] = []
        for _, entries in answer or []:
            for event_id, fields in entries:
                raw = fields.get(b"status")
                if raw is not None:
                    found.append((event_id.decode(), msgspec.json.decode(raw, type=JobStatus)))
        return found

    def last_event_id(self, job_id: str) -> str:
        """The id of the job's latest event ("0-0" when it has none)."""
        latest = stream_entries(self.client.xrevrange(self.keys.events(job_id), count=1))
        return latest[0][0].decode() if latest else "0-0"
