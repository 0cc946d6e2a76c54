"""The Celery worker application: the broker settings shared with the API, the models this worker serves.

Start it with `celery -A worker.celery_app worker -Q hydra -c 1` (one process per GPU), or `hydra-ablate serve`.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready

from service.queue import celery_config
from service.settings import Settings
from service.store import JobStore
from worker.model_sources import configured_sources

log = logging.getLogger(__name__)

settings = Settings.from_env()
app = Celery("hydra-ablate")
app.conf.update(celery_config(settings))
app.conf.update(include=["worker.tasks"], task_default_queue=settings.queue_name)


@worker_ready.connect
def advertise_models(**_: object) -> None:
    """Tell the API which models this worker can serve, with their shapes (from configs, no weights)."""
    from worker.model_cache import model_info  # transformers is heavy: only in the worker, only here

    store = JobStore.from_settings(settings)
    try:
        for source in configured_sources().values():
            try:
                store.advertise_model(model_info(source))
                log.info("serving model %s (%s)", source.id, source.description)
            except Exception as error:  # noqa: BLE001 - one bad model entry must not stop the worker
                log.error("cannot serve model %s: %s", source.id, error)
    finally:
        store.close()
