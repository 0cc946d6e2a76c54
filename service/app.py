"""The Litestar application factory: wires settings, the job store and the queue into the controllers.

`litestar --app service.app:create_app run` (or any ASGI server with `--factory`) builds it from the
environment; tests pass their own Settings.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins.problem_details import ProblemDetailsPlugin

from service.controllers import HealthController, JobsController, ModelsController
from service.controllers.dependencies import dependencies
from service.controllers.figures import FiguresController
from service.errors import problem_details_config
from service.queue import JobQueue
from service.settings import Settings
from service.store import JobStore

API_TITLE = "hydra-ablate"
API_VERSION = "1.0.0"
API_DESCRIPTION = (
    "Runs causal ablation experiments on transformer language models: ablate attention, MLP or head outputs "
    "and measure direct effects, total effects and downstream compensation (the Hydra effect). Jobs run "
    "asynchronously on GPU workers; every error is an RFC 9457 problem-details document."
)


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        path="/schema",
        render_plugins=[SwaggerRenderPlugin()],
    )


def create_app(settings: Settings | None = None) -> Litestar:
    """A fresh app with its own Redis pool and Celery client; both are closed on shutdown."""
    settings = settings or Settings.from_env()
    store = JobStore.from_settings(settings)
    queue = JobQueue(settings)

    def close_clients() -> None:
        queue.close()
        store.close()

    return Litestar(
        route_handlers=[JobsController, FiguresController, ModelsController, HealthController],
        dependencies=dependencies(),
        state=State({"settings": settings, "store": store, "queue": queue}),
        plugins=[ProblemDetailsPlugin(problem_details_config())],
        openapi_config=openapi_config(),
        on_shutdown=[close_clients],
    )
