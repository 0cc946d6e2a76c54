"""The Celery tasks: plan a job into chunks, run one chunk, merge when the last chunk is in.

`hydra.run_job(job_id)` (main queue, sent by the API, cheap): splits the job's prompts into chunks of
`HYDRA_CHUNK_PROMPTS` (read when the job is planned) and sends one `hydra.run_chunk` per chunk to the model's
queue (`service.queue.model_queue`). A redelivered `run_job` does not plan twice (`planned:{id}`, SET NX); if the
planner died half-way, the redelivery sends only the chunks not yet sent.

`hydra.run_chunk(job_id, index, start, stop)` (model queue): moves the job to running when the first chunk starts,
runs the engine on prompts `start:stop` (every prompt of the job stays a resample source), reports progress summed
over chunks, stores its partial result, and the chunk that completes the set merges them into the JobResult.
Every failure becomes the job's error, never a crashed worker; a failed or cancelled job stops its running chunks
at their next prompt and revokes (or, when they start, skips) the queued ones. Each start of a chunk is counted:
the delivery after `HYDRA_MAX_DELIVERIES` fails the job (its worker keeps dying). Delivery and time-limit settings
are described in service/queue.py. Redis keys are described in service/chunks.py.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Task

from service.chunks import ChunkBook, chunk_prompts, max_deliveries, plan_chunks
from service.queue import TASK_RUN_CHUNK, TASK_RUN_JOB, model_queue, time_limits
from service.resolve import ablation_count
from service.schemas import JobSpec, encode
from service.store import ACTIVE_STATES, JobStore
from worker.celery_app import app, settings
from worker.model_cache import ModelCache, parse_dtype
from worker.model_sources import configured_sources

log = logging.getLogger(__name__)


@cache
def job_store() -> JobStore:
    return JobStore.from_settings(settings)


@cache
def chunk_book() -> ChunkBook:
    return ChunkBook.for_store(job_store())


@cache
def model_cache() -> ModelCache:
    """One cache per worker process: models load on first use and stay (LRU by count and parameter bytes)."""
    capacity = int(os.environ.get("HYDRA_MODEL_CACHE_SIZE", "2"))
    raw_bytes = os.environ.get("HYDRA_MODEL_CACHE_BYTES", "").strip()
    max_bytes = int(float(raw_bytes)) if raw_bytes else None
    return ModelCache(
        configured_sources(),
        capacity=capacity,
        device=os.environ.get("HYDRA_DEVICE", "cpu"),
        max_bytes=max_bytes,
        dtype=parse_dtype(os.environ.get("HYDRA_DTYPE", "float32")),
    )


def _job_state(store: JobStore, job_id: str) -> str | None:
    raw = store.client.hget(store.job_key(job_id), "status")
    return None if raw is None else raw.decode()


def _stop_other_chunks(job_id: str, own_task_id: str | None = None) -> None:
    """Revoke the queued chunks of a job that ended early (once per job); any that start anyway skip themselves."""
    book = chunk_book()
    if not book.claim_revoke(job_id):
        return
    pending = [task_id for task_id in book.pending_task_ids(job_id) if task_id != own_task_id]
    if pending:
        try:
            app.control.revoke(pending)
        except Exception as error:  # noqa: BLE001 - revoking is an optimisation: skipped chunks stop themselves
            log.warning("job %s: could not revoke %d queued chunks: %s", job_id, len(pending), error)


def _fail(job_id: str, error: str, own_task_id: str | None = None) -> str:
    job_store().mark_failed(job_id, error)
    _stop_other_chunks(job_id, own_task_id)
    return "failed"


class HydraTask(Task):
    """Tasks whose every escaped failure fails the job, so no job stays `running` after its task ended.

    The hard time limit lands here too (the worker's main process calls `on_failure` then).
    """

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if not args:
            return
        job_id = args[0]
        if self.name == TASK_RUN_CHUNK and isinstance(exc, TimeLimitExceeded):
            _, hard = time_limits()
            reason = (
                f"chunk {args[1]} of job {job_id} ran past the hard time limit of {hard:.0f} s and was killed; "
                "raise HYDRA_CHUNK_TIME_LIMIT_S or lower HYDRA_CHUNK_PROMPTS"
            )
        else:
            reason = f"internal error in {self.name}: {type(exc).__name__}: {exc}"
        try:
            _fail(job_id, reason, task_id)
        except Exception:  # noqa: BLE001 - Redis itself may be what failed; the log keeps the reason
            log.exception("job %s: could not record its failure (%s)", job_id, reason)


@app.task(name=TASK_RUN_JOB, base=HydraTask)
def run_job(job_id: str) -> str:
    """Plan a queued job into chunks and queue them on the model's queue; cheap, runs on any worker."""
    store, book = job_store(), chunk_book()
    spec = store.spec(job_id)
    if spec is None:
        log.warning("job %s is unknown or expired; dropping it", job_id)
        return "missing"
    if _job_state(store, job_id) not in ACTIVE_STATES:
        return "skipped"
    claimed = book.claim_planning(job_id)
    chunks = book.plan(job_id)
    if chunks is None:
        if not claimed:
            log.warning("job %s was claimed for planning but has no plan (its planner died?); planning it", job_id)
        size = chunk_prompts()
        chunks = plan_chunks(len(spec.prompts), size)
        book.record_plan(job_id, chunks, size)
    sent = book.task_ids(job_id)
    if not claimed and len(sent) >= len(chunks):
        return "already planned"
    queue = model_queue(settings.queue_name, spec.model)
    for chunk in chunks:
        if chunk.index in sent:
            continue
        task = run_chunk.apply_async(args=[job_id, chunk.index, chunk.start, chunk.stop], queue=queue)
        book.record_task(job_id, chunk.index, task.id)
    log.info("job %s: %d prompts in %d chunks on queue %s", job_id, len(spec.prompts), len(chunks), queue)
    return f"planned {len(chunks)} chunks"


def _merge(job_id: str, spec: JobSpec, n_chunks: int) -> str:
    """Build the JobResult from every chunk's partial result and finish the job (idempotent)."""
    from worker.chunking import NoPromptKept, merge_chunks

    store, book = job_store(), chunk_book()
    partial = book.results(job_id, range(n_chunks))
    missing = [i for i, chunk in enumerate(partial) if chunk is None]
    if missing:
        return _fail(job_id, f"internal error: the partial results of chunks {missing} of job {job_id} are missing")
    try:
        merged = merge_chunks(job_id, spec, [chunk for chunk in partial if chunk is not None])
    except NoPromptKept as error:
        return _fail(job_id, str(error))
    except Exception as error:
        log.exception("job %s: merging its chunks failed", job_id)
        return _fail(job_id, f"internal error: merging the chunks failed: {type(error).__name__}: {error}")
    if store.mark_succeeded(job_id, encode(merged)):
        book.drop_results(job_id, range(n_chunks))
        return "succeeded"
    return "merged after the job ended"


@app.task(name=TASK_RUN_CHUNK, base=HydraTask, bind=True)
def run_chunk(self: Task, job_id: str, index: int, start: int, stop: int) -> str:
    """Run prompts `start:stop` of a job; the chunk that completes the job merges it."""
    from worker.chunking import execute_chunk
    from worker.engine.sweep import SweepCancelled
    from worker.job_runner import JobInputError

    store, book = job_store(), chunk_book()
    own_id = self.request.id
    spec = store.spec(job_id)
    if spec is None:
        log.warning("job %s is unknown or expired; dropping its chunk %d", job_id, index)
        return "missing"
    state = _job_state(store, job_id)
    n_chunks = book.n_chunks(job_id)
    if n_chunks is None:
        if state in ACTIVE_STATES:
            return _fail(job_id, f"internal error: job {job_id} has no chunk plan (expired?)", own_id)
        return "missing"
    if book.is_done(job_id, index):
        # A redelivery of a finished chunk: if the worker that was to merge died, merge now.
        if state == "running" and len(book.done_indices(job_id)) == n_chunks:
            return _merge(job_id, spec, n_chunks)
        return "duplicate"
    if state not in ACTIVE_STATES:
        _stop_other_chunks(job_id, own_id)
        return "skipped"
    deliveries = book.count_delivery(job_id, index)
    limit = max_deliveries()
    if deliveries > limit:
        return _fail(
            job_id,
            f"chunk {index} (prompts {start}-{stop - 1}) of job {job_id} was delivered {deliveries} times; "
            f"its worker keeps dying (out of memory?). At most {limit} deliveries are allowed "
            "(HYDRA_MAX_DELIVERIES); fewer prompts per chunk (HYDRA_CHUNK_PROMPTS) need less memory",
            own_id,
        )
    if deliveries > 1:
        log.warning("job %s: chunk %d delivered again (%d of at most %d)", job_id, index, deliveries, limit)
    if state == "queued" and not store.mark_running(job_id) and _job_state(store, job_id) != "running":
        return "skipped"  # cancelled between the two reads

    status = store.status(job_id)
    total = status.progress.total if status is not None and status.progress.total else ablation_count(spec)

    def on_progress(done: int, _chunk_total: int) -> None:
        store.set_progress(job_id, book.record_progress(job_id, index, done), total)

    def should_stop() -> bool:
        return _job_state(store, job_id) != "running"

    try:
        loaded = model_cache().get(spec.model)
        result = execute_chunk(
            job_id, spec, loaded, index, start, stop, on_progress=on_progress, should_stop=should_stop
        )
    except SweepCancelled:
        log.info("job %s stopped (%s) while chunk %d ran", job_id, _job_state(store, job_id), index)
        _stop_other_chunks(job_id, own_id)
        return "stopped"
    except SoftTimeLimitExceeded:
        soft, _ = time_limits()
        return _fail(
            job_id,
            f"chunk {index} (prompts {start}-{stop - 1}) of job {job_id} ran past the time limit of {soft:.0f} s; "
            "raise HYDRA_CHUNK_TIME_LIMIT_S or lower HYDRA_CHUNK_PROMPTS",
            own_id,
        )
    except (JobInputError, KeyError, ValueError) as error:
        return _fail(job_id, str(error), own_id)
    except Exception as error:
        log.exception("job %s: chunk %d failed", job_id, index)
        return _fail(job_id, f"internal error: {type(error).__name__}: {error}", own_id)
    done = book.record_result(job_id, index, result)
    if done < 0:
        return "duplicate"
    if done == n_chunks:
        return _merge(job_id, spec, n_chunks)
    return "recorded"
