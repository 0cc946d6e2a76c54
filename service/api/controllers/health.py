"""Liveness (/health: the process answers) and readiness (/ready: Redis and at least one worker answer).

With HYDRA_HEALTH_CHECKS_REDIS (on in the local stack, whose Redis is a child of the same `serve`) /health also
answers 503 when Redis does not answer a ping: a stack whose Redis died is down, not alive.

Both are async and hold no request thread: /ready shares one probe (Redis ping, Celery worker ping, in one worker
thread) between concurrent callers and reuses it briefly (service/api/readiness.py), so unauthenticated probes cannot
starve the job routes.
"""

from __future__ import annotations

from litestar import Controller, get
from litestar.datastructures import State

from hydra_ablate_client.wire import Health, Readiness
from service.api.controllers.problems import problem_responses


class HealthController(Controller):
    """Open (no API key): load balancers and orchestrators probe these."""

    tags = ("health",)

    @get(
        "/health",
        summary="Liveness",
        description="With HYDRA_HEALTH_CHECKS_REDIS on, also 503 while Redis does not answer (a shared, cached ping).",
        responses=problem_responses(503),
        exclude_from_auth=True,
    )
    async def health(self, state: State) -> Health:
        if state.settings.health_checks_redis:
            await state.redis_health.get()
        return Health(status="ok")

    @get(
        "/ready",
        summary="Readiness: Redis answers and at least one worker answers a ping",
        description=(
            "The check (Redis ping, worker ping) is shared: concurrent callers wait for the same one, and its answer "
            "is reused for HYDRA_READY_CACHE_S seconds."
        ),
        responses=problem_responses(503),
        exclude_from_auth=True,
    )
    async def ready(self, state: State) -> Readiness:
        return await state.readiness.get()  # type: ignore[no-any-return]
