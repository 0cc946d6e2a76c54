"""/v1/models: the models the workers serve, as they advertised them."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from hydra_ablate_client.wire import ModelInfo
from service.api.controllers.problems import problem_responses
from service.core.store import JobStore


class ModelsController(Controller):
    path = "/v1/models"
    tags = ("models",)

    @get(
        "/",
        sync_to_thread=True,
        summary="Models available to jobs",
        description=(
            "Advertised by the workers when they load a model; empty until a worker has started. Open (no API key): "
            "what a server offers is not a secret, and clients check it before asking for a key."
        ),
        responses=problem_responses(503),
        exclude_from_auth=True,
    )
    def list_models(self, store: NamedDependency[JobStore]) -> list[ModelInfo]:
        return store.models()
