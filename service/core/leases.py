"""Chunk leases: which run of a chunk holds it right now, kept alive by the running worker's heartbeat. No torch.

The broker only notices a vanished worker after its visibility timeout (hours: it must exceed the longest chunk).
A lease notices within `HYDRA_LEASE_S`: the worker running a chunk renews it every quarter of that; a lease that
was not renewed in time is reaped by any worker's periodic sweep (service/core/recovery.py), which sends the chunk
again. A lease has an owner token (random per run of a chunk), so:

- a second delivery of a chunk whose lease is alive does not run it (the chunk never runs twice at once);
- a stale holder (paused, partitioned, or slower than its lease) finds its token gone at its next renewal, stops
  at its next prompt and records nothing: recording a result or a failure is fenced by the token (see
  service/core/chunk_book.py `record_result` and `fail_if_holder` here).

Keys, under the JobStore's prefix:
  lease:{id}:{index}   the holder's token; "queued:<task id>" for a chunk sent but not started (looked at again
                       after a long while: its message may have been lost), "requeued:…" once a sweep sent it again
  leases               sorted set of "{id}:{index}" scored by the lease's expiry in ms (Redis's clock, so the
                       workers' clocks need not agree)
A lease key is absent when Redis lost the last writes before a crash; the holder's renewal then takes it back
(nobody else can hold it). Times come from Redis (TIME), never from a worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis

from service.core.lua_scripts import lua
from service.core.redis_keys import RedisKeys
from service.core.redis_replies import ScriptArgs, bytes_or_none
from service.core.store import JobStore, utc_now

QUEUED = "queued:"  # sent by the planner, not started yet
REQUEUED = "requeued:"  # sent again by a sweep, not started yet


def _script(name: str) -> str:
    """A lease script, service/core/leases.{name}.lua, after the clock and marker helpers (leases.now_ms.lua)."""
    return lua("service.core", "leases.now_ms", f"leases.{name}")


def _fail_script() -> str:
    """leases.fail_if_holder.lua after the store's status bookkeeping (store/track_status.lua) that it calls."""
    return lua("service.core.store", "track_status") + "\n" + lua("service.core", "leases.fail_if_holder")


@dataclass(frozen=True)
class ChunkRef:
    job_id: str
    index: int

    @property
    def member(self) -> str:
        return f"{self.job_id}:{self.index}"

    @classmethod
    def parse(cls, member: str) -> ChunkRef:
        job_id, _, index = member.rpartition(":")
        return cls(job_id, int(index))


class Leases:
    """The chunk leases of every job, next to the JobStore's keys (same client, prefix and key TTL)."""

    def __init__(self, client: redis.Redis, key_prefix: str = "hydra:", ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.prefix = key_prefix
        self.redis_keys = RedisKeys(key_prefix)
        self.ttl_s = int(ttl_s)
        self._acquire = client.register_script(_script("acquire"))
        self._renew = client.register_script(_script("renew"))
        self._release = client.register_script(_script("release"))
        self._reap = client.register_script(_script("reap"))
        self._mark_queued = client.register_script(_script("mark_queued"))
        self._fail_if_holder = client.register_script(_fail_script())

    @classmethod
    def for_store(cls, store: JobStore) -> Leases:
        return cls(store.client, key_prefix=store.prefix, ttl_s=store.ttl_s)

    @property
    def index_key(self) -> str:
        return self.redis_keys.leases

    def key(self, job_id: str, index: int) -> str:
        return self.redis_keys.lease(job_id, index)

    def _keys(self, job_id: str, index: int) -> list[str]:
        return [self.key(job_id, index), self.index_key]

    def acquire(
        self, job_id: str, index: int, token: str, lease_s: float, dead: Callable[[str], bool] | None = None
    ) -> str | None:
        """Take the chunk's lease for `lease_s`: None when taken, else the token of the run holding a live lease.

        `dead(holder)` may say that a holder is gone although its lease has not expired yet (a pool process on
        this machine that was killed): its lease is then taken over at once.
        """
        args: ScriptArgs = [ChunkRef(job_id, index).member, token, int(lease_s * 1000), self.ttl_s, ""]
        outcome = self._acquire(keys=self._keys(job_id, index), args=args)
        if outcome == 1:
            return None
        holder = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if dead is not None and dead(holder):
            args[-1] = holder
            if self._acquire(keys=self._keys(job_id, index), args=args) == 1:
                return None
        return holder

    def still_holds(self, job_id: str, index: int, token: str) -> bool:
        """True while `token` holds the lease (or nobody does: Redis lost it in a crash; renewing takes it back)."""
        holder = self.holder(job_id, index)
        return holder is None or holder == token

    def renew(self, job_id: str, index: int, token: str, lease_s: float) -> bool:
        """Extend the lease by `lease_s` from now; False once another run or the sweep has taken it."""
        args: ScriptArgs = [ChunkRef(job_id, index).member, token, int(lease_s * 1000), self.ttl_s]
        return bool(self._renew(keys=self._keys(job_id, index), args=args))

    def release(self, job_id: str, index: int, token: str = "") -> bool:
        """Give the lease up (only if `token` still holds it; an empty token drops it whoever holds it)."""
        args: ScriptArgs = [ChunkRef(job_id, index).member, token]
        return bool(self._release(keys=self._keys(job_id, index), args=args))

    def holder(self, job_id: str, index: int) -> str | None:
        raw = bytes_or_none(self.client.get(self.key(job_id, index)))
        return None if raw is None else raw.decode()

    def mark_queued(self, job_id: str, index: int, task_id: str, recheck_s: float) -> bool:
        """A chunk was just sent: if it has not started within `recheck_s`, a sweep looks for its message (a Redis
        crash may have lost it). False when a run holds the chunk already."""
        args: ScriptArgs = [ChunkRef(job_id, index).member, f"{QUEUED}{task_id}", int(recheck_s * 1000), self.ttl_s]
        return bool(self._mark_queued(keys=self._keys(job_id, index), args=args))

    def reap(self, recheck_s: float, batch: int = 100) -> list[tuple[ChunkRef, str]]:
        """Expired leases with their previous holder (a run's token, or a queued/requeued marker when the chunk
        never started), marked "requeued" and looked at again after `recheck_s` unless their chunk starts."""
        args: ScriptArgs = [self.redis_keys.lease_prefix, batch, int(recheck_s * 1000), self.ttl_s]
        raw = self._reap(keys=[self.index_key], args=args)
        pairs = zip(raw[0::2], raw[1::2], strict=True)
        return [(ChunkRef.parse(member.decode()), holder.decode()) for member, holder in pairs]

    @staticmethod
    def never_started(holder: str) -> bool:
        """True for the markers of a chunk sent but not started since (no run's token)."""
        return holder == "" or holder.startswith((QUEUED, REQUEUED))

    def fail_if_holder(self, store: JobStore, job_id: str, index: int, token: str, error: str) -> int:
        """Fail the job unless another run took the chunk over: 1 failed, 0 already ended, -1 not the holder."""
        keys = [store.keys.job(job_id), self.key(job_id, index)]
        return int(self._fail_if_holder(keys=keys, args=[token, error, utc_now(), store.ttl_s]))
