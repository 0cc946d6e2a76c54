"""The worker's recovery thread: every HYDRA_SWEEP_S, send again what no live process holds (service/recovery.py).

It runs in every worker's main process (started when the worker is ready), so as long as one worker lives, a job
stored but never sent reaches the queue and a chunk whose worker vanished runs again.
"""

from __future__ import annotations

import logging
import threading

from service.chunks import Chunk, ChunkBook
from service.leases import Leases
from service.queue import TASK_RUN_JOB, model_queue, waiting_task_ids
from service.recovery import SweepReport, sweep
from service.settings import Settings
from service.store import JobStore
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
# A chunk sent again by a sweep that has not started within this many leases is sent once more (its message may
# have been lost with a Redis crash); a long queue only gets a duplicate that far apart, which runs as a no-op.
RECHECK_LEASES = 10

_started = threading.Lock()
_threads: list[threading.Thread] = []


def sweep_once(settings: Settings, worker_settings: WorkerSettings, store: JobStore) -> SweepReport:
    """One sweep with this worker's Celery app."""
    from worker.celery_app import app
    from worker.tasks import send_chunk

    def send_job(job_id: str) -> None:
        app.send_task(TASK_RUN_JOB, args=[job_id], queue=settings.queue_name)

    def send(job_id: str, chunk: Chunk, model_id: str) -> str:
        return send_chunk(job_id, chunk, model_id)

    def waiting(model_id: str, task_id: str) -> bool:
        return task_id in waiting_task_ids(store.client, model_queue(settings.queue_name, model_id))

    return sweep(
        store, ChunkBook.for_store(store), Leases.for_store(store), send_job, send, recheck_s(worker_settings), waiting
    )


def recheck_s(worker_settings: WorkerSettings) -> float:
    """How long a chunk sent (or sent again) may wait unstarted before a sweep looks for its message."""
    return max(60.0, RECHECK_LEASES * worker_settings.lease_s)


def _sweep_forever(settings: Settings, worker_settings: WorkerSettings) -> None:
    store = JobStore.from_settings(settings, socket_timeout=10.0)
    stop = threading.Event()
    while True:
        try:
            sweep_once(settings, worker_settings, store)
        except Exception as error:  # noqa: BLE001 - Redis may be away; the next sweep tries again
            log.warning("recovery sweep failed: %s", error)
        stop.wait(worker_settings.sweep_s)


def start_sweeping(settings: Settings, worker_settings: WorkerSettings) -> None:
    """Start the sweep thread (once per process)."""
    with _started:
        if _threads:
            return
        thread = threading.Thread(
            target=_sweep_forever, args=(settings, worker_settings), name="hydra-recovery", daemon=True
        )
        thread.start()
        _threads.append(thread)
