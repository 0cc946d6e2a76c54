"""What a worker adds to the cluster-wide metrics (service/core/worker_stats.py; served by service/api/prometheus.py).

Never lets a metrics write fail a job: Redis trouble is logged and the observation dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from service.core.store import JobStore
from service.core.worker_stats import WorkerStats

log = logging.getLogger(__name__)
T = TypeVar("T")


def _safely(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:
        log.warning("could not record a metric", exc_info=True)


def load_model(store: JobStore, cached: bool, load: Callable[[], T]) -> T:
    """Run `load` (the model cache's get), counting a hit or a miss and timing misses."""
    stats = WorkerStats(store.client, store.prefix)
    started = time.perf_counter()
    loaded = load()
    if cached:
        _safely(lambda: stats.add("model_cache_hits"))
    else:
        _safely(lambda: stats.add("model_cache_misses"))
        _safely(lambda: stats.observe("model_load_seconds", time.perf_counter() - started))
    return loaded


def chunk_done(store: JobStore, seconds: float, ablations: int) -> None:
    stats = WorkerStats(store.client, store.prefix)
    _safely(lambda: stats.observe("chunk_duration_seconds", seconds))
    _safely(lambda: stats.add("ablations", ablations))


def _instant(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def job_finished(store: JobStore, job_id: str) -> None:
    """The job's start-to-end time, labelled with its final state (call after it ended)."""

    def record() -> None:
        status = store.status(job_id)
        if status is None:
            return
        started, finished = _instant(status.started_at or status.created_at), _instant(status.finished_at)
        if started is not None and finished is not None:
            WorkerStats(store.client, store.prefix).observe("job_duration_seconds", finished - started, status.status)

    _safely(record)
