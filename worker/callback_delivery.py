"""`hydra.deliver_callback(job_id, attempt)`: one webhook attempt, and the next one scheduled on failure.

Runs on the main queue (cheap, any worker; no torch). The retry is a new message with a countdown, so a failing
receiver never holds a worker; attempts stop after HYDRA_CALLBACK_MAX_ATTEMPTS.
"""

from __future__ import annotations

import logging

from service.core.callbacks import backoff_s, deliver
from service.core.labels import parse_allow_list
from service.core.queue import TASK_DELIVER_CALLBACK
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
    deliver_callback.apply_async(args=[job_id, attempt + 1], countdown=delay, queue=settings.queue_name)
    return f"retrying in {delay:g} s"
