"""Prometheus metrics (prometheus-client): GET /metrics on every API process.

Two kinds of series:
- per API process: `hydra_http_request_duration_seconds{method,route,status}` (this process's requests);
- cluster-wide, read from Redis at scrape time: jobs by status, queue depth per queue, and what the workers
  recorded in Redis (`WorkerStats`, service/core/worker_stats.py): job and chunk durations, ablations done, model
  load time, cache hits/misses.

Several workers: they do not serve HTTP at all; each adds its observations to shared counters in Redis (one HINCRBY
per observation), so scraping any API process sees every worker, however many run, and nothing is lost when a
worker restarts. With several API processes, scrape each for its HTTP latency (the local stack's processes share
one port and their histograms instead: `AppMetrics`); the cluster-wide series are the same on all of them
(aggregate with `max without(instance)`, not `sum`). Ablations per second:
`rate(hydra_ablations_total[1m])`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.core.queue import model_queue
from service.core.settings import Settings, env_raw
from service.core.store import ACTIVE_STATES, TERMINAL_STATES, JobStore
from service.core.worker_stats import COUNTERS, HISTOGRAMS, WorkerStats, bucket_label

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
class ClusterCollector(Collector):
    """The Redis-backed series, read at scrape time."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.stats = WorkerStats(store.client, store.prefix)

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("hydra_jobs", "Jobs kept in Redis, by status", labels=["status"])
        for status, count in self.store.count_by_status().items():
            jobs.add_metric([status], count)
        yield jobs
        depth = GaugeMetricFamily("hydra_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        queues = [self.settings.queue_name] + [
            model_queue(self.settings.queue_name, info.id) for info in self.store.models()
        ]
        pipe = self.store.client.pipeline(transaction=False)
        for name in queues:
            pipe.llen(name)
        for name, length in zip(queues, pipe.execute(), strict=True):
            depth.add_metric([name], int(length))
        yield depth
        yield from self._worker_series(self.stats.read())

    def _worker_series(self, fields: dict[str, float]) -> Iterator[Any]:
        for name, documentation in COUNTERS.items():
            counter = CounterMetricFamily(f"hydra_{name}", documentation)
            counter.add_metric([], fields.get(f"{name}||total", 0.0))
            yield counter
        for name, (documentation, buckets) in HISTOGRAMS.items():
            labels = sorted({key.split("|")[1] for key in fields if key.startswith(f"{name}|")})
            label_names = ["status"] if name == "job_duration_seconds" else []
            family = HistogramMetricFamily(f"hydra_{name}", documentation, labels=label_names)
            for label in labels or ([] if label_names else [""]):
                base = f"{name}|{label}"
                cumulative = [
                    (bucket_label(bound), fields.get(f"{base}|bucket|{bucket_label(bound)}", 0.0))
                    for bound in (*buckets, math.inf)
                ]
                family.add_metric(
                    [label] if label_names else [], cumulative, sum_value=fields.get(f"{base}|sum", 0.0)
                )
            yield family


class AppMetrics:
    """One app's registry: its HTTP latency histogram and the cluster-wide collector.

    Several API processes on one port (the local stack's HYDRA_API_PROCESSES, cli/stack.py) cannot be scraped
    one by one: they share their HTTP histograms through `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's
    multiprocess mode, chosen by that variable when the library is imported), and any of them answers /metrics
    with the sum over all."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        shared = env_raw(MULTIPROCESS_DIR)
        if shared:
            MultiProcessCollector(self.registry, path=shared)
        self.http = Histogram(
            "hydra_http_request_duration_seconds",
            "Seconds to answer an HTTP request, by method, route template and status",
            ["method", "route", "status"],
            registry=None if shared else self.registry,  # shared: collected from the folder, for every process
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.registry.register(ClusterCollector(store, settings))

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http.labels(method, route, str(status)).observe(seconds)


STATES = (*ACTIVE_STATES, *TERMINAL_STATES)
