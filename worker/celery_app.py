"""The Celery worker application: the broker settings shared with the API, the models this worker serves.

Start it with `celery -A worker.celery_app worker -Q hydra -c 1` (one process per GPU), or `hydra-ablate serve`.
On start the worker also consumes one queue per model it serves, `hydra.<model id>` (see `served_queues`), where
the chunks of that model's jobs wait; `-Q hydra` (the main queue, where jobs are planned) is all a worker needs.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery import Celery
from celery.signals import celeryd_after_setup, worker_ready

from service.queue import celery_config, model_queue
from service.settings import Settings
from service.store import JobStore
from worker.model_sources import configured_sources
from worker.settings import WorkerConfigError, WorkerSettings

log = logging.getLogger(__name__)
HEARTBEAT_S = 20  # how often a worker renews the models it serves
SERVED_TTL_S = 90  # a model no live worker renewed for this long is no longer offered

settings = Settings.from_env()
try:
    worker_settings = WorkerSettings.from_env()  # checked once, here: a bad value stops the worker at start
except WorkerConfigError as error:
    raise SystemExit(f"hydra-ablate worker: bad configuration: {error}") from None
app = Celery("hydra-ablate")
app.conf.update(celery_config(settings))
app.conf.update(include=["worker.tasks"], task_default_queue=settings.queue_name)


def served_device() -> str:
    """HYDRA_DEVICE (default cpu): where this worker runs its models (checked once in WorkerSettings)."""
    return worker_settings.device


def served_queues(queue_name: str | None = None) -> list[str]:
    """The chunk queues of the models in HYDRA_MODELS (not the main queue)."""
    name = queue_name or settings.queue_name
    try:
        sources = configured_sources()
    except Exception as error:  # noqa: BLE001 - a bad model entry is reported by advertise_models as well
        log.error("cannot read the served models (HYDRA_MODELS): %s", error)
        return []
    return [model_queue(name, model_id) for model_id in sources]


@celeryd_after_setup.connect
def consume_model_queues(sender: str, instance: object, **_: object) -> None:
    """After `-Q` was applied: add the queues of the models this worker serves (`celery worker` only)."""
    queues = instance.app.amqp.queues  # type: ignore[attr-defined]
    for name in served_queues():
        queues.select_add(name)
        log.info("%s consumes chunk queue %s", sender, name)


@worker_ready.connect
def advertise_models(**_: object) -> None:
    """Tell the API which models this worker can serve, with their shapes (from configs, no weights)."""
    from worker.engine.architecture import UnsupportedArchitecture  # transformers is heavy: worker only, here only
    from worker.model_cache import model_info, parse_dtype, tokenizer_json

    store = JobStore.from_settings(settings)
    served: list[str] = []
    try:
        for source in configured_sources().values():
            try:
                info = model_info(source, parse_dtype(worker_settings.dtype), served_device())
            except UnsupportedArchitecture as error:
                store.refuse_model(source.id, str(error))
                log.error("cannot ablate model %s: %s", source.id, error)
                continue
            except Exception as error:  # noqa: BLE001 - one bad model entry must not stop the worker
                log.error("cannot serve model %s: %s", source.id, error)
                continue
            published = tokenizer_json(source)
            if published is not None:
                store.publish_tokenizer(source.id, published)
            store.advertise_model(info, ttl_s=SERVED_TTL_S)
            served.append(source.id)
            log.info("serving model %s (%s)", source.id, source.description)
    finally:
        store.close()
    if served:
        threading.Thread(target=_heartbeat, args=(served,), name="hydra-heartbeat", daemon=True).start()


@worker_ready.connect
def start_recovery_sweeps(**_: object) -> None:
    """Every worker sweeps for unplanned jobs and lapsed chunk leases (service/recovery.py)."""
    from worker.maintenance import start_sweeping

    start_sweeping(settings, worker_settings)


def _heartbeat(model_ids: list[str]) -> None:
    """Keep this worker's models advertised while the worker lives (they lapse SERVED_TTL_S after it dies)."""
    store = JobStore.from_settings(settings)
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            store.keep_serving(model_ids, SERVED_TTL_S)
        except Exception as error:  # noqa: BLE001 - Redis may be briefly away; try again at the next beat
            log.warning("heartbeat for %s failed: %s", ", ".join(model_ids), error)
