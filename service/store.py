"""The job registry in Redis, shared by the API (answers 404/409 itself) and the Celery worker (moves jobs on).

Synchronous redis-py on purpose: the worker is synchronous, and the API calls it from handlers declared with
`sync_to_thread=True`. Every state change is one Lua script, so a worker finishing a job can never overwrite a
cancel that landed a moment earlier (and vice versa).

Keys, under the configured prefix:
  job:{id}     hash: id, status, model, spec (JobSpec JSON), created_at, started_at, finished_at (ISO-8601 UTC),
               error, done, total
  jobs         sorted set of job ids scored by creation time (newest first when paged)
  result:{id}  the encoded JobResult
  cancel:{id}  present once a cancel was requested; the worker polls it between batches
  models       hash: model id -> ModelInfo JSON, as advertised by workers
The job keys expire `ttl_s` after the job's latest state change, so results live that long after finishing.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis

from service.schemas import JobPage, JobSpec, JobStatus, ModelInfo, Progress
from service.settings import Settings

logger = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")

# KEYS[1] job hash, KEYS[2] cancel flag. ARGV[1] now (ISO), ARGV[2] ttl seconds.
_MARK_RUNNING = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] job hash. ARGV[1] done, ARGV[2] total.
_SET_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'done', ARGV[1], 'total', ARGV[2])
return 1
"""

# KEYS[1] job hash, KEYS[2] result. ARGV[1] result bytes, ARGV[2] now, ARGV[3] ttl.
_MARK_SUCCEEDED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
local total = redis.call('HGET', KEYS[1], 'total') or '0'
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[2], 'done', total)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] job hash. ARGV[1] error, ARGV[2] now, ARGV[3] ttl.
_MARK_FAILED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'finished_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] job hash, KEYS[2] cancel flag. ARGV[1] now, ARGV[2] ttl. Returns -1 absent, 0 unchanged, 1 cancelled.
_REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2025-11-25T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


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

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """A store with its own connection pool (bytes, not decoded: results are stored raw)."""
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
        return cls(client, key_prefix=settings.key_prefix, ttl_s=settings.result_ttl_s)

    def close(self) -> None:
        self.client.close()

    # keys
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def result_key(self, job_id: str) -> str:
        return f"{self.prefix}result:{job_id}"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def models_key(self) -> str:
        return f"{self.prefix}models"

    # jobs
    def ping(self) -> bool:
        return bool(self.client.ping())

    def create(self, spec: JobSpec, total: int) -> JobStatus:
        """Register a queued job; the caller enqueues it afterwards."""
        job_id = uuid.uuid4().hex
        now = utc_now()
        fields = {
            "id": job_id,
            "status": "queued",
            "model": spec.model,
            "spec": msgspec.json.encode(spec),
            "created_at": now,
            "done": 0,
            "total": int(total),
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.job_key(job_id), mapping=fields)
        pipe.expire(self.job_key(job_id), self.ttl_s)
        pipe.zadd(self.index_key, {job_id: time.time()})
        pipe.execute()
        return JobStatus(id=job_id, status="queued", model=spec.model, progress=Progress(0, int(total)), created_at=now)

    def status(self, job_id: str) -> JobStatus | None:
        return self._decode_status(self.client.hgetall(self.job_key(job_id)))

    def spec(self, job_id: str) -> JobSpec | None:
        raw = self.client.hget(self.job_key(job_id), "spec")
        return None if raw is None else msgspec.json.decode(raw, type=JobSpec)

    def mark_running(self, job_id: str) -> bool:
        """Claim a queued job for a worker; False when it was cancelled, already claimed, finished or expired."""
        keys = [self.job_key(job_id), self.cancel_key(job_id)]
        return bool(self._mark_running(keys=keys, args=[utc_now(), self.ttl_s]))

    def set_progress(self, job_id: str, done: int, total: int) -> bool:
        """Record progress of a running job; False (and nothing written) once it is no longer running."""
        return bool(self._set_progress(keys=[self.job_key(job_id)], args=[int(done), int(total)]))

    def mark_succeeded(self, job_id: str, result: bytes) -> bool:
        """Store the result and finish a running job; False (result dropped) if it was cancelled meanwhile."""
        return bool(
            self._mark_succeeded(
                keys=[self.job_key(job_id), self.result_key(job_id)], args=[result, utc_now(), self.ttl_s]
            )
        )

    def mark_failed(self, job_id: str, error: str) -> bool:
        """Fail a queued or running job with a message for the user; False if it had already ended."""
        return bool(self._mark_failed(keys=[self.job_key(job_id)], args=[error, utc_now(), self.ttl_s]))

    def request_cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued or running job (the worker stops at its next check); finished jobs stay as they are."""
        outcome = self._request_cancel(
            keys=[self.job_key(job_id), self.cancel_key(job_id)], args=[utc_now(), self.ttl_s]
        )
        if int(outcome) < 0:
            return None
        return self.status(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.client.exists(self.cancel_key(job_id)))

    def result(self, job_id: str) -> bytes | None:
        return self.client.get(self.result_key(job_id))

    def page(self, offset: int = 0, limit: int = 50) -> JobPage:
        """Jobs newest first; ids whose job hash has expired are dropped from the index on the way."""
        self._prune_index()
        pipe = self.client.pipeline(transaction=True)
        pipe.zcard(self.index_key)
        pipe.zrevrange(self.index_key, offset, offset + limit - 1)
        total, ids = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for raw_id in ids:
            pipe.hgetall(self.job_key(raw_id.decode()))
        items = [s for s in (self._decode_status(h) for h in pipe.execute()) if s is not None]
        return JobPage(items=items, total=int(total), offset=offset, limit=limit)

    def _prune_index(self, batch: int = 1000) -> None:
        # A job hash lives at least ttl_s after creation, so only older index entries can point at nothing.
        cutoff = time.time() - self.ttl_s
        candidates = self.client.zrangebyscore(self.index_key, "-inf", cutoff, start=0, num=batch)
        if not candidates:
            return
        pipe = self.client.pipeline(transaction=False)
        for raw_id in candidates:
            pipe.exists(self.job_key(raw_id.decode()))
        gone = [raw_id for raw_id, alive in zip(candidates, pipe.execute(), strict=True) if not alive]
        if gone:
            self.client.zrem(self.index_key, *gone)

    @staticmethod
    def _decode_status(fields: dict[bytes, bytes]) -> JobStatus | None:
        if not fields:
            return None
        f: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items() if k != b"spec"}
        if "id" not in f or "status" not in f:  # a half-expired or foreign hash
            return None
        return JobStatus(
            id=f["id"],
            status=f["status"],
            model=f.get("model", ""),
            progress=Progress(int(f.get("done", 0)), int(f.get("total", 0))),
            error=f.get("error"),
            created_at=f.get("created_at", ""),
            started_at=f.get("started_at"),
            finished_at=f.get("finished_at"),
        )

    # models
    def advertise_model(self, info: ModelInfo) -> None:
        """A worker announces a model it serves; the API validates requests against these records."""
        self.client.hset(self.models_key, info.id, msgspec.json.encode(info))

    def models(self) -> list[ModelInfo]:
        found: list[ModelInfo] = []
        for model_id, raw in sorted(self.client.hgetall(self.models_key).items()):
            try:
                found.append(msgspec.json.decode(raw, type=ModelInfo))
            except msgspec.DecodeError:
                logger.warning("ignoring a malformed model record %r", _text(model_id))
        return found
