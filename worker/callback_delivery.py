"""`hydra.deliver_callback(job_id, attempt)`: one webhook attempt, and the next one scheduled on failure.

Runs on the webhook queue (`<HYDRA_QUEUE>-webhooks`, service/core/queue.py `webhook_queue`), which only a worker of
its own consumes, never the processes that plan jobs or run chunks, so a slow receiver delays no job:

    celery -A worker.celery_app worker -Q hydra-webhooks -P threads -c 8 -n webhooks@%h

(`hydra-ablate serve` starts one; a worker whose only queue is the webhook queue serves no model and runs no
recovery sweep: worker/celery_app.py). Each attempt ends within HYDRA_CALLBACK_TIMEOUT_S in all and reads a few KiB
of the answer at most (service/core/webhook_http.py). The retry is a new message with a countdown, so a failing
receiver never holds a worker; attempts stop after HYDRA_CALLBACK_MAX_ATTEMPTS.
"""

from __future__ import annotations

import logging

from service.core.callbacks import backoff_s, deliver
from service.core.labels import parse_allow_list
from service.core.queue import TASK_DELIVER_CALLBACK, webhook_queue
from worker.celery_app import app, service_settings
from worker.tasks import job_store

log = logging.getLogger(__name__)


@app.task(name=TASK_DELIVER_CALLBACK)
def deliver_callback(job_id: str, attempt: int = 1) -> str:
    settings = service_settings()
    record = deliver(
        job_store(), job_id, attempt, parse_allow_list(settings.callback_allow), settings.callback_timeout_s
    )
    if record is None:
        return "nothing to deliver"
    if record.delivered:
        return "delivered"
    if attempt >= settings.callback_max_attempts:
        log.warning("job %s: webhook given up after %d attempts (%s)", job_id, attempt, record.error)
        return "given up"
    delay = backoff_s(attempt, settings.callback_backoff_s)
    deliver_callback.apply_async(
        args=[job_id, attempt + 1], countdown=delay, queue=webhook_queue(settings.queue_name)
    )
    return f"retrying in {delay:g} s"
