"""GET /metrics: Prometheus text exposition (service/api/prometheus.py), open like /health: a scraper needs no key."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from prometheus_client import generate_latest

from service.api.prometheus import CONTENT_TYPE


@get(
    "/metrics",
    sync_to_thread=True,
    summary="Prometheus metrics",
    operation_id="getMetrics",
    description=(
        "Prometheus text format: jobs by status, queue depth per queue, job and chunk durations, ablations done "
        "(rate() for ablations per second), model load time and cache hits, HTTP latency by route. The job, queue "
        "and worker series are cluster-wide (read from Redis); HTTP latency is this process's (every process's where "
        "several share one port, as in the local stack)."
    ),
    exclude_from_auth=True,
    tags=["operations"],
    include_in_schema=True,
    media_type=CONTENT_TYPE,
)
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE)
