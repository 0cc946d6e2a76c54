"""The Celery side of the API: publish job ids, ping workers. No task code here, so no torch is ever imported.

The worker builds its Celery app from the same `celery_config`, so both ends agree on broker, queue and the
delivery guarantees long GPU jobs need.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.settings import Settings

TASK_RUN_JOB = "hydra.run_job"
DAY_S = 24 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker settings shared by the API and the worker."""
    return {
        "broker_url": settings.redis_url,
        # A task is acknowledged after it ran, so a worker killed mid-job hands it back to the queue...
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # ...and a worker holds one job at a time (jobs are long and share one GPU).
        "worker_prefetch_multiplier": 1,
        # The Redis broker redelivers unacknowledged tasks after the visibility timeout: keep it above any job.
        "broker_transport_options": {"visibility_timeout": DAY_S},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue_name,
        "task_routes": {TASK_RUN_JOB: {"queue": settings.queue_name}},
        # Job state and results live in the JobStore; Celery keeps none.
        "task_ignore_result": True,
        "result_backend": None,
        "enable_utc": True,
    }


def make_celery_client(settings: Settings) -> Celery:
    """A Celery app configured for hydra's broker; the API only sends, the worker also consumes."""
    app = Celery("hydra", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class JobQueue:
    """What the API needs from Celery: hand a job to the workers, and know whether any are listening."""

    def __init__(self, settings: Settings, celery_app: Celery | None = None) -> None:
        self.settings = settings
        self.celery_app = celery_app or make_celery_client(settings)

    def enqueue(self, job_id: str) -> None:
        """Publish the job id on the hydra queue; the worker reads the spec from the JobStore."""
        self.celery_app.send_task(TASK_RUN_JOB, args=[job_id], queue=self.settings.queue_name)

    def worker_count(self, timeout: float = 1.0) -> int:
        """Workers that answered a broadcast ping within `timeout` seconds."""
        return len(self.celery_app.control.ping(timeout=timeout) or [])

    def close(self) -> None:
        self.celery_app.close()
