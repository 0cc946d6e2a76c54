"""Redis bookkeeping of a job's chunks: the plan, task ids, deliveries, progress and partial results. No torch.

A job's prompts are split into chunks of `HYDRA_CHUNK_PROMPTS` (64) prompts; each chunk is one Celery task
(worker/tasks.py). Every write here is idempotent or counted atomically, so a chunk that is delivered twice
(its worker died, the message came back) never counts twice.

Keys, under the JobStore's prefix, all expiring with the job's TTL:
  planned:{id}          SET NX guard: only the first delivery of `hydra.run_job` plans the job
  plan:{id}             hash: n_chunks, chunk_size, plus one field per chunk index -> "start:stop"
  chunk_tasks:{id}      hash: chunk index -> Celery task id (to revoke queued chunks of a cancelled job)
  deliveries:{id}       hash: chunk index -> times the chunk started (HINCRBY)
  progress:{id}         hash: chunk index -> ablations done in that chunk (only ever raised)
  chunk:{id}:{index}    the chunk's encoded ChunkResult
  chunks_done:{id}      hash: chunk index -> 1 (HSETNX); the chunk whose write makes HLEN = n_chunks merges
  revoked:{id}          SET NX guard: the chunks of a stopped job are revoked once
  verified:{id}         jobs with verify: the verification set (JSON list of names), SET NX by the phase-1 chunk
                        that completed the estimates, so every phase-2 chunk and any redelivery reads the same set
  exact_phase:{id}      jobs with verify: SET NX guard, the phase-2 (exact) chunks are sent by one caller
  lease:{id}:{index}    which run of the chunk holds it now (service/core/leases.py); recording is fenced by it
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import redis
from msgspec import Struct

from hydra_ablate_client.wire import ComponentEstimates, EstimateCost, PairResult, PromptResult, Provenance
from service.core.lua_scripts import lua
from service.core.redis_keys import RedisKeys
from service.core.redis_replies import EncodableT, FieldT, ScriptArgs, bytes_hash
from service.core.store import JobStore


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # first prompt, inclusive
    stop: int  # last prompt, exclusive

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_chunks(n_prompts: int, chunk_size: int) -> list[Chunk]:
    """Contiguous chunks of at most `chunk_size` prompts, in prompt order (at least one chunk)."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, got {chunk_size}")
    starts = range(0, max(n_prompts, 1), chunk_size)
    return [Chunk(i, start, min(start + chunk_size, n_prompts)) for i, start in enumerate(starts)]


class PromptEstimates(Struct, kw_only=True):
    """Phase 1 of a job with verify: one prompt's estimates of every component."""

    index: int
    estimates: ComponentEstimates


class ChunkResult(Struct, kw_only=True):
    """One chunk's partial result: its prompts' measures, with what the merge needs to build the JobResult."""

    index: int
    start: int
    stop: int
    components: list[str]
    response_basis: list[str]
    near_tie_gap: float
    prompts: list[PromptResult]
    provenance: Provenance
    # Jobs with estimates: per prompt of this chunk, what the exact engine and each method cost (the merge weighs
    # the chunks by their prompts).
    estimate_costs: list[EstimateCost] | None = None
    pairs: list[PairResult] | None = None  # patching jobs: the chunk's pairs (prompts is then empty)
    # Jobs with verify, phase 1 (estimates only): per measured prompt its estimates (prompts is then empty).
    estimated: list[PromptEstimates] | None = None


# Its Lua scripts are chunk_book.*.lua beside this module.
LEASE_LOST = -2


class ChunkBook:
    """The chunk keys of every job, next to the JobStore's keys (same client, prefix and TTL)."""

    def __init__(self, client: redis.Redis, key_prefix: str = "hydra:", ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.prefix = key_prefix
        self.redis_keys = RedisKeys(key_prefix)
        self.ttl_s = int(ttl_s)
        self._record_progress = client.register_script(lua("service.core", "chunk_book.record_progress"))
        self._record_result = client.register_script(lua("service.core", "chunk_book.record_result"))

    @classmethod
    def for_store(cls, store: JobStore) -> ChunkBook:
        return cls(store.client, key_prefix=store.prefix, ttl_s=store.ttl_s)

    # keys
    def _key(self, kind: str, job_id: str) -> str:
        return self.redis_keys.chunk_book(kind, job_id)

    def result_key(self, job_id: str, index: int) -> str:
        return self.redis_keys.chunk_result(job_id, index)

    def lease_key(self, job_id: str, index: int) -> str:
        """The chunk's lease (written by service/core/leases.py)."""
        return self.redis_keys.lease(job_id, index)

    def keys(self, job_id: str) -> list[str]:
        kinds = ("planned", "plan", "chunk_tasks", "deliveries", "progress", "chunks_done", "revoked", "verified",
                 "exact_phase")
        return [self._key(kind, job_id) for kind in kinds]

    # planning
    def claim_planning(self, job_id: str) -> bool:
        """True for the first caller only: a redelivered `run_job` must not plan the job twice."""
        return bool(self.client.set(self._key("planned", job_id), "1", nx=True, ex=self.ttl_s))

    def record_plan(self, job_id: str, chunks: list[Chunk], chunk_size: int, estimate_chunks: int = 0) -> None:
        """`estimate_chunks`: jobs with verify, chunks 0 … n-1 are phase 1 (estimates), the rest phase 2 (exact)."""
        fields: dict[FieldT, EncodableT] = {"n_chunks": len(chunks), "chunk_size": chunk_size}
        if estimate_chunks:
            fields["estimate_chunks"] = estimate_chunks
        fields.update({str(c.index): f"{c.start}:{c.stop}" for c in chunks})
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._key("plan", job_id), mapping=fields)
        pipe.expire(self._key("plan", job_id), self.ttl_s)
        pipe.execute()

    def plan(self, job_id: str) -> list[Chunk] | None:
        plan = bytes_hash(self.client.hgetall(self._key("plan", job_id)))
        fields = {k.decode(): v.decode() for k, v in plan.items()}
        if "n_chunks" not in fields:
            return None
        chunks = []
        for index in range(int(fields["n_chunks"])):
            start, _, stop = fields[str(index)].partition(":")
            chunks.append(Chunk(index, int(start), int(stop)))
        return chunks

    def estimate_chunks(self, job_id: str) -> int:
        """How many of the job's first chunks are phase-1 estimate chunks (0 for a job without verify)."""
        raw = self.client.hget(self._key("plan", job_id), "estimate_chunks")
        return 0 if raw is None else int(raw)

    def claim_verified(self, job_id: str, components: list[str]) -> list[str]:
        """Store the verification set unless one is stored; returns the stored one (the first caller's)."""
        key = self._key("verified", job_id)
        self.client.set(key, msgspec.json.encode(components), nx=True, ex=self.ttl_s)
        return self.verified(job_id) or components

    def verified(self, job_id: str) -> list[str] | None:
        raw = self.client.get(self._key("verified", job_id))
        return None if raw is None else msgspec.json.decode(raw, type=list[str])

    def claim_exact_phase(self, job_id: str) -> bool:
        """True for the first caller only: the phase-2 chunks of a job with verify are sent once."""
        return bool(self.client.set(self._key("exact_phase", job_id), "1", nx=True, ex=self.ttl_s))

    def n_chunks(self, job_id: str) -> int | None:
        raw = self.client.hget(self._key("plan", job_id), "n_chunks")
        return None if raw is None else int(raw)

    def record_task(self, job_id: str, index: int, task_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._key("chunk_tasks", job_id), str(index), task_id)
        pipe.expire(self._key("chunk_tasks", job_id), self.ttl_s)
        pipe.execute()

    def task_ids(self, job_id: str) -> dict[int, str]:
        raw = bytes_hash(self.client.hgetall(self._key("chunk_tasks", job_id)))
        return {int(k): v.decode() for k, v in raw.items()}

    def pending_task_ids(self, job_id: str) -> list[str]:
        """Task ids of the chunks not recorded as done (queued, running, or lost)."""
        done = self.done_indices(job_id)
        return [task_id for index, task_id in sorted(self.task_ids(job_id).items()) if index not in done]

    def claim_revoke(self, job_id: str) -> bool:
        """True for the first caller only, so that a stopped job's chunks are revoked once, not once per chunk."""
        return bool(self.client.set(self._key("revoked", job_id), "1", nx=True, ex=self.ttl_s))

    # running
    def count_delivery(self, job_id: str, index: int) -> int:
        """Count one more start of this chunk; returns how often it has started, this time included."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self._key("deliveries", job_id), str(index), 1)
        pipe.expire(self._key("deliveries", job_id), self.ttl_s)
        count, _ = pipe.execute()
        return int(count)

    def deliveries(self, job_id: str) -> dict[int, int]:
        raw = self.client.hgetall(self._key("deliveries", job_id))
        return {int(k): int(v) for k, v in raw.items()}

    def record_progress(self, job_id: str, index: int, done: int) -> int:
        """Raise this chunk's count of finished ablations to `done`; returns the job's sum over its chunks."""
        keys = [self._key("progress", job_id)]
        return int(self._record_progress(keys=keys, args=[str(index), int(done), self.ttl_s]))

    def progress(self, job_id: str) -> dict[int, int]:
        """Ablations done per chunk (chunks that have not reported yet are absent)."""
        raw = self.client.hgetall(self._key("progress", job_id))
        return {int(k): int(v) for k, v in raw.items()}

    # results
    def record_result(self, job_id: str, index: int, result: ChunkResult, lease_token: str = "") -> int:
        """Store a chunk's result; returns chunks done now, -1 when this chunk had been recorded before (or the job
        has ended), or LEASE_LOST (nothing stored) when `lease_token` no longer holds the chunk's lease."""
        keys = [
            self.result_key(job_id, index),
            self._key("chunks_done", job_id),
            self.lease_key(job_id, index),
            self.redis_keys.job(job_id),
        ]
        args: ScriptArgs = [msgspec.json.encode(result), str(index), self.ttl_s, lease_token]
        return int(self._record_result(keys=keys, args=args))

    def is_done(self, job_id: str, index: int) -> bool:
        return bool(self.client.hexists(self._key("chunks_done", job_id), str(index)))

    def done_indices(self, job_id: str) -> set[int]:
        return {int(k) for k in self.client.hkeys(self._key("chunks_done", job_id))}

    def results(self, job_id: str, indices: Iterable[int]) -> list[ChunkResult | None]:
        """The recorded chunk results, in the order asked (None where one is missing or expired)."""
        wanted = list(indices)
        if not wanted:
            return []
        raws = self.client.mget([self.result_key(job_id, i) for i in wanted])
        return [None if raw is None else msgspec.json.decode(raw, type=ChunkResult) for raw in raws]

    def drop_results(self, job_id: str, indices: Iterable[int]) -> None:
        """Delete the partial results once the merged JobResult is stored (the bookkeeping keys expire)."""
        keys = [self.result_key(job_id, i) for i in indices]
        if keys:
            self.client.delete(*keys)
