"""The Celery worker application: the broker settings shared with the API, the models this worker serves.

Start it with `celery -A worker.celery_app worker -Q hydra -c 1` (one process per GPU), or `hydra-ablate serve`.
On start the worker also consumes one queue per model it serves, `hydra.<model id>` (see `served_queues`), where
the chunks of that model's jobs wait; `-Q hydra` (the main queue, where jobs are planned) is all a worker needs.
"""

from __future__ import annotations

import logging
import threading
from functools import cache

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
)

from service.core.json_logging import configure_json_logging, job_id_var, json_logs_requested
from service.core.queue import celery_config, model_queue, webhook_queue
from service.core.redaction import install_log_redaction
from service.core.redis_refusals import register_refusal_errors
from service.core.settings import Settings
from service.core.store import JobStore
from worker.model_sources import configured_sources
from worker.worker_settings import WorkerConfigError, WorkerSettings

log = logging.getLogger(__name__)
install_log_redaction()  # REDIS_URL passwords never reach a log line (Celery's own banner masks them too)
HEARTBEAT_S = 20  # how often a worker renews the models it serves
SERVED_TTL_S = 90  # a model no live worker renewed for this long is no longer offered


@cache
def service_settings() -> Settings:
    """The settings shared with the API (Redis, key prefix, queue), read once per process."""
    return Settings.from_env()


@cache
def worker_settings() -> WorkerSettings:
    """This worker's own settings, read and checked once per process: a bad value stops the worker at start."""
    try:
        return WorkerSettings.from_env()
    except WorkerConfigError as error:
        raise SystemExit(f"hydra-ablate worker: bad configuration: {error}") from None


worker_settings()  # checked here, when the worker starts, not when its first task runs
app = Celery("hydra-ablate")
app.conf.update(celery_config(service_settings()))
# The task modules take this app and the settings from here; nothing here imports them (no import cycle).
app.conf.update(
    include=["worker.tasks", "worker.callback_delivery", "worker.maintenance"],
    task_default_queue=service_settings().queue_name,
    # Redis refusing writes (full, or its append-only file failing) reconnects instead of stopping the worker.
    broker_transport="worker.broker_transport:Transport",
)
register_refusal_errors()  # in every Redis client of this process: MISCONF replies raise WritesRefused


@task_prerun.connect
def _job_context(task_id: str, task: object, args: tuple[object, ...] | None = None, **_: object) -> None:
    """Every log line of a task names its job (HYDRA_LOG_FORMAT=json shows it as job_id)."""
    job_id_var.set(str(args[0]) if args else None)


@task_postrun.connect
def _job_context_end(**_: object) -> None:
    job_id_var.set(None)


def _json_logging(**_: object) -> None:
    configure_json_logging()


if json_logs_requested():
    setup_logging.connect(_json_logging, weak=False)  # Celery then leaves logging to us


def served_device() -> str:
    """HYDRA_DEVICE (default cpu): where this worker runs its models (checked once in WorkerSettings)."""
    return worker_settings().device


def served_queues(queue_name: str | None = None) -> list[str]:
    """The chunk queues of the models in HYDRA_MODELS (not the main queue)."""
    name = queue_name or service_settings().queue_name
    try:
        sources = configured_sources()
    except Exception as error:  # noqa: BLE001 - a bad model entry is reported by advertise_models as well
        log.error("cannot read the served models (HYDRA_MODELS): %s", error)
        return []
    return [model_queue(name, model_id) for model_id in sources]


_role = {"webhooks_only": False}


def webhooks_only() -> bool:
    """True in a worker started with `-Q <queue>-webhooks` alone: it delivers webhooks and does nothing else (no
    model queues, no models advertised, no recovery sweeps), so receivers never share a process with chunks."""
    return _role["webhooks_only"]


@celeryd_after_setup.connect
def consume_model_queues(sender: str, instance: object, **_: object) -> None:
    """After `-Q` was applied: add the queues of the models this worker serves (`celery worker` only)."""
    queues = instance.app.amqp.queues  # type: ignore[attr-defined]
    if set(queues.consume_from or ()) == {webhook_queue(service_settings().queue_name)}:
        _role["webhooks_only"] = True
        log.info("%s delivers webhooks only", sender)
        return
    for name in served_queues():
        queues.select_add(name)
        log.info("%s consumes chunk queue %s", sender, name)


@worker_ready.connect
def advertise_models(**_: object) -> None:
    """Tell the API which models this worker can serve, with their shapes (from configs, no weights)."""
    if webhooks_only():
        return
    from worker.engine.architecture import UnsupportedArchitecture  # transformers is heavy: worker only, here only
    from worker.model_cache import model_info, parse_dtype, tokenizer_json

    store = JobStore.from_settings(service_settings())
    served: list[str] = []
    try:
        for source in configured_sources().values():
            try:
                info = model_info(source, parse_dtype(worker_settings().dtype), served_device())
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
        _heartbeats_stopped.clear()
        threading.Thread(target=_heartbeat, args=(served,), name="hydra-heartbeat", daemon=True).start()


# Set when the worker shuts down: an in-process worker (the tests' `start_worker`) outlives its Redis, and a
# heartbeat left beating would log a failure every few seconds until the process exits.
_heartbeats_stopped = threading.Event()


@worker_shutdown.connect
def stop_heartbeats(**_: object) -> None:
    """End the heartbeat thread (its models then lapse SERVED_TTL_S later, as after a crash)."""
    _heartbeats_stopped.set()


def _heartbeat(model_ids: list[str]) -> None:
    """Keep this worker's models advertised while the worker lives (they lapse SERVED_TTL_S after it dies)."""
    store = JobStore.from_settings(service_settings())
    try:
        while not _heartbeats_stopped.wait(HEARTBEAT_S):
            try:
                store.keep_serving(model_ids, SERVED_TTL_S)
            except Exception as error:  # noqa: BLE001 - Redis may be briefly away; try again at the next beat
                log.warning("heartbeat for %s failed: %s", ", ".join(model_ids), error)
    finally:
        store.close()
