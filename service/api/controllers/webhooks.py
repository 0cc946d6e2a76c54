"""/v1/webhooks/secret: the secret that signs the calling key's webhook deliveries (service/core/callbacks.py)."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from hydra_ablate_client.wire import WebhookSecret
from service.api.auth import SECURITY
from service.api.controllers.dependencies import RouteContext
from service.api.controllers.problems import PROTECTED, problem_responses
from service.api.controllers.strict_query import RATE_LIMITED
from service.core.callbacks import key_secret


class WebhooksController(Controller):
    path = "/v1/webhooks"
    tags = ("webhooks",)
    security = SECURITY
    opt = {RATE_LIMITED: True}  # noqa: RUF012 - read by the app's guard (service/api/controllers/strict_query.py)

    @get(
        "/secret",
        sync_to_thread=True,
        summary="The secret that signs this key's webhooks",
        operation_id="getWebhookSecret",
        description=(
            "Deliveries to a job's callback_url carry `Hydra-Timestamp` (unix seconds) and `Hydra-Signature: "
            "v1=<hex HMAC-SHA256(secret, timestamp + '.' + body)>`; verify both and reject old timestamps. The "
            "secret is made on first use and is the same for every job of the key."
        ),
        responses=problem_responses(400, *PROTECTED, 503),
    )
    def secret(self, ctx: NamedDependency[RouteContext]) -> WebhookSecret:
        store, name = ctx.store, ctx.principal.name
        return WebhookSecret(key=name, secret=key_secret(store.client, store.prefix, name))
