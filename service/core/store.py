"""The job registry in Redis, shared by the API (answers 404/409 itself) and the Celery worker (moves jobs on).

Synchronous redis-py on purpose: the worker is synchronous, and the API calls it from handlers declared with
`sync_to_thread=True`. Every state change is one Lua script, so a worker finishing a job can never overwrite a
cancel that landed a moment earlier (and vice versa).

Keys, under the configured prefix:
  job:{id}     hash: id, status, model, owner (the API key's name), spec (JobSpec JSON), created_at, started_at,
               finished_at (ISO-8601 UTC), error, done, total
  jobs         sorted set of job ids scored by creation time (newest first when paged)
  jobs:owner:{name}   the same, for one owner's jobs only (so a key's listing never scans everyone's)
  active:{name}       set of an owner's job ids that may still be queued or running (pruned when counted)
  result:{id}  the encoded JobResult, gzip-compressed (results of the full preset are tens of MB of JSON; numbers
               compress several-fold). Results written before compression (plain JSON) are still read.
  cancel:{id}  present once a cancel was requested; the worker polls it between batches
  models       hash: model id -> ModelInfo JSON, as advertised by workers
  tokenizer:{model id}  the model's Hugging Face tokenizers JSON, as published by workers
  events:{id}  stream of the job's status snapshots, one per change (created, running, phase, progress, finished):
               what GET /v1/jobs/{id}/events and ?wait= read (service/core/events.py); capped at EVENTS_MAXLEN entries.
               JobStore.emit also publishes the job id on the channel `job-events`, a hint that wakes the
               API's waiters (service/core/event_hub.py); the create script does not: nobody waits on a new job.
  callbacks:{id}  list of CallbackAttempt JSON, one per webhook delivery attempt (service/core/callbacks.py)
The job hash also holds, from issue 12: name, tags (JSON list), metadata (JSON object), callback_url, phase and
prompts_done / prompts_total.
  unplanned    sorted set of job ids stored but not yet planned by a worker, scored by when to send them again
               (written with the job, in the same script, so a job stored is a job that will reach the queue;
               see service/core/recovery.py)
The job keys expire `ttl_s` after the job's latest state change, so results live that long after finishing.
"""

from __future__ import annotations

import gzip
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis
import redis.asyncio
from redis.commands.core import AsyncScript

from hydra_ablate_client.vocabulary import ACTIVE_STATES, JOB_PHASES, TERMINAL_STATES
from hydra_ablate_client.wire import CallbackAttempt, JobPage, JobSpec, JobStatus, ModelInfo, Progress
from service.core.redis_options import driver_options
from service.core.redis_replies import (
    EncodableT,
    FieldT,
    ScriptArgs,
    as_bytes,
    bytes_list,
    bytes_or_none,
    stream_entries,
    stream_read,
)
from service.core.settings import Settings

__all__ = ["ACTIVE_STATES", "TERMINAL_STATES", "ActiveJobsExceeded", "JobStore"]

logger = logging.getLogger(__name__)

# A stored job not planned by a worker this long after it was sent is sent again (the API may have died between
# storing and sending it, or the message was lost); each later try waits twice as long, up to RESEND_MAX_S.
RESEND_AFTER_S = 30.0
RESEND_MAX_S = 3600.0
EVENTS_MAXLEN = 2000  # status snapshots kept per job: phases are never lost, per-prompt progress is thinned out


@dataclass(frozen=True)
class JobLabels:
    """What a submitter attaches to a job besides the spec: for people and tools, never read by the engine."""

    name: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    callback_url: str | None = None


@dataclass(frozen=True)
class JobFilter:
    """List filters; all given ones must match. Times are ISO-8601 (compared as UTC instants)."""

    status: str | None = None
    model: str | None = None
    tag: str | None = None
    created_after: float | None = None  # unix seconds, exclusive
    created_before: float | None = None  # unix seconds, exclusive

    @property
    def scans(self) -> bool:
        """Whether the job hashes must be read to filter (time bounds alone are a range of the index)."""
        return self.status is not None or self.model is not None or self.tag is not None

# Jobs by status, kept as each change happens (for /metrics): a sorted set per state, `{prefix}by-status:{state}`,
# whose members are job ids scored with when the job's hash expires (unix seconds, Redis's clock). Every script that
# changes a job's status moves the job between the sets (`track_status`; the sets' names come from the job hash's
# own `{prefix}job:{id}`), so counting is a ZCOUNT of the unexpired members of each set: a few commands a scrape
# instead of a read of every job. Fine on one Redis (not Cluster), like _CREATE_CAPPED's key names.
TRACK_STATUS = """
local function track_status(job_key, from, to, ttl)
  local base, id = string.match(job_key, '^(.*)job:([^:]*)$')
  if from then redis.call('ZREM', base .. 'by-status:' .. from, id) end
  if to then
    local now = redis.call('TIME')
    redis.call('ZADD', base .. 'by-status:' .. to, tonumber(now[1]) + tonumber(ttl), id)
  end
end
"""

# KEYS[1] job hash, KEYS[2] cancel flag. ARGV[1] now (ISO), ARGV[2] ttl seconds.
_MARK_RUNNING = TRACK_STATUS + """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
track_status(KEYS[1], 'queued', 'running', ARGV[2])
return 1
"""

# KEYS[1] job hash. ARGV[1] done, ARGV[2] total.
_SET_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'done', ARGV[1], 'total', ARGV[2])
return 1
"""

# KEYS[1] job hash. ARGV[1] prompts done.
_SET_PROMPTS_DONE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'prompts_done', ARGV[1])
return 1
"""

# KEYS[1] job hash. ARGV[1] the phase, ARGV[2] its rank, ARGV[3..] every phase in order. Only moves forward, and
# only while the job runs: chunks of one job report phases in parallel.
_ADVANCE_PHASE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local current = redis.call('HGET', KEYS[1], 'phase') or 'queued'
local rank = 0
for i = 3, #ARGV do if ARGV[i] == current then rank = i - 3 end end
if tonumber(ARGV[2]) <= rank then return 0 end
redis.call('HSET', KEYS[1], 'phase', ARGV[1])
return 1
"""

# KEYS[1] job hash, KEYS[2] result. ARGV[1] result bytes, ARGV[2] now, ARGV[3] ttl.
_MARK_SUCCEEDED = TRACK_STATUS + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
local total = redis.call('HGET', KEYS[1], 'total') or '0'
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[2], 'done', total)
redis.call('EXPIRE', KEYS[1], ARGV[3])
track_status(KEYS[1], 'running', 'succeeded', ARGV[3])
return 1
"""

# A job that ends without a result keeps no chunk partials (they can be as large as the result): the partials of
# the chunks recorded in the chunks_done hash are deleted in the same script that ends the job. The chunk
# recorder (service/core/chunk_book.py) refuses to store a partial once the job has ended, so none can appear
# afterwards.
# KEYS[n] chunks_done hash, ARGV[m] partial key prefix ("{prefix}chunk:{id}:").
_DROP_PARTIALS = """
local function drop_partials(done_key, partial_prefix)
  for _, index in ipairs(redis.call('HKEYS', done_key)) do
    redis.call('DEL', partial_prefix .. index)
  end
end
"""

# KEYS[1] job hash. ARGV[1] note. A note on an active job only (never re-creates an expired hash).
_SET_NOTE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'note', ARGV[1])
return 1
"""

# KEYS[1] job hash, KEYS[2] chunks_done. ARGV[1] error, ARGV[2] now, ARGV[3] ttl, ARGV[4] partial key prefix.
_MARK_FAILED = _DROP_PARTIALS + TRACK_STATUS + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'finished_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
track_status(KEYS[1], status, 'failed', ARGV[3])
drop_partials(KEYS[2], ARGV[4])
return 1
"""

# KEYS[1] job hash, KEYS[2] cancel flag, KEYS[3] chunks_done. ARGV[1] now, ARGV[2] ttl, ARGV[3] partial key prefix.
# Returns -1 absent, 0 unchanged, 1 cancelled.
_REQUEST_CANCEL = _DROP_PARTIALS + TRACK_STATUS + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
track_status(KEYS[1], status, 'cancelled', ARGV[2])
drop_partials(KEYS[3], ARGV[3])
return 1
"""


# Registers a job and, with a cap, only when its owner has fewer than the cap of queued or running jobs: one script,
# so two concurrent submits can never both take the last slot. The owner's active set is pruned on the way (jobs
# that ended or expired leave it), which keeps the count right however the worker moves jobs on.
# The job hashes of active members are read by key names built here from ARGV[5]: fine on one Redis (not Cluster).
# KEYS[1] job hash, KEYS[2] index, KEYS[3] owner index, KEYS[4] owner active set, KEYS[5] unplanned set,
# KEYS[6] the job's event stream.
# ARGV[1] job id, ARGV[2] ttl, ARGV[3] score, ARGV[4] cap (0: none), ARGV[5] job key prefix,
# ARGV[6] when to send again if not planned by then, ARGV[7] the first event (the status, JSON), ARGV[8] the
# stream's cap, ARGV[9..] fields.
# Returns -1 when created (and its first event appended), else the owner's active count (nothing written).
_CREATE_CAPPED = TRACK_STATUS + """
local cap = tonumber(ARGV[4])
if cap > 0 then
  local active = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local status = redis.call('HGET', ARGV[5] .. id, 'status')
    if status == 'queued' or status == 'running' then
      active = active + 1
    else
      redis.call('SREM', KEYS[4], id)
    end
  end
  if active >= cap then return active end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[1], ARGV[2])
track_status(KEYS[1], false, 'queued', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'status', ARGV[7])
redis.call('EXPIRE', KEYS[6], ARGV[2])
return -1
"""


# Jobs stored before the by-status sets existed are added to them once, batch by batch (then the marker is set).
# ARGV[1] job key prefix, ARGV[2] set name prefix, ARGV[3..] job ids.
_BACKFILL_STATUS = """
local now = tonumber(redis.call('TIME')[1])
for i = 3, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local status = redis.call('HGET', key, 'status')
  local ttl = redis.call('TTL', key)
  if status and ttl > 0 then redis.call('ZADD', ARGV[2] .. status, now + ttl, ARGV[i]) end
end
return 1
"""

GZIP_MAGIC = b"\x1f\x8b"
EVICTED = (
    "the job succeeded but its result is gone from Redis (evicted under memory pressure: the Redis of this "
    "deployment must run with maxmemory-policy noeviction, see docs/operations/deployment.md); submit the job again"
)


def compress_result(encoded: bytes) -> bytes:
    """The stored form of a result: gzip (level 6: ~4x smaller JSON at ~50 MB/s), no timestamp, so the same result
    always gives the same bytes."""
    return gzip.compress(encoded, compresslevel=6, mtime=0)


def decompress_result(stored: bytes) -> bytes:
    """The result's JSON from its stored form (plain JSON from before compression passes through)."""
    return gzip.decompress(stored) if stored.startswith(GZIP_MAGIC) else stored


# A rendered figure is cached only while its job's result is still there, and for no longer than the result: checked
# and written in one script, so a job deleted while its figure rendered leaves no figure behind (the render takes
# seconds; a check before it and a write after it would let the delete slip in between).
# KEYS[1] the figure, KEYS[2] the job's set of figure keys, KEYS[3] the result. ARGV[1] the figure's bytes,
# ARGV[2] the TTL (ms) when the result has none, ARGV[3] a margin (ms). Returns 1 cached, 0 the result is gone.
_CACHE_FIGURE = """
local ttl = redis.call('PTTL', KEYS[3])
if ttl == -2 then return 0 end
if ttl == -1 then ttl = tonumber(ARGV[2]) else ttl = math.max(1, ttl - tonumber(ARGV[3])) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# KEYS[1] job hash, KEYS[2] index, KEYS[3] owner index, KEYS[4] owner active set, KEYS[5..] the job's other keys.
# ARGV[1] job id. Returns -1 absent, 0 still queued or running (nothing removed), 1 deleted.
_DELETE_FINISHED = TRACK_STATUS + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'queued' or status == 'running' then return 0 end
redis.call('DEL', unpack(KEYS, 5))
redis.call('DEL', KEYS[1])
track_status(KEYS[1], status, false, 0)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""


class ActiveJobsExceeded(Exception):
    """An owner already has `cap` queued or running jobs; the API answers 429 and names both numbers."""

    def __init__(self, owner: str, active: int, cap: int) -> None:
        super().__init__(f"{owner} has {active} queued or running jobs (limit {cap})")
        self.owner = owner
        self.active = active
        self.cap = cap


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2025-11-25T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _label_fields(labels: JobLabels) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {}
    if labels.name is not None:
        fields["name"] = labels.name
    if labels.tags:
        fields["tags"] = msgspec.json.encode(labels.tags)
    if labels.metadata:
        fields["metadata"] = msgspec.json.encode(labels.metadata)
    if labels.callback_url is not None:
        fields["callback_url"] = labels.callback_url
    return fields


def _text(value: bytes | str | None) -> str | None:
    return None if value is None else as_bytes(value).decode()


# What a status read fetches of the job's hash (everything but the spec, which may hold thousands of prompts).
STATUS_FIELDS = (
    "status", "id", "model", "done", "total", "prompts_done", "prompts_total", "error", "created_at", "started_at",
    "finished_at", "owner", "phase", "name", "tags", "metadata", "callback_url", "note",
)  # fmt: skip

# KEYS[1] job hash, KEYS[2] result. ARGV the fields to read (STATUS_FIELDS: the status first).
# Returns {values, 1 when the job succeeded and its result exists else 0}: one command for a poll.
_READ_STATUS = """
local values = redis.call('HMGET', KEYS[1], unpack(ARGV))
local has_result = 0
if values[1] == 'succeeded' then has_result = redis.call('EXISTS', KEYS[2]) end
return {values, has_result}
"""


# The scripts the API's event loop runs (`create_async`, `status_async`): loaded at start-up (service/api/app.py), so a
# fresh Redis does not answer the first burst with NOSCRIPT and a second round trip per request.
LOOP_SCRIPTS = (_CREATE_CAPPED, _READ_STATUS)


def _status_fields(values: list[bytes | None]) -> dict[bytes, bytes]:
    return {name.encode(): value for name, value in zip(STATUS_FIELDS, values, strict=True) if value is not None}


def _unless_evicted(status: JobStatus, has_result: bool) -> JobStatus:
    """A succeeded job must have its result: without it (an evicting Redis dropped the key) it reads as failed."""
    if status.status != "succeeded" or has_result:
        return status
    return msgspec.structs.replace(status, status="failed", error=EVICTED)


def _new_job(
    spec: JobSpec, total: int, owner: str | None, job_id: str | None, labels: JobLabels | None
) -> tuple[JobStatus, dict[FieldT, EncodableT]]:
    """A queued job's status and the fields of its hash."""
    job_id = job_id or uuid.uuid4().hex
    now = utc_now()
    labels = labels or JobLabels()
    fields: dict[FieldT, EncodableT] = {
        "id": job_id,
        "status": "queued",
        "model": spec.model,
        "spec": msgspec.json.encode(spec),
        "created_at": now,
        "done": 0,
        "total": int(total),
        "phase": "queued",
        "prompts_done": 0,
        "prompts_total": len(spec.prompts),
        **_label_fields(labels),
    }
    status = JobStatus(
        id=job_id,
        status="queued",
        model=spec.model,
        progress=Progress(0, int(total), 0, len(spec.prompts)),
        created_at=now,
        owner=owner,
        name=labels.name,
        tags=list(labels.tags),
        metadata=dict(labels.metadata),
        callback_url=labels.callback_url,
    )
    return status, fields


def _created(status: JobStatus, outcome: int, owner: str, max_active: int) -> JobStatus:
    if outcome >= 0:
        raise ActiveJobsExceeded(owner, outcome, int(max_active))
    return status


class JobStore:
    """Jobs, results, cancel flags and advertised models in one Redis, all keys under `key_prefix`."""

    def __init__(self, client: redis.Redis, key_prefix: str = "hydra:", ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.prefix = key_prefix
        self.ttl_s = int(ttl_s)
        self._mark_running = client.register_script(_MARK_RUNNING)
        self._set_progress = client.register_script(_SET_PROGRESS)
        self._mark_succeeded = client.register_script(_MARK_SUCCEEDED)
        self._mark_failed = client.register_script(_MARK_FAILED)
        self._request_cancel = client.register_script(_REQUEST_CANCEL)
        self._create_capped = client.register_script(_CREATE_CAPPED)
        self._read_status = client.register_script(_READ_STATUS)
        self._set_prompts_done = client.register_script(_SET_PROMPTS_DONE)
        self._advance_phase = client.register_script(_ADVANCE_PHASE)
        # Called with a job id after the job reached a final state here (the webhook dispatcher hooks in).
        self.on_finished: Callable[[str], None] | None = None
        self._delete_finished = client.register_script(_DELETE_FINISHED)
        self._set_note = client.register_script(_SET_NOTE)
        self._cache_figure = client.register_script(_CACHE_FIGURE)
        self._backfill_status = client.register_script(_BACKFILL_STATUS)

    @classmethod
    def from_settings(cls, settings: Settings, socket_timeout: float | None = None) -> JobStore:
        """A store with its own connection pool (bytes, not decoded: results are stored raw)."""
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=5,
            socket_timeout=socket_timeout,
            health_check_interval=30,
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

    # keys
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def result_key(self, job_id: str) -> str:
        return f"{self.prefix}result:{job_id}"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    def chunks_done_key(self, job_id: str) -> str:
        """The chunk book's hash of recorded chunks (service/core/chunk_book.py names it the same way)."""
        return f"{self.prefix}chunks_done:{job_id}"

    def partial_key_prefix(self, job_id: str) -> str:
        """Chunk partial results are `{this}{index}` (service/core/chunk_book.py, ChunkBook.result_key)."""
        return f"{self.prefix}chunk:{job_id}:"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}jobs"

    def owner_index_key(self, owner: str) -> str:
        return f"{self.prefix}jobs:owner:{owner}"

    def active_key(self, owner: str) -> str:
        return f"{self.prefix}active:{owner}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    @property
    def events_channel(self) -> str:
        """The Pub/Sub channel on which each appended event's job id is published (channels are not keys)."""
        return f"{self.prefix}job-events"

    def callbacks_key(self, job_id: str) -> str:
        return f"{self.prefix}callbacks:{job_id}"

    def tokenizer_key(self, model_id: str) -> str:
        return f"{self.prefix}tokenizer:{model_id}"

    @property
    def unplanned_key(self) -> str:
        return f"{self.prefix}unplanned"

    @property
    def models_key(self) -> str:
        return f"{self.prefix}models"

    @property
    def refused_key(self) -> str:
        return f"{self.prefix}refused_models"

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
        status, fields = _new_job(spec, total, owner, job_id, labels)
        if owner is None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self.job_key(status.id), mapping=fields)
            pipe.expire(self.job_key(status.id), self.ttl_s)
            # Scored on this machine's clock, not Redis's as the scripts do: a skew of seconds shifts only when
            # the count forgets a job that expired.
            pipe.zadd(self.status_set_key("queued"), {status.id: time.time() + self.ttl_s})
            pipe.zadd(self.index_key, {status.id: time.time()})
            pipe.zadd(self.unplanned_key, {status.id: time.time() + RESEND_AFTER_S})
            pipe.execute()
            self.emit(status.id, status)
            return status
        keys, args = self._create_capped_call(status, fields, owner, max_active)
        return _created(status, int(self._create_capped(keys=keys, args=args)), owner, max_active)

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
        status, fields = _new_job(spec, total, owner, None, labels)
        keys, args = self._create_capped_call(status, fields, owner, max_active)
        outcome = await AsyncScript(client, _CREATE_CAPPED)(keys=keys, args=args)
        return _created(status, int(outcome), owner, max_active)

    def _create_capped_call(
        self, status: JobStatus, fields: dict[FieldT, EncodableT], owner: str, max_active: int
    ) -> tuple[list[str], ScriptArgs]:
        job_id = status.id
        fields["owner"] = owner
        keys = [
            self.job_key(job_id), self.index_key, self.owner_index_key(owner), self.active_key(owner),
            self.unplanned_key, self.events_key(job_id),
        ]  # fmt: skip
        flat = [item for pair in fields.items() for item in pair]
        now_s = time.time()
        args: ScriptArgs = [
            job_id, self.ttl_s, now_s, max(0, int(max_active)), self.job_key(""), now_s + RESEND_AFTER_S,
            msgspec.json.encode(status), EVENTS_MAXLEN, *flat,
        ]  # fmt: skip
        return keys, args

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status; a succeeded job whose result is gone (evicted) reads as failed, saying so."""
        keys = [self.job_key(job_id), self.result_key(job_id)]
        values, has_result = self._read_status(keys=keys, args=STATUS_FIELDS)
        status = self._decode_status(_status_fields(values))
        if status is None:
            return None
        if status.callback_url is not None:
            status.callbacks = self.callbacks(job_id)
        return _unless_evicted(status, bool(has_result))

    async def status_async(self, client: redis.asyncio.Redis, job_id: str) -> JobStatus | None:
        """`status` read with the event loop's own client (`client`: same server, same prefix): the API's status
        route, polled most, then costs no hand-off to a worker thread and back, and one command."""
        keys = [self.job_key(job_id), self.result_key(job_id)]
        values, has_result = await AsyncScript(client, _READ_STATUS)(keys=keys, args=STATUS_FIELDS)
        status = self._decode_status(_status_fields(values))
        if status is None:
            return None
        if status.callback_url is not None:
            status.callbacks = _callback_attempts(await client.lrange(self.callbacks_key(job_id), 0, -1))
        return _unless_evicted(status, bool(has_result))

    def spec(self, job_id: str) -> JobSpec | None:
        raw = self.client.hget(self.job_key(job_id), "spec")
        return None if raw is None else msgspec.json.decode(raw, type=JobSpec)

    def mark_running(self, job_id: str) -> bool:
        """Claim a queued job for a worker; False when it was cancelled, already claimed, finished or expired."""
        keys = [self.job_key(job_id), self.cancel_key(job_id)]
        return self._emitting(job_id, bool(self._mark_running(keys=keys, args=[utc_now(), self.ttl_s])))

    def set_progress(self, job_id: str, done: int, total: int, prompts_done: int | None = None) -> bool:
        """Record progress of a running job; False (and nothing written) once it is no longer running."""
        changed = bool(self._set_progress(keys=[self.job_key(job_id)], args=[int(done), int(total)]))
        if changed and prompts_done is not None:
            self._set_prompts_done(keys=[self.job_key(job_id)], args=[int(prompts_done)])
        return self._emitting(job_id, changed)

    def advance_phase(self, job_id: str, phase: str) -> bool:
        """Move a running job to a later phase (JOB_PHASES); False when it is not running or already past it."""
        rank = JOB_PHASES.index(phase)
        changed = bool(self._advance_phase(keys=[self.job_key(job_id)], args=[phase, rank, *JOB_PHASES]))
        return self._emitting(job_id, changed)

    def mark_succeeded(self, job_id: str, result: bytes) -> bool:
        """Store the result (the encoded JobResult; stored compressed) and finish a running job; False (result
        dropped) if it was cancelled meanwhile."""
        changed = bool(
            self._mark_succeeded(
                keys=[self.job_key(job_id), self.result_key(job_id)],
                args=[compress_result(result), utc_now(), self.ttl_s],
            )
        )
        return self._finishing(job_id, changed)

    def mark_failed(self, job_id: str, error: str) -> bool:
        """Fail a queued or running job with a message for the user (its chunk partials are dropped); False if it
        had already ended."""
        keys = [self.job_key(job_id), self.chunks_done_key(job_id)]
        changed = bool(
            self._mark_failed(keys=keys, args=[error, utc_now(), self.ttl_s, self.partial_key_prefix(job_id)])
        )
        return self._finishing(job_id, changed)

    # events (issue 12): a snapshot per change, for server-sent events, long polls and webhooks
    def emit(self, job_id: str, status: JobStatus | None = None) -> None:
        """Append the job's current status to its event stream (capped, expiring with the job) and tell the API
        processes' subscriptions that the job changed."""
        status = status or self.status(job_id)
        if status is None:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.events_key(job_id), {"status": msgspec.json.encode(status)}, maxlen=EVENTS_MAXLEN)
        pipe.expire(self.events_key(job_id), self.ttl_s)
        pipe.publish(self.events_channel, job_id)
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
        answer = stream_read(self.client.xread({self.events_key(job_id): after}, block=block_ms))
        found: list[tuple[str, JobStatus]] = []
        for _, entries in answer or []:
            for event_id, fields in entries:
                raw = fields.get(b"status")
                if raw is not None:
                    found.append((event_id.decode(), msgspec.json.decode(raw, type=JobStatus)))
        return found

    def last_event_id(self, job_id: str) -> str:
        """The id of the job's latest event ("0-0" when it has none)."""
        latest = stream_entries(self.client.xrevrange(self.events_key(job_id), count=1))
        return latest[0][0].decode() if latest else "0-0"

    def record_callback(self, job_id: str, attempt: CallbackAttempt) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(self.callbacks_key(job_id), msgspec.json.encode(attempt))
        pipe.expire(self.callbacks_key(job_id), self.ttl_s)
        pipe.execute()

    def callbacks(self, job_id: str) -> list[CallbackAttempt]:
        return _callback_attempts(self.client.lrange(self.callbacks_key(job_id), 0, -1))

    def set_note(self, job_id: str, note: str) -> bool:
        """Tell pollers what happened to an active job (e.g. a chunk sent again); False once it has ended."""
        return bool(self._set_note(keys=[self.job_key(job_id)], args=[note]))

    # jobs stored but not yet planned (see service/core/recovery.py)
    def mark_planned(self, job_id: str) -> None:
        """A worker has sent every chunk of the job (or dropped it): it no longer needs sending again."""
        self.client.zrem(self.unplanned_key, job_id)

    def unplanned(self, due_by: float | None = None, limit: int = 1000) -> list[str]:
        """Job ids stored but not yet planned; only those due to be sent again by `due_by` (epoch s) if given."""
        top = "+inf" if due_by is None else due_by
        due = bytes_list(self.client.zrangebyscore(self.unplanned_key, "-inf", top, start=0, num=limit))
        return [raw_id.decode() for raw_id in due]

    def defer_unplanned(self, job_id: str, until: float) -> None:
        """Look at an unplanned job again at `until` (epoch s), unless a worker plans it first."""
        self.client.zadd(self.unplanned_key, {job_id: until}, xx=True)

    def request_cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued or running job (the worker stops at its next check; chunk partials are dropped now);
        finished jobs stay as they are."""
        outcome = self._request_cancel(
            keys=[self.job_key(job_id), self.cancel_key(job_id), self.chunks_done_key(job_id)],
            args=[utc_now(), self.ttl_s, self.partial_key_prefix(job_id)],
        )
        if int(outcome) < 0:
            return None
        self._finishing(job_id, int(outcome) == 1)
        return self.status(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.client.exists(self.cancel_key(job_id)))

    def result(self, job_id: str) -> bytes | None:
        """The encoded JobResult (JSON), decompressed."""
        stored = bytes_or_none(self.client.get(self.result_key(job_id)))
        return None if stored is None else decompress_result(stored)

    def result_gzip(self, job_id: str) -> bytes | None:
        """The result's JSON gzip-compressed, as stored: served as is to clients that accept gzip."""
        stored = bytes_or_none(self.client.get(self.result_key(job_id)))
        if stored is None or stored.startswith(GZIP_MAGIC):
            return stored
        return compress_result(stored)  # written before results were compressed

    def figures_key(self, job_id: str) -> str:
        """The set of the job's cached figure keys (one per name, format and size asked for)."""
        return f"{self.prefix}figures:{job_id}"

    def cache_figure(self, job_id: str, key: str, data: bytes, margin_ms: int = 100) -> bool:
        """Cache a rendered figure until the job's result expires and remember its key, so deleting the job finds
        every size of it; False (nothing cached) when the result is gone, e.g. the job was deleted meanwhile."""
        keys = [key, self.figures_key(job_id), self.result_key(job_id)]
        return bool(self._cache_figure(keys=keys, args=[data, self.ttl_s * 1000, margin_ms]))

    def cached_figure_keys(self, job_id: str) -> list[str]:
        return [_text(key) or "" for key in self.client.smembers(self.figures_key(job_id))]

    def delete_finished(self, job_id: str, other_keys: list[str]) -> bool | None:
        """Remove a finished job, its result and `other_keys` (chunk and figure keys) for good; None when the job
        does not exist, False (nothing removed) while it is still queued or running: cancel it first."""
        raw_owner = self.client.hget(self.job_key(job_id), "owner")
        owner = raw_owner.decode() if isinstance(raw_owner, bytes) else (raw_owner or "")
        keys = [
            self.job_key(job_id),
            self.index_key,
            self.owner_index_key(owner),
            self.active_key(owner),
            self.result_key(job_id),
            self.cancel_key(job_id),
            self.events_key(job_id),
            self.callbacks_key(job_id),
            self.figures_key(job_id),
            *other_keys,
        ]
        outcome = int(self._delete_finished(keys=keys, args=[job_id]))
        return None if outcome < 0 else outcome == 1

    def page(
        self, offset: int = 0, limit: int = 50, owner: str | None = None, filters: JobFilter | None = None
    ) -> JobPage:
        """Jobs newest first (only `owner`'s when given); ids whose job hash has expired are dropped on the way.

        Time bounds are a range of the creation-time index. Status, model and tag filters read the fields of every
        job in that range (in batches, pipelined), so they cost one small read per job of the caller's listing.
        """
        index = self.index_key if owner is None else self.owner_index_key(owner)
        self._prune_index(index)
        filters = filters or JobFilter()
        high = "+inf" if filters.created_before is None else f"({filters.created_before}"
        low = "-inf" if filters.created_after is None else f"({filters.created_after}"
        if not filters.scans:
            # No MULTI: at maxmemory Redis refuses a transaction even of reads, and a listing must keep working.
            pipe = self.client.pipeline(transaction=False)
            pipe.zcount(index, low, high)
            pipe.zrevrangebyscore(index, high, low, start=offset, num=limit)
            total, ids = pipe.execute()
        else:
            matching = self._matching(index, high, low, filters)
            total, ids = len(matching), matching[offset : offset + limit]
        pipe = self.client.pipeline(transaction=False)
        for raw_id in ids:
            pipe.hgetall(self.job_key(raw_id.decode()))
        items = [s for s in (self._decode_status(h) for h in pipe.execute()) if s is not None]
        succeeded = [item for item in items if item.status == "succeeded"]
        if succeeded:
            pipe = self.client.pipeline(transaction=False)
            for item in succeeded:
                pipe.exists(self.result_key(item.id))
            present = {item.id: bool(found) for item, found in zip(succeeded, pipe.execute(), strict=True)}
            items = [_unless_evicted(item, present.get(item.id, True)) for item in items]
        return JobPage(items=items, total=int(total), offset=offset, limit=limit)

    def _matching(self, index: str, high: str, low: str, filters: JobFilter, batch: int = 500) -> list[bytes]:
        """Ids in the index's score range whose status, model and tags match, newest first."""
        found: list[bytes] = []
        start = 0
        while True:
            ids = bytes_list(self.client.zrevrangebyscore(index, high, low, start=start, num=batch))
            if not ids:
                return found
            pipe = self.client.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hmget(self.job_key(raw_id.decode()), "status", "model", "tags")
            for raw_id, (status, model, tags) in zip(ids, pipe.execute(), strict=True):
                if status is None:
                    continue
                if filters.status is not None and status.decode() != filters.status:
                    continue
                if filters.model is not None and (model or b"").decode() != filters.model:
                    continue
                if filters.tag is not None and filters.tag not in (msgspec.json.decode(tags) if tags else []):
                    continue
                found.append(raw_id)
            start += batch

    def status_set_key(self, state: str) -> str:
        """The sorted set of the jobs in `state` (see TRACK_STATUS)."""
        return f"{self.prefix}by-status:{state}"

    @property
    def status_sets_ready_key(self) -> str:
        return f"{self.prefix}by-status-ready"

    def count_by_status(self) -> dict[str, int]:
        """Jobs kept, by status (every state present, zero when none): a ZCOUNT per state of the by-status sets,
        whatever the number of jobs; members whose job expired are dropped on the way."""
        states = (*ACTIVE_STATES, *TERMINAL_STATES)
        if not self.client.exists(self.status_sets_ready_key):
            self.backfill_status_sets()
        now = int(self.client.time()[0])
        pipe = self.client.pipeline(transaction=False)
        for state in states:
            pipe.zremrangebyscore(self.status_set_key(state), "-inf", now)
            pipe.zcard(self.status_set_key(state))
        counts = pipe.execute()[1::2]
        return {state: int(count) for state, count in zip(states, counts, strict=True)}

    def backfill_status_sets(self, batch: int = 1000) -> None:
        """Add the jobs kept to the by-status sets (once, for jobs stored before the sets existed)."""
        start = 0
        while ids := bytes_list(self.client.zrange(self.index_key, start, start + batch - 1)):
            self._backfill_status(args=[self.job_key(""), self.status_set_key(""), *ids])
            start += batch
        self.client.set(self.status_sets_ready_key, b"1")

    def _prune_index(self, index: str | None = None, batch: int = 1000) -> None:
        # A job hash lives at least ttl_s after creation, so only older index entries can point at nothing.
        index = index or self.index_key
        cutoff = time.time() - self.ttl_s
        candidates = bytes_list(self.client.zrangebyscore(index, "-inf", cutoff, start=0, num=batch))
        if not candidates:
            return
        pipe = self.client.pipeline(transaction=False)
        for raw_id in candidates:
            pipe.exists(self.job_key(raw_id.decode()))
        gone = [raw_id for raw_id, alive in zip(candidates, pipe.execute(), strict=True) if not alive]
        if gone:
            self.client.zrem(index, *gone)

    @staticmethod
    def _decode_status(fields: dict[bytes, bytes]) -> JobStatus | None:
        if not fields:
            return None
        f: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items() if k != b"spec"}
        if "id" not in f or "status" not in f:  # a half-expired or foreign hash
            return None
        finished = f["status"] in TERMINAL_STATES
        return JobStatus(
            id=f["id"],
            status=f["status"],
            model=f.get("model", ""),
            progress=Progress(
                int(f.get("done", 0)),
                int(f.get("total", 0)),
                int(f.get("prompts_total", 0)) if f["status"] == "succeeded" else int(f.get("prompts_done", 0)),
                int(f.get("prompts_total", 0)),
            ),
            error=f.get("error"),
            created_at=f.get("created_at", ""),
            started_at=f.get("started_at"),
            finished_at=f.get("finished_at"),
            owner=f.get("owner"),
            phase="finished" if finished else f.get("phase", "queued"),
            name=f.get("name") or None,
            tags=msgspec.json.decode(f["tags"]) if f.get("tags") else [],
            metadata=msgspec.json.decode(f["metadata"]) if f.get("metadata") else {},
            callback_url=f.get("callback_url") or None,
            note=f.get("note"),
        )

    # models
    def served_key(self, model_id: str) -> str:
        return f"{self.prefix}served:{model_id}"

    def advertise_model(self, info: ModelInfo, ttl_s: int | None = None) -> None:
        """A worker announces a model it serves; the API validates requests against these records.

        With `ttl_s` the model counts as served only while some worker keeps calling `keep_serving`: when the
        last worker serving it stops, the API stops accepting jobs for it instead of queueing them forever.
        """
        self.client.hset(self.models_key, info.id, msgspec.json.encode(info))
        self.client.hdel(self.refused_key, info.id)
        self.client.set(self.served_key(info.id), b"1", ex=ttl_s)

    def keep_serving(self, model_ids: list[str], ttl_s: int) -> None:
        """A worker's heartbeat for the models it serves."""
        with self.client.pipeline() as pipe:
            for model_id in model_ids:
                pipe.set(self.served_key(model_id), b"1", ex=ttl_s)
            pipe.execute()

    def refuse_model(self, model_id: str, reason: str) -> None:
        """A worker was configured with a model the engine cannot decompose; jobs for it get this reason."""
        self.client.hset(self.refused_key, model_id, reason)
        self.client.hdel(self.models_key, model_id)

    def refused_models(self) -> dict[str, str]:
        return {_text(k) or "": _text(v) or "" for k, v in self.client.hgetall(self.refused_key).items()}

    def models(self) -> list[ModelInfo]:
        """The models some live worker serves (see `advertise_model`)."""
        found: list[ModelInfo] = []
        records = sorted(self.client.hgetall(self.models_key).items())
        alive = self.client.mget([self.served_key(_text(model_id) or "") for model_id, _ in records]) if records else []
        for (model_id, raw), served in zip(records, alive, strict=True):
            if served is None:
                continue
            try:
                found.append(msgspec.json.decode(raw, type=ModelInfo))
            except msgspec.DecodeError:
                logger.warning("ignoring a malformed model record %r", _text(model_id))
        return found

    def publish_tokenizer(self, model_id: str, tokenizer_json: str) -> None:
        """A worker shares its model's tokenizer so the API can count prompt tokens without loading the model."""
        self.client.set(self.tokenizer_key(model_id), tokenizer_json)

    def tokenizer_json(self, model_id: str) -> str | None:
        """The Hugging Face tokenizers JSON a worker published for `model_id`; None until one has."""
        raw = self.client.get(self.tokenizer_key(model_id))
        return None if raw is None else as_bytes(raw).decode()


def _callback_attempts(raw: list[bytes | str] | list[bytes]) -> list[CallbackAttempt]:
    return [msgspec.json.decode(item, type=CallbackAttempt) for item in raw]
