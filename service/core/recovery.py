"""Recovery sweeps: every stored job reaches the queue; every chunk whose worker vanished runs again. No torch.

- Unplanned jobs: the API stores a job, then sends `hydra.run_job`; the job stays in the store's `unplanned` set
  until a worker has planned it (sent all its chunks). One that is still there `RESEND_AFTER_S` after it was
  stored (the API died between the two steps, the message was lost with a Redis crash, a planner died) is sent
  again, then again after twice as long, and so on up to `RESEND_MAX_S`.
- Expired chunk leases (service/core/leases.py): the chunk's worker stopped renewing (it died, or lost Redis for
  longer than its lease); the chunk is sent again and the job's `note` says so. The worker that runs it counts
  the delivery, so a chunk whose workers keep vanishing fails its job after HYDRA_MAX_DELIVERIES.
- Chunks sent but never started: the planner marks each chunk "queued"; one still not started after a long while
  (10 leases, at least a minute) is sent again if its message is no longer waiting in the broker's queue (lost
  with a Redis crash, or taken by a worker that died before it started the chunk), else looked at again later.

Every worker runs `sweep` periodically (worker/maintenance.py, every HYDRA_SWEEP_S) and the API resends every
unplanned job once at start-up. Sweeps are idempotent: two at once at worst send a message twice, and a job is
planned once (`planned:{id}`) and a chunk runs once (its lease, `chunks_done`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from hydra_ablate_client.vocabulary import ACTIVE_STATES
from service.core.chunk_book import Chunk, ChunkBook
from service.core.leases import ChunkRef, Leases
from service.core.store import RESEND_AFTER_S, RESEND_MAX_S, JobStore, utc_now

log = logging.getLogger(__name__)

SendJob = Callable[[str], None]
SendChunk = Callable[[str, Chunk, str], str]  # (job id, chunk, model id) -> the new task's id
Waiting = Callable[[str, str], bool]  # (model id, task id) -> is the message still waiting in the broker's queue


@dataclass
class SweepReport:
    resent_jobs: list[str] = field(default_factory=list)
    requeued_chunks: list[ChunkRef] = field(default_factory=list)


def _age_s(created_at: str, now: float) -> float:
    try:
        return now - datetime.fromisoformat(created_at).timestamp()
    except ValueError:
        return 0.0


def resend_unplanned(store: JobStore, send_job: SendJob, *, everything: bool = False) -> list[str]:
    """Send again the jobs stored but not planned (only those due, unless `everything`); returns their ids."""
    now = time.time()
    sent: list[str] = []
    for job_id in store.unplanned(None if everything else now):
        status = store.status(job_id)
        if status is None or status.status not in ACTIVE_STATES:
            store.mark_planned(job_id)  # ended or expired: nothing to send
            continue
        send_job(job_id)
        # Back off: the next try waits about as long as the job has existed (doubling), within the bounds.
        store.defer_unplanned(job_id, now + min(RESEND_MAX_S, max(RESEND_AFTER_S, _age_s(status.created_at, now))))
        sent.append(job_id)
    if sent:
        log.warning("sent %d stored but unplanned jobs again: %s", len(sent), ", ".join(sent))
    return sent


def requeue_expired_chunks(
    store: JobStore,
    book: ChunkBook,
    leases: Leases,
    send_chunk: SendChunk,
    recheck_s: float,
    waiting: Waiting | None = None,
) -> list[ChunkRef]:
    """Send again every chunk whose lease expired; a requeued chunk not started within `recheck_s` is looked at
    again. A chunk that never started is sent again only when its message is no longer waiting in the broker
    (`waiting(model id, task id)`; lost with a Redis crash, or taken by a worker that died before starting it)."""
    requeued: list[ChunkRef] = []
    for ref, holder in leases.reap(recheck_s):
        status = store.status(ref.job_id)
        plan = book.plan(ref.job_id) if status is not None else None
        if status is None or status.status not in ACTIVE_STATES or plan is None or ref.index >= len(plan):
            leases.release(ref.job_id, ref.index)  # the job ended (or expired): nothing to run
            continue
        chunk = plan[ref.index]
        if Leases.never_started(holder) and waiting is not None:
            task_id = book.task_ids(ref.job_id).get(ref.index)
            if task_id is not None and waiting(status.model, task_id):
                leases.mark_queued(ref.job_id, ref.index, task_id, recheck_s)  # a long queue: look again later
                continue
            why = "its message was not in the queue any more (lost, or taken by a worker that died)"
        else:
            why = "the worker running it stopped renewing its lease (it stopped, or lost Redis)"
        task_id = send_chunk(ref.job_id, chunk, status.model)
        book.record_task(ref.job_id, ref.index, task_id)
        note = f"{utc_now()}: chunk {chunk.index} (prompts {chunk.start}-{chunk.stop - 1}) was sent again: {why}"
        store.set_note(ref.job_id, note)
        log.warning("job %s: %s", ref.job_id, note)
        requeued.append(ref)
    return requeued


def sweep(
    store: JobStore,
    book: ChunkBook,
    leases: Leases,
    send_job: SendJob,
    send_chunk: SendChunk,
    recheck_s: float,
    waiting: Waiting | None = None,
) -> SweepReport:
    """One pass of both recoveries."""
    return SweepReport(
        resent_jobs=resend_unplanned(store, send_job),
        requeued_chunks=requeue_expired_chunks(store, book, leases, send_chunk, recheck_s, waiting),
    )
