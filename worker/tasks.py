"""The Celery task that runs one job: status, progress and results go to Redis through the JobStore."""

from __future__ import annotations

import logging
import os
from functools import cache

from service.queue import TASK_RUN_JOB
from service.schemas import encode
from service.store import JobStore
from worker.celery_app import app, settings
from worker.model_cache import ModelCache
from worker.model_sources import configured_sources

log = logging.getLogger(__name__)


@cache
def job_store() -> JobStore:
    return JobStore.from_settings(settings)


@cache
def model_cache() -> ModelCache:
    """One cache per worker process: models load on first use and stay."""
    capacity = int(os.environ.get("HYDRA_MODEL_CACHE_SIZE", "2"))
    return ModelCache(configured_sources(), capacity=capacity, device=os.environ.get("HYDRA_DEVICE", "cpu"))


@app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> str:
    """Run a queued job to its end; every failure becomes the job's error, never a crashed worker."""
    from worker.engine.sweep import SweepCancelled
    from worker.job_runner import JobInputError, execute

    store = job_store()
    spec = store.spec(job_id)
    if spec is None:
        log.warning("job %s is unknown or expired; dropping it", job_id)
        return "missing"
    if not store.mark_running(job_id):
        return "skipped"
    try:
        loaded = model_cache().get(spec.model)
        result = execute(
            job_id,
            spec,
            loaded,
            on_progress=lambda done, total: store.set_progress(job_id, done, total),
            should_stop=lambda: store.is_cancelled(job_id),
        )
    except SweepCancelled:
        log.info("job %s cancelled while running", job_id)
        return "cancelled"
    except (JobInputError, KeyError, ValueError) as error:
        store.mark_failed(job_id, str(error))
        return "failed"
    except Exception as error:
        log.exception("job %s failed", job_id)
        store.mark_failed(job_id, f"internal error: {type(error).__name__}: {error}")
        return "failed"
    store.mark_succeeded(job_id, encode(result))
    return "succeeded"
