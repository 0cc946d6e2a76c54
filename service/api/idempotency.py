"""`Idempotency-Key` on POST /v1/jobs: a retried submit (lost answer, client restart) never queues a second job.

Per owner, a key maps to the request's fingerprint (SHA-256 of its canonical JSON) and the id of the job it made,
in Redis for as long as jobs live. The record is claimed with SET NX *before* the job is created, with the job id
chosen up front, so of two concurrent requests with the same key exactly one creates the job; the other waits
briefly for that job to appear and answers with it. The same key with a different body is a client bug: 409.
A submit that fails (422, 429, 503) releases its claim, so the client can fix the request and retry the key.
Once its job exists the record says so (`created`): a repeat whose job has since been deleted (or has expired) is
answered 410 Gone, naming the job, rather than "still being processed"; a new key submits the job again.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import redis
from litestar.exceptions import ClientException
from litestar.status_codes import HTTP_409_CONFLICT, HTTP_410_GONE

from hydra_ablate_client.wire import JobRequest, JobStatus
from service.core.lua_scripts import lua
from service.core.redis_keys import RedisKeys

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


class Record(msgspec.Struct, kw_only=True):
    fingerprint: str
    job_id: str
    created: bool = False  # the job was stored (a record without it: the first request may still be creating it)


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    replayed: bool  # True: an earlier request with this key made the job


def fingerprint(request: JobRequest) -> str:
    """SHA-256 of the body's canonical JSON (sorted keys, no whitespace): the same job however it was spelled."""
    canonical = json.dumps(msgspec.to_builtins(request), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyRecords:
    """The key -> (fingerprint, job id) records of one store prefix."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int, wait_s: float = 5.0) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.wait_s = wait_s  # how long a duplicate waits for the first request's job to appear
        self._release = client.register_script(lua("service.api", "idempotency.release"))

    def record_key(self, owner: str, key: str) -> str:
        # Hashed: the client's key may hold any characters and any length up to the header's limit.
        return RedisKeys(self.prefix).idempotency(owner, key)

    def claim(self, owner: str, key: str, print_: str, job_id: str) -> tuple[bool, Record | None]:
        """(True, None) when this request now owns the key; else (False, the earlier request's record or None when
        that record vanished between the two commands)."""
        record_key = self.record_key(owner, key)
        value = msgspec.json.encode(Record(fingerprint=print_, job_id=job_id))
        if self.client.set(record_key, value, nx=True, ex=self.ttl_s):
            return True, None
        raw = self.client.get(record_key)
        return False, None if raw is None else msgspec.json.decode(raw, type=Record)

    def _mark_created(self, owner: str, key: str, print_: str, job_id: str) -> None:
        """The job exists now: a later repeat that finds no job knows it was deleted, not still being created."""
        value = msgspec.json.encode(Record(fingerprint=print_, job_id=job_id, created=True))
        try:
            self.client.set(self.record_key(owner, key), value, xx=True, keepttl=True)
        except redis.RedisError:  # the job is made and answered; a repeat after its deletion then says 409
            pass

    def release(self, owner: str, key: str, job_id: str) -> None:
        self._release(keys=[self.record_key(owner, key)], args=[job_id])

    def submit_once(
        self,
        owner: str,
        key: str,
        request: JobRequest,
        create: Callable[[str], JobStatus],
        lookup: Callable[[str], JobStatus | None],
    ) -> Outcome:
        """Run `create(job_id)` at most once per (owner, key); a repeat answers with the job the first one made."""
        print_ = fingerprint(request)
        deadline = time.monotonic() + self.wait_s
        while True:
            job_id = uuid.uuid4().hex
            owned, earlier = self.claim(owner, key, print_, job_id)
            if earlier is None:
                if not owned:
                    continue  # the earlier record was released or expired between SET NX and GET: claim again
                try:
                    status = create(job_id)
                except BaseException:
                    self.release(owner, key, job_id)
                    raise
                self._mark_created(owner, key, print_, job_id)
                return Outcome(status, replayed=False)
            if earlier.fingerprint != print_:
                raise ClientException(
                    status_code=HTTP_409_CONFLICT,
                    detail=(
                        f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different request body (job "
                        f"{earlier.job_id}); use a new key for a new job"
                    ),
                )
            found = lookup(earlier.job_id)
            if found is not None:
                return Outcome(found, replayed=True)
            if earlier.created:
                raise ClientException(
                    status_code=HTTP_410_GONE,
                    detail=(
                        f"the job {earlier.job_id} that {IDEMPOTENCY_HEADER} {key!r} created is gone (deleted, or "
                        "expired); submit with a new key to run it again"
                    ),
                )
            if time.monotonic() >= deadline:
                raise ClientException(
                    status_code=HTTP_409_CONFLICT,
                    detail=(
                        f"a request with {IDEMPOTENCY_HEADER} {key!r} is still being processed (job "
                        f"{earlier.job_id}); retry in a few seconds"
                    ),
                )
            time.sleep(0.05)  # the first request is between its claim and creating the job (or releasing)
