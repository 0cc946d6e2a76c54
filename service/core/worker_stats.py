"""What workers add to the cluster-wide metrics: counters and histograms as fields of one Redis hash.

Workers serve no HTTP; each adds its observations here (one HINCRBY per observation), so scraping any API process
(service/api/prometheus.py) sees every worker, however many run, and nothing is lost when a worker restarts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import redis

from service.core.redis_keys import RedisKeys
from service.core.redis_replies import bytes_hash

DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HISTOGRAMS: dict[str, tuple[str, Sequence[float]]] = {
    "job_duration_seconds": ("Seconds from a job's start to its end, by final state", DURATION_BUCKETS),
    "chunk_duration_seconds": ("Seconds one chunk of prompts took on a worker", DURATION_BUCKETS),
    "model_load_seconds": ("Seconds a worker took to load a model (cache misses only)", LOAD_BUCKETS),
}
COUNTERS: dict[str, str] = {
    "ablations": "Ablated runs done by all workers (rate() of it: ablations per second)",
    "model_cache_hits": "Chunks whose model was already loaded on the worker",
    "model_cache_misses": "Chunks whose worker had to load the model",
}


def bucket_label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class WorkerStats:
    """What workers add to the cluster-wide metrics: counters and histograms as fields of one Redis hash."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.key = RedisKeys(prefix).worker_metrics

    def observe(self, name: str, value: float, label: str = "") -> None:
        """One observation of histogram `name` (HISTOGRAMS), with an optional label value (e.g. the final state)."""
        _, buckets = HISTOGRAMS[name]
        base = f"{name}|{label}"
        pipe = self.client.pipeline(transaction=False)
        for bound in (*buckets, math.inf):
            if value <= bound:
                pipe.hincrby(self.key, f"{base}|bucket|{bucket_label(bound)}", 1)
        pipe.hincrbyfloat(self.key, f"{base}|sum", float(value))
        pipe.hincrby(self.key, f"{base}|count", 1)
        pipe.execute()

    def add(self, name: str, amount: float = 1) -> None:
        """Raise counter `name` (COUNTERS)."""
        if name not in COUNTERS:
            raise KeyError(name)
        self.client.hincrbyfloat(self.key, f"{name}||total", float(amount))

    def read(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in bytes_hash(self.client.hgetall(self.key)).items()}
