"""Deleting a finished job: the one place that knows every key a job leaves behind.

The API (`DELETE /v1/jobs/{id}` of a finished job) and the web page's delete button both call
`delete_finished_job`; the removal itself is one Lua script (`JobStore.delete_finished`), so a job is either
wholly there or wholly gone, and a job still queued or running is never touched (cancel it first).
"""

from __future__ import annotations

from service.core.chunk_book import ChunkBook
from service.core.store import JobStore


def leftover_keys(store: JobStore, job_id: str) -> list[str]:
    """Every key of the job besides those `JobStore.delete_finished` names itself: chunk bookkeeping, chunk
    partials and leases, and every cached figure (any format and size, as recorded when it was cached)."""
    book = ChunkBook.for_store(store)
    keys = list(book.keys(job_id))
    for index in range(book.n_chunks(job_id) or 0):
        keys += [book.result_key(job_id, index), book.lease_key(job_id, index)]
    keys += store.cached_figure_keys(job_id)
    return list(dict.fromkeys(keys))


def delete_finished_job(store: JobStore, job_id: str) -> bool | None:
    """True once the finished job and everything it left are gone; False while it is queued or running (nothing
    is removed); None when there is no such job."""
    return store.delete_finished(job_id, leftover_keys(store, job_id))
