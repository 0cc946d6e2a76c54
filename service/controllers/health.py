"""Liveness (/health: the process answers) and readiness (/ready: Redis and at least one worker answer)."""

from __future__ import annotations

import redis
from litestar import Controller, get
from litestar.di import NamedDependency

from service.controllers.problems import problem_responses
from service.errors import BackendUnavailable
from service.queue import JobQueue
from service.schemas import Health, Readiness
from service.settings import Settings
from service.store import JobStore


class HealthController(Controller):
    """Open (no API key): load balancers and orchestrators probe these."""

    tags = ("health",)

    @get("/health", sync_to_thread=False, summary="Liveness", exclude_from_auth=True)
    def health(self) -> Health:
        return Health(status="ok")

    @get(
        "/ready",
        sync_to_thread=True,
        summary="Readiness: Redis answers and at least one worker answers a ping",
        responses=problem_responses(503),
        exclude_from_auth=True,
    )
    def ready(
        self,
        store: NamedDependency[JobStore],
        queue: NamedDependency[JobQueue],
        settings: NamedDependency[Settings],
    ) -> Readiness:
        try:
            store.ping()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"not ready: Redis at the configured REDIS_URL does not answer ({exc})") from exc
        try:
            workers = queue.worker_count(timeout=settings.ready_timeout_s)
        except Exception as exc:  # the broker connection can fail in kombu's own exception types
            raise BackendUnavailable(f"not ready: the broker could not ping workers ({exc})") from exc
        if workers < 1:
            raise BackendUnavailable(
                f"not ready: Redis answers but no worker answered a ping within {settings.ready_timeout_s:g} s "
                f"(start a worker consuming queue {settings.queue_name!r})"
            )
        return Readiness(status="ready", redis=True, workers=workers)
