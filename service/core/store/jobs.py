"""Jobs in Redis: created, moved through their states (one Lua script per change), cancelled and deleted.

Synchronous redis-py on purpose: the worker is synchronous, and the API calls it from handlers declared with
`sync_to_thread=True`. Every state change is one Lua script (the `.lua` files beside this module), so a worker
finishing a job can never overwrite a cancel that landed a moment earlier (and vice versa). The key names are
service/core/redis_keys.py's. JobStore is all of the store: its parts, one module each, hold what they store
(results, events, webhook attempts, cached figures, models, listings).
"""

from __future__ import annotations

import time

import msgspec
import redis
import redis.asyncio
from redis.commands.core import AsyncScript

from hydra_ablate_client.vocabulary import JOB_PHASES
from hydra_ablate_client.wire import JobSpec, JobStatus
from service.core.redis_connections import connection_class
from service.core.redis_options import driver_options
from service.core.redis_replies import EncodableT, FieldT, ScriptArgs, bytes_list
from service.core.settings import Settings
from service.core.store.cached_figures import CachedFigures
from service.core.store.callback_log import CallbackLog, callback_attempts
from service.core.store.event_log import EVENTS_MAXLEN, EventLog
from service.core.store.job_listing import JobListing
from service.core.store.job_records import (
    STATUS_FIELDS,
    JobLabels,
    created,
    decode_status,
    new_job,
    status_fields,
    unless_evicted,
    utc_now,
)
from service.core.store.lua import lua
from service.core.store.model_registry import ModelRegistry
from service.core.store.results import ResultStore, compress_result

# A stored job not planned by a worker this long after it was sent is sent again (the API may have died between
# storing and sending it, or the message was lost); each later try waits twice as long, up to RESEND_MAX_S.
RESEND_AFTER_S = 30.0
RESEND_MAX_S = 3600.0

CREATE_CAPPED = lua("track_status", "create_capped")
READ_STATUS = lua("read_status")
# The scripts the API's event loop runs (`create_async`, `status_async`): loaded at start-up (service/api/app.py),
# so a fresh Redis does not answer the first burst with NOSCRIPT and a second round trip per request.
LOOP_SCRIPTS = (CREATE_CAPPED, READ_STATUS)


class JobStore(EventLog, CallbackLog, ResultStore, CachedFigures, ModelRegistry, JobListing):
    """Jobs, results, cancel flags and advertised models in one Redis, all keys under `key_prefix`."""

    def __init__(self, client: redis.Redis, key_prefix: str = "hydra:", ttl_s: int = 7 * 24 * 3600) -> None:
        super().__init__(client, key_prefix, ttl_s)
        self._mark_running = client.register_script(lua("track_status", "mark_running"))
        self._set_progress = client.register_script(lua("set_progress"))
        self._mark_succeeded = client.register_script(lua("track_status", "mark_succeeded"))
        self._mark_failed = client.register_script(lua("drop_partials", "track_status", "mark_failed"))
        self._request_cancel = client.register_script(lua("drop_partials", "track_status", "request_cancel"))
        self._create_capped = client.register_script(CREATE_CAPPED)
        self._read_status = client.register_script(READ_STATUS)
        self._set_prompts_done = client.register_script(lua("set_prompts_done"))
        self._advance_phase = client.register_script(lua("advance_phase"))
        self._delete_finished = client.register_script(lua("track_status", "delete_finished"))
        self._set_note = client.register_script(lua("set_note"))

    @classmethod
    def from_settings(cls, settings: Settings, socket_timeout: float | None = None) -> JobStore:
        """A store with its own connection pool (bytes, not decoded: results are stored raw)."""
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=5,
            socket_timeout=socket_timeout,
            health_check_interval=30,
            connection_class=connection_class(settings.redis_url),
            **driver_options(),
        )
        return cls(client, key_prefix=settings.key_prefix, ttl_s=settings.result_ttl_s)

    def close(self) -> None:
        self.client.close()

    def open_connections(self, count: int) -> None:
        """Put `count` connected connections in the pool now (at most the pool's own limit)."""
        pool = self.client.connection_pool
        taken = []
        try:
            for _ in range(count):
                connection = pool.get_connection()
                connection.connect()
                taken.append(connection)
        finally:
            for connection in taken:
                pool.release(connection)

    # jobs
    def ping(self) -> bool:
        return bool(self.client.ping())

    def create(
        self,
        spec: JobSpec,
        total: int,
        owner: str | None = None,
        *,
        job_id: str | None = None,
        max_active: int = 0,
        labels: JobLabels | None = None,
    ) -> JobStatus:
        """Register a queued job; the caller enqueues it afterwards.

        The job is also recorded as not yet planned, in the same transaction: if the caller dies before its
        message is sent (or the message is lost), the recovery sweep (service/core/recovery.py) sends it again.

        With an `owner` the job is also indexed under it, and `max_active` > 0 caps that owner's queued and running
        jobs (ActiveJobsExceeded, nothing written). `job_id` lets a caller pick the id before the job exists (an
        idempotency record must name the job it will create).
        """
        status, fields = new_job(spec, total, owner, job_id, labels)
        if owner is None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self.keys.job(status.id), mapping=fields)
            pipe.expire(self.keys.job(status.id), self.ttl_s)
            # Scored on this machine's clock, not Redis's as the scripts do (track_status.lua): a skew of seconds
            # only shifts when the count forgets a job that expired.
            pipe.zadd(self.keys.by_status("queued"), {status.id: time.time() + self.ttl_s})
            pipe.zadd(self.keys.jobs, {status.id: time.time()})
            pipe.zadd(self.keys.unplanned, {status.id: time.time() + RESEND_AFTER_S})
            pipe.execute()
            self.emit(status.id, status)
            return status
        keys, args = self._create_capped_call(status, fields, owner, max_active)
        return created(status, int(self._create_capped(keys=keys, args=args)), owner, max_active)

    async def create_async(
        self,
        client: redis.asyncio.Redis,
        spec: JobSpec,
        total: int,
        owner: str,
        *,
        max_active: int = 0,
        labels: JobLabels | None = None,
    ) -> JobStatus:
        """`create` for an owner, with the event loop's own client (`client`: same server, same prefix): one round
        trip, the same script."""
        status, fields = new_job(spec, total, owner, None, labels)
        keys, args = self._create_capped_call(status, fields, owner, max_active)
        outcome = await AsyncScript(client, CREATE_CAPPED)(keys=keys, args=args)
        return created(status, int(outcome), owner, max_active)

    def _create_capped_call(
        self, status: JobStatus, fields: dict[FieldT, EncodableT], owner: str, max_active: int
    ) -> tuple[list[str], ScriptArgs]:
        job_id = status.id
        fields["owner"] = owner
        keys = [
            self.keys.job(job_id), self.keys.jobs, self.keys.owner_jobs(owner), self.keys.active(owner),
            self.keys.unplanned, self.keys.events(job_id),
        ]  # fmt: skip
        flat = [item for pair in fields.items() for item in pair]
        now_s = time.time()
        args: ScriptArgs = [
            job_id, self.ttl_s, now_s, max(0, int(max_active)), self.keys.job_prefix, now_s + RESEND_AFTER_S,
            msgspec.json.encode(status), EVENTS_MAXLEN, *flat,
        ]  # fmt: skip
        return keys, args

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status; a succeeded job whose result is gone (evicted) reads as failed, saying so."""
        keys = [self.keys.job(job_id), self.keys.result(job_id)]
        values, has_result = self._read_status(keys=keys, args=STATUS_FIELDS)
        status = decode_status(status_fields(values))
        if status is None:
            return None
        if status.callback_url is not None:
            status.callbacks = self.callbacks(job_id)
        return unless_evicted(status, bool(has_result))

    async def status_async(self, client: redis.asyncio.Redis, job_id: str) -> JobStatus | None:
        """`status` read with the event loop's own client (`client`: same server, same prefix): the API's status
        route, polled most, then costs no hand-off to a worker thread and back, and one command."""
        keys = [self.keys.job(job_id), self.keys.result(job_id)]
        values, has_result = await AsyncScript(client, READ_STATUS)(keys=keys, args=STATUS_FIELDS)
        status = decode_status(status_fields(values))
        if status is None:
            return None
        if status.callback_url is not None:
            status.callbacks = callback_attempts(await client.lrange(self.keys.callbacks(job_id), 0, -1))
        return unless_evicted(status, bool(has_result))

    def spec(self, job_id: str) -> JobSpec | None:
        raw = self.client.hget(self.keys.job(job_id), "spec")
        return None if raw is None else msgspec.json.decode(raw, type=JobSpec)

    def mark_running(self, job_id: str) -> bool:
        """Claim a queued job for a worker; False when it was cancelled, already claimed, finished or expired."""
        keys = [self.keys.job(job_id), self.keys.cancel(job_id)]
        return self._emitting(job_id, bool(self._mark_running(keys=keys, args=[utc_now(), self.ttl_s])))

    def set_progress(self, job_id: str, done: int, total: int, prompts_done: int | None = None) -> bool:
        """Record progress of a running job; False (and nothing written) once it is no longer running."""
        changed = bool(self._set_progress(keys=[self.keys.job(job_id)], args=[int(done), int(total)]))
        if changed and prompts_done is not None:
            self._set_prompts_done(keys=[self.keys.job(job_id)], args=[int(prompts_done)])
        return self._emitting(job_id, changed)

    def advance_phase(self, job_id: str, phase: str) -> bool:
        """Move a running job to a later phase (JOB_PHASES); False when it is not running or already past it."""
        rank = JOB_PHASES.index(phase)
        changed = bool(self._advance_phase(keys=[self.keys.job(job_id)], args=[phase, rank, *JOB_PHASES]))
        return self._emitting(job_id, changed)

    def mark_succeeded(self, job_id: str, result: bytes) -> bool:
        """Store the result (the encoded JobResult; stored compressed) and finish a running job; False (result
        dropped) if it was cancelled meanwhile."""
        changed = bool(
            self._mark_succeeded(
                keys=[self.keys.job(job_id), self.keys.result(job_id)],
                args=[compress_result(result), utc_now(), self.ttl_s],
            )
        )
        return self._finishing(job_id, changed)

    def mark_failed(self, job_id: str, error: str) -> bool:
        """Fail a queued or running job with a message for the user (its chunk partials are dropped); False if it
        had already ended."""
        keys = [self.keys.job(job_id), self.keys.chunks_done(job_id)]
        changed = bool(
            self._mark_failed(keys=keys, args=[error, utc_now(), self.ttl_s, self.keys.chunk_partials(job_id)])
        )
        return self._finishing(job_id, changed)

    def set_note(self, job_id: str, note: str) -> bool:
        """Tell pollers what happened to an active job (e.g. a chunk sent again); False once it has ended."""
        return bool(self._set_note(keys=[self.keys.job(job_id)], args=[note]))

    # jobs stored but not yet planned (see service/core/recovery.py)
    def mark_planned(self, job_id: str) -> None:
        """A worker has sent every chunk of the job (or dropped it): it no longer needs sending again."""
        self.client.zrem(self.keys.unplanned, job_id)

    def unplanned(self, due_by: float | None = None, limit: int = 1000) -> list[str]:
        """Job ids stored but not yet planned; only those due to be sent again by `due_by` (epoch s) if given."""
        top = "+inf" if due_by is None else due_by
        due = bytes_list(self.client.zrangebyscore(self.keys.unplanned, "-inf", top, start=0, num=limit))
        return [raw_id.decode() for raw_id in due]

    def defer_unplanned(self, job_id: str, until: float) -> None:
        """Look at an unplanned job again at `until` (epoch s), unless a worker plans it first."""
        self.client.zadd(self.keys.unplanned, {job_id: until}, xx=True)

    def request_cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued or running job (the worker stops at its next check; chunk partials are dropped now);
        finished jobs stay as they are."""
        outcome = self._request_cancel(
            keys=[self.keys.job(job_id), self.keys.cancel(job_id), self.keys.chunks_done(job_id)],
            args=[utc_now(), self.ttl_s, self.keys.chunk_partials(job_id)],
        )
        if int(outcome) < 0:
            return None
        self._finishing(job_id, int(outcome) == 1)
        return self.status(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.client.exists(self.keys.cancel(job_id)))

    def delete_finished(self, job_id: str, other_keys: list[str]) -> bool | None:
        """Remove a finished job, its result and `other_keys` (chunk and figure keys) for good; None when the job
        does not exist, False (nothing removed) while it is still queued or running: cancel it first."""
        raw_owner = self.client.hget(self.keys.job(job_id), "owner")
        owner = raw_owner.decode() if isinstance(raw_owner, bytes) else (raw_owner or "")
        keys = [
            self.keys.job(job_id),
            self.keys.jobs,
            self.keys.owner_jobs(owner),
            self.keys.active(owner),
            self.keys.result(job_id),
            self.keys.cancel(job_id),
            self.keys.events(job_id),
            self.keys.callbacks(job_id),
            self.keys.figures(job_id),
            *other_keys,
        ]
        outcome = int(self._delete_finished(keys=keys, args=[job_id]))
        return None if outcome < 0 else outcome == 1
