"""The worker's recovery thread: every HYDRA_SWEEP_S, send again what no live process holds (service/core/recovery.py).

It runs in every worker's main process (started when the worker is ready; the app includes this module), so as
long as one worker lives, a job stored but never sent reaches the queue and a chunk whose worker vanished runs
again.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready

from service.core.chunk_book import Chunk, ChunkBook
from service.core.leases import Leases
from service.core.queue import TASK_RUN_JOB, model_queue, waiting_task_ids
from service.core.recovery import SweepReport, sweep
from service.core.settings import Settings
from service.core.store import JobStore
from worker.celery_app import app, service_settings, worker_settings
from worker.tasks import send_chunk
from worker.worker_settings import WorkerSettings

log = logging.getLogger(__name__)

_started = threading.Lock()
_threads: list[threading.Thread] = []


def sweep_once(settings: Settings, worker_config: WorkerSettings, store: JobStore) -> SweepReport:
    """One sweep with this worker's Celery app."""

    def send_job(job_id: str) -> None:
        app.send_task(TASK_RUN_JOB, args=[job_id], queue=settings.queue_name)

    def send(job_id: str, chunk: Chunk, model_id: str) -> str:
        return send_chunk(job_id, chunk, model_id)

    def waiting(model_id: str, task_id: str) -> bool:
        return task_id in waiting_task_ids(store.client, model_queue(settings.queue_name, model_id))

    return sweep(
        store, ChunkBook.for_store(store), Leases.for_store(store), send_job, send, worker_config.recheck_s, waiting
    )


def _sweep_forever(settings: Settings, worker_config: WorkerSettings) -> None:
    store = JobStore.from_settings(settings, socket_timeout=10.0)
    stop = threading.Event()
    while True:
        try:
            sweep_once(settings, worker_config, store)
        except Exception as error:  # noqa: BLE001 - Redis may be away; the next sweep tries again
            log.warning("recovery sweep failed: %s", error)
        stop.wait(worker_config.sweep_s)


def start_sweeping(settings: Settings, worker_config: WorkerSettings) -> None:
    """Start the sweep thread (once per process)."""
    with _started:
        if _threads:
            return
        thread = threading.Thread(
            target=_sweep_forever, args=(settings, worker_config), name="hydra-recovery", daemon=True
        )
        thread.start()
        _threads.append(thread)


@worker_ready.connect
def start_recovery_sweeps(**_: object) -> None:
    """Every worker sweeps for unplanned jobs and lapsed chunk leases (service/core/recovery.py), but the ones that
    deliver webhooks only."""
    from worker.celery_app import webhooks_only

    if webhooks_only():
        return
    start_sweeping(service_settings(), worker_settings())
