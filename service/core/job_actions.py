"""What the API and the web pages do to jobs on a caller's behalf: prepare, queue, read, cancel. No HTTP here.

The JSON routes (service/api/controllers/jobs.py) and the web pages (service/api/ui/controller.py) call these same
functions, so a page shows what the API would answer. Refusals are domain errors (service/core/errors.py), which the
API maps to problem details in one place (service/api/controllers/problems.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio.to_thread
import redis.asyncio

from hydra_ablate_client.wire import JobRequest, JobSpec, JobStatus
from service.core.api_keys import Principal
from service.core.chunk_book import ChunkBook
from service.core.errors import BackendUnavailable, JobConflict, JobNotFound
from service.core.labels import labels_of, parse_allow_list
from service.core.prompt_tokens import TokenCounters, check_prompt_tokens
from service.core.queue import JobQueue
from service.core.resolve import ablation_count
from service.core.served_models import ServedModels
from service.core.settings import Settings
from service.core.store import JobLabels, JobStore

logger = logging.getLogger(__name__)
# Runs a function in a worker thread and returns its value (service/api/large_bodies.py `LargeBodies.run`).
Offload = Callable[[Callable[[], "tuple[JobSpec, JobLabels]"]], Awaitable["tuple[JobSpec, JobLabels]"]]


def _conflict(detail: str) -> JobConflict:
    return JobConflict(detail)


def job_not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"job {job_id} not found (unknown, or its results have expired)")


def visible_status(store: JobStore, job_id: str, principal: Principal | None) -> JobStatus:
    """The job's status, or 404 when it does not exist or belongs to another key: the same answer for both, so a
    key cannot probe which job ids exist."""
    return _visible(store.status(job_id), job_id, principal)


async def visible_status_async(
    client: redis.asyncio.Redis, store: JobStore, job_id: str, principal: Principal | None
) -> JobStatus:
    """`visible_status` on the event loop's Redis client (no worker thread): the route polled most uses it."""
    return _visible(await store.status_async(client, job_id), job_id, principal)


def _visible(status: JobStatus | None, job_id: str, principal: Principal | None) -> JobStatus:
    if status is None or (principal is not None and not principal.may_see(status.owner)):
        raise job_not_found(job_id)
    return status


def require_succeeded(store: JobStore, job_id: str, principal: Principal | None = None) -> None:
    """404 for an unknown (or another key's) job, 409 (saying why) until it has succeeded: shared by the result and
    figure routes."""
    status = visible_status(store, job_id, principal)
    if status.status in ("queued", "running"):
        done, total = status.progress.done, status.progress.total
        raise _conflict(f"job {job_id} is {status.status} ({done}/{total} ablations done); no result yet")
    if status.status == "failed":
        raise _conflict(f"job {job_id} failed: {status.error or 'no error message'}")
    if status.status == "cancelled":
        raise _conflict(f"job {job_id} was cancelled; it has no result")


def finished_result(
    store: JobStore, job_id: str, principal: Principal | None = None, compressed: bool = False
) -> bytes:
    """The stored result of a succeeded job (its JSON, or gzip of it as stored when `compressed`); 404 when it
    expired between the status check and the read."""
    require_succeeded(store, job_id, principal)
    result = store.result_gzip(job_id) if compressed else store.result(job_id)
    if result is None:
        raise job_not_found(job_id)
    return result


def prepare_job(
    data: JobRequest, store: JobStore, settings: Settings, tokens: TokenCounters, served: ServedModels
) -> tuple[JobSpec, JobLabels]:
    """Resolve and check the request (model, sizes, labels, prompt tokens); may read Redis."""
    spec = served.resolve(data, store, settings)
    labels = labels_of(data, parse_allow_list(settings.callback_allow))
    check_prompt_tokens(spec, lambda model_id: tokens.get(store, model_id), settings)
    return spec, labels


class _NotKept(Exception):
    """What prepare_job needs is not kept in this process: read it from Redis (in a thread)."""


def _prepare_from_kept(
    data: JobRequest, settings: Settings, tokens: TokenCounters, served: ServedModels
) -> tuple[JobSpec, JobLabels] | None:
    """`prepare_job` from what this process keeps (the served models, the tokenizers), without touching Redis;
    None when something must be read first."""

    def kept_tokenizer(model_id: str) -> Any | None:
        found, tokenizer = tokens.recent(model_id)
        if not found:
            raise _NotKept(model_id)
        return tokenizer

    spec = served.resolve_recent(data, settings)
    if spec is None:
        return None
    labels = labels_of(data, parse_allow_list(settings.callback_allow))
    try:
        check_prompt_tokens(spec, kept_tokenizer, settings)
    except _NotKept:
        return None
    return spec, labels


def queue_job(
    data: JobRequest,
    job_id: str | None,
    principal: Principal,
    store: JobStore,
    queue: JobQueue,
    settings: Settings,
    tokens: TokenCounters,
    served: ServedModels,
) -> JobStatus:
    """Resolve and check the request, register the job under the caller (within its cap) and hand it to Celery."""
    spec, labels = prepare_job(data, store, settings, tokens, served)
    status = store.create(
        spec,
        ablation_count(spec),
        principal.name,
        job_id=job_id,
        max_active=settings.max_active_jobs,
        labels=labels,
    )
    try:
        queue.enqueue(status.id)
    except Exception as exc:  # any failure means not queued
        if not _failed_as_unqueued(partial(store.mark_failed, status.id, f"could not be queued: {exc}"), status, exc):
            return status
        raise _not_queued(status.id, exc) from exc
    return status


async def queue_job_async(
    data: JobRequest,
    principal: Principal,
    aredis: redis.asyncio.Redis,
    store: JobStore,
    queue: JobQueue,
    settings: Settings,
    tokens: TokenCounters,
    served: ServedModels,
    offload: Offload | None = None,
) -> JobStatus:
    """`queue_job` (without a chosen id) on the event loop: the submit route's path. The request is checked
    against the models and tokenizers this process keeps fresh in the background; the job is stored (one script)
    and its message pushed with the loop's own Redis client. Only when something is not kept (a model advertised
    a moment ago, a tokenizer not parsed yet) is the check done in a thread, reading Redis.

    With `offload` (a large request: thousands of prompts to count in tokens), the whole check runs through it, in a
    worker thread within the API's bound on large bodies, never on the loop."""
    if offload is not None:
        prepared = await offload(lambda: prepare_job(data, store, settings, tokens, served))
    else:
        kept = _prepare_from_kept(data, settings, tokens, served)
        if kept is None:
            kept = await anyio.to_thread.run_sync(prepare_job, data, store, settings, tokens, served)
        prepared = kept
    spec, labels = prepared
    status = await store.create_async(
        aredis, spec, ablation_count(spec), principal.name, max_active=settings.max_active_jobs, labels=labels
    )
    try:
        await queue.enqueue_async(aredis, status.id)
    except Exception as exc:  # any failure means not queued
        mark = partial(store.mark_failed, status.id, f"could not be queued: {exc}")
        if not await anyio.to_thread.run_sync(_failed_as_unqueued, mark, status, exc):
            return status
        raise _not_queued(status.id, exc) from exc
    return status


def _failed_as_unqueued(mark_failed: Callable[[], object], status: JobStatus, exc: Exception) -> bool:
    """After the job was stored but its message could not be pushed: mark it failed, so that the 503 that follows
    is true (nothing will run). When that write fails too (Redis full, or gone), the job stays stored as queued,
    with its entry in the `unplanned` set that the API's start-up and every worker's sweep send again: it will
    run, so the answer is the 202 with its id (False here), not a 503 that would have the client submit twice."""
    try:
        mark_failed()
    except redis.RedisError as error:
        logger.warning(
            "job %s was stored but could not be queued (%s) nor marked failed (%s): answered as accepted; the "
            "unplanned-job sweep will send it", status.id, exc, error,
        )  # fmt: skip
        return False
    return True


def _not_queued(job_id: str, exc: Exception) -> BackendUnavailable:
    return BackendUnavailable(
        f"the job queue is unavailable: job {job_id} was stored but not queued, and is marked failed; submit again "
        f"later ({exc})"
    )


def cancel_job(store: JobStore, queue: JobQueue, job_id: str, principal: Principal | None) -> JobStatus:
    """Cancel a queued or running job: 404 for an unknown (or another key's) job, 409 once it has finished."""
    visible_status(store, job_id, principal)  # another key's job: 404, and it stays as it is
    status = store.request_cancel(job_id)
    if status is None:
        raise job_not_found(job_id)
    if status.status in ("succeeded", "failed"):
        raise _conflict(f"job {job_id} already {status.status}; there is nothing to cancel")
    # Queued chunks are dropped now; a running chunk sees the job cancelled at its next prompt. The cancel is
    # already stored: if the broker cannot take the revoke, chunks that start later skip themselves anyway.
    try:
        queue.revoke(ChunkBook.for_store(store).pending_task_ids(job_id))
    except Exception:
        logger.warning("job %s: could not revoke its queued chunks", job_id, exc_info=True)
    return status
