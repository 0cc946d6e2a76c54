"""Listing jobs: pages of the creation-time indexes (jobs, jobs:owner:{name}), filters, counts by status."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

from hydra_ablate_client.vocabulary import ACTIVE_STATES, TERMINAL_STATES
from hydra_ablate_client.wire import JobPage
from service.core.redis_replies import bytes_list
from service.core.store.base import StoreBase
from service.core.store.job_records import decode_status, unless_evicted
from service.core.store.lua import lua

BACKFILL_STATUS = lua("backfill_status")


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


class JobListing(StoreBase):
    def page(
        self, offset: int = 0, limit: int = 50, owner: str | None = None, filters: JobFilter | None = None
    ) -> JobPage:
        """Jobs newest first (only `owner`'s when given); ids whose job hash has expired are dropped on the way.

        Time bounds are a range of the creation-time index. Status, model and tag filters read the fields of every
        job in that range (in batches, pipelined), so they cost one small read per job of the caller's listing.
        """
        index = self.keys.jobs if owner is None else self.keys.owner_jobs(owner)
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
            pipe.hgetall(self.keys.job(raw_id.decode()))
        items = [s for s in (decode_status(h) for h in pipe.execute()) if s is not None]
        succeeded = [item for item in items if item.status == "succeeded"]
        if succeeded:
            pipe = self.client.pipeline(transaction=False)
            for item in succeeded:
                pipe.exists(self.keys.result(item.id))
            present = {item.id: bool(found) for item, found in zip(succeeded, pipe.execute(), strict=True)}
            items = [unless_evicted(item, present.get(item.id, True)) for item in items]
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
                pipe.hmget(self.keys.job(raw_id.decode()), "status", "model", "tags")
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

    def count_by_status(self) -> dict[str, int]:
        """Jobs kept, by status (every state present, zero when none): a count per state of the by-status sets
        (track_status.lua), whatever the number of jobs; members whose job expired are dropped on the way."""
        states = (*ACTIVE_STATES, *TERMINAL_STATES)
        if not self.client.exists(self.keys.by_status_ready):
            self.backfill_status_sets()
        now = int(self.client.time()[0])
        pipe = self.client.pipeline(transaction=False)
        for state in states:
            pipe.zremrangebyscore(self.keys.by_status(state), "-inf", now)
            pipe.zcard(self.keys.by_status(state))
        counts = pipe.execute()[1::2]
        return {state: int(count) for state, count in zip(states, counts, strict=True)}

    def backfill_status_sets(self, batch: int = 1000) -> None:
        """Add the jobs kept to the by-status sets (once, for jobs stored before the sets existed)."""
        script = self.client.register_script(BACKFILL_STATUS)
        start = 0
        while ids := bytes_list(self.client.zrange(self.keys.jobs, start, start + batch - 1)):
            script(args=[self.keys.job_prefix, self.keys.by_status(""), *ids])
            start += batch
        self.client.set(self.keys.by_status_ready, b"1")

    def _prune_index(self, index: str | None = None, batch: int = 1000) -> None:
        # A job hash lives at least ttl_s after creation, so only older index entries can point at nothing.
        index = index or self.keys.jobs
        cutoff = time.time() - self.ttl_s
        candidates = bytes_list(self.client.zrangebyscore(index, "-inf", cutoff, start=0, num=batch))
        if not candidates:
            return
        pipe = self.client.pipeline(transaction=False)
        for raw_id in candidates:
            pipe.exists(self.keys.job(raw_id.decode()))
        gone = [raw_id for raw_id, alive in zip(candidates, pipe.execute(), strict=True) if not alive]
        if gone:
            self.client.zrem(index, *gone)
