"""The Litestar application factory: wires settings, the job store and the queue into the controllers.

`litestar --app service.api.app:create_app run` (or any ASGI server with `--factory`) builds it from the
environment; tests pass their own Settings.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio
from anyio import to_thread
from litestar import Litestar
from litestar._openapi.schema_generation.plugins import StructSchemaPlugin
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Schema
from litestar.plugins.problem_details import ProblemDetailsPlugin
from litestar.typing import FieldDefinition

from service.api.auth import auth_middleware, security_components
from service.api.controllers import HealthController, JobsController, ModelsController
from service.api.controllers.dependencies import dependencies
from service.api.controllers.figures import FiguresController
from service.api.controllers.metrics import metrics
from service.api.controllers.problems import problem_details_config
from service.api.controllers.strict_query import request_guard
from service.api.controllers.webhooks import WebhooksController
from service.api.idempotency import IdempotencyRecords
from service.api.large_bodies import LargeBodies
from service.api.observability import add_headers, observability_middleware
from service.api.openapi_polish import operation_id, polish
from service.api.prometheus import AppMetrics
from service.api.rate_limits import RATE_SCRIPT, RateLimiter
from service.api.readiness import Shared, probe, redis_alive
from service.api.stream_slots import StreamSlots
from service.api.ui import ui_handlers, ui_template_config
from service.core.api_keys import ApiKeys, keys_hash
from service.core.callbacks import finish_hook
from service.core.event_hub import EventHub
from service.core.json_logging import configure_json_logging, json_logs_requested
from service.core.prompt_tokens import TokenCounters
from service.core.queue import JobQueue
from service.core.recovery import resend_unplanned
from service.core.redaction import install_log_redaction
from service.core.redis_connections import connection_class
from service.core.redis_options import COMMAND_TIMEOUT_S, driver_options
from service.core.served_models import ServedModels
from service.core.settings import Settings
from service.core.store import LOOP_SCRIPTS, JobStore

logger = logging.getLogger(__name__)
WARM_CONNECTIONS = 64  # Redis connections opened at start-up per pool (asyncio and threads): a burst's worth

API_TITLE = "hydra-ablate"
API_VERSION = "1.0.0"
API_DESCRIPTION = (
    "Runs causal ablation experiments on transformer language models: ablate attention, MLP or head outputs "
    "and measure direct effects, total effects and downstream compensation (the Hydra effect). Jobs run "
    "asynchronously on GPU workers; every error is an RFC 9457 problem-details document. Job routes need an API "
    "key in the X-API-Key header; each key sees only its own jobs."
)

NO_AUTH_REFUSED = (
    "HYDRA_AUTH=off turns access control off: every caller could read and cancel every job. Set "
    "HYDRA_ALLOW_NO_AUTH=1 as well to confirm that this server is only reachable by you (the local "
    "`hydra-ablate serve` stack does so with its embedded Redis), or configure API keys instead."
)


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Structs that reject unknown fields say so in OpenAPI (`additionalProperties: false`), so generated clients
    and fuzzers send what the server accepts; Litestar's own struct plugin leaves it out."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        if not super().is_plugin_supported_field(field_definition):
            return False
        config = getattr(field_definition.type_, "__struct_config__", None)
        return bool(config is not None and config.forbid_unknown_fields)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: object) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)  # type: ignore[arg-type]
        schema.additional_properties = False
        return schema


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        path="/schema",
        render_plugins=[SwaggerRenderPlugin()],
        components=security_components(),
        operation_id_creator=operation_id,
    )


def check_auth_settings(settings: Settings) -> None:
    """Refuse to build an app without access control unless that was asked for twice (HYDRA_AUTH=off and
    HYDRA_ALLOW_NO_AUTH=1)."""
    if not settings.auth_enabled and not settings.allow_no_auth:
        raise RuntimeError(NO_AUTH_REFUSED)


def app_state(settings: Settings, store: JobStore, queue: JobQueue, api_keys: ApiKeys) -> State:
    """What the routes share (service/api/controllers/dependencies.py hands it to them)."""
    return State(
        {
            "settings": settings,
            "store": store,
            "queue": queue,
            "api_keys": api_keys,
            "idempotency": IdempotencyRecords(store.client, settings.key_prefix, settings.result_ttl_s),
            "tokens": TokenCounters(),
            "served": ServedModels(),
            "readiness": Shared(lambda: probe(store, queue, settings), settings.ready_cache_s),
            "redis_health": Shared(lambda: redis_alive(store), settings.ready_cache_s),
            "metrics": AppMetrics(store, settings),
            "stream_slots": StreamSlots(settings.max_streams_per_key, settings.max_streams),
            "large_bodies": LargeBodies(settings.large_submit_bytes, settings.large_submits),
        }
    )


class Lifecycle:
    """The app's start-up steps, in order (`on_startup`), and its shutdown (`close_clients`)."""

    def __init__(self, settings: Settings, store: JobStore, queue: JobQueue, state: State) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.state = state
        self.warm_stop = threading.Event()

    @property
    def on_startup(self) -> list[Callable[[Litestar], Awaitable[None]]]:
        return [self.open_async_clients, self.warm_up, self.resend_unplanned_jobs, self.freeze_startup_objects]

    async def open_async_clients(self, app: Litestar) -> None:
        # Auth and rate limiting run on the event loop: an asyncio Redis pool, made in the loop that serves.
        client = redis.asyncio.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=5,
            socket_timeout=COMMAND_TIMEOUT_S,
            health_check_interval=30,
            connection_class=connection_class(self.settings.redis_url, asyncio=True),
            **driver_options(),
        )
        app.state.aredis = client
        app.state.limiter = RateLimiter(client, self.settings)
        # Streams and long polls wait on this one subscription, not on a pooled connection each.
        app.state.event_hub = EventHub(client, self.store.keys.events_channel)
        app.state.event_hub.start()
        await self.warn_without_keys(client)

    async def warm_up(self, app: Litestar) -> None:
        # A fresh API's first requests should cost what later ones do: tokenizers are parsed (and kept fresh) by a
        # background thread, and the broker connection is opened now, not by the first submit of a burst.
        # The same thread re-reads the served models every half second, so submits resolve against a recent list
        # without a Redis read (service/core/served_models.py).
        store, served = self.store, self.state["served"]
        threading.Thread(
            target=self.state["tokens"].keep_warm,
            args=(store, self.warm_stop, 0.5, lambda: served.refreshed(store)),
            name="hydra-warm",
            daemon=True,
        ).start()
        try:
            await to_thread.run_sync(self.queue.connect)
            # Redis connections for a burst: each pool grows by one connection per concurrent request, and a new
            # connection costs a TCP handshake and a HELLO; open them now rather than during the first burst.
            await asyncio.gather(*(app.state.aredis.ping() for _ in range(WARM_CONNECTIONS)))
            for script in (*LOOP_SCRIPTS, RATE_SCRIPT):  # else a fresh Redis answers a burst's first calls NOSCRIPT
                await app.state.aredis.script_load(script)
            await to_thread.run_sync(store.open_connections, WARM_CONNECTIONS)
        except Exception as error:  # noqa: BLE001 - /ready reports Redis and the broker; requests connect anyway
            logger.warning("could not open the Redis and broker connections at start-up: %s", error)

    async def resend_unplanned_jobs(self, app: Litestar) -> None:
        # Jobs stored but never sent (this API may have died between the two steps): send them now; workers'
        # periodic sweeps do the same later (service/core/recovery.py).
        try:
            await to_thread.run_sync(lambda: resend_unplanned(self.store, self.queue.enqueue, everything=True))
        except Exception as error:  # noqa: BLE001 - Redis or the broker may be down at start; workers sweep too
            logger.warning("could not send the stored but unplanned jobs at start-up: %s", error)

    async def freeze_startup_objects(self, app: Litestar) -> None:
        # Everything start-up made (modules, the app, its routes and schemas: a few hundred thousand objects) lives
        # as long as the process. Left in the collector's generations, the first full collections scanned them all
        # during the first requests (40-45 ms pauses of each API process in the load benchmark's first second);
        # frozen, collections only look at what requests allocate.
        gc.collect()
        gc.freeze()  # undone at shutdown (apps made and dropped in one process, as tests do, stay collectable)

    async def warn_without_keys(self, client: redis.asyncio.Redis) -> None:
        settings = self.settings
        if not settings.auth_enabled or settings.api_keys.strip():
            return
        try:
            count = await client.hlen(keys_hash(settings.key_prefix))
        except redis.RedisError:
            return  # /ready reports Redis; nothing to add here
        if count == 0:
            logger.warning(
                "auth is on and no API key exists: job requests will get 401. Create one with "
                "`hydra-ablate keys create NAME` (same REDIS_URL and HYDRA_KEY_PREFIX) or set HYDRA_API_KEYS"
            )

    async def close_clients(self, app: Litestar) -> None:
        gc.unfreeze()
        self.warm_stop.set()
        hub = app.state.get("event_hub")
        if hub is not None:
            await hub.close()
        client = app.state.get("aredis")
        if client is not None:
            await client.aclose()
        self.queue.close()
        self.store.close()


def create_app(settings: Settings | None = None) -> Litestar:
    """A fresh app with its own Redis pools and Celery client; all are closed on shutdown."""
    install_log_redaction()  # REDIS_URL passwords never reach a log line
    settings = settings or Settings.from_env()
    check_auth_settings(settings)
    api_keys = ApiKeys(settings)  # hashes HYDRA_API_KEYS now; a malformed entry stops the start here
    store = JobStore.from_settings(settings)
    queue = JobQueue(settings, client=store.client)
    store.on_finished = finish_hook(store, queue.notify)  # a job cancelled here gets its webhook too
    state = app_state(settings, store, queue, api_keys)
    if json_logs_requested():
        configure_json_logging()
    lifecycle = Lifecycle(settings, store, queue, state)
    app = Litestar(
        route_handlers=[
            JobsController,
            FiguresController,
            ModelsController,
            HealthController,
            WebhooksController,
            metrics,
            *ui_handlers(),
        ],
        template_config=ui_template_config(),
        guards=[request_guard],
        dependencies=dependencies(),
        state=state,
        middleware=[DefineMiddleware(observability_middleware, log_access=settings.access_log), auth_middleware()],
        before_send=[add_headers],
        plugins=[ProblemDetailsPlugin(problem_details_config()), StrictStructSchemaPlugin()],
        openapi_config=openapi_config(),
        request_max_body_size=settings.max_body_bytes,
        on_startup=lifecycle.on_startup,
        on_shutdown=[lifecycle.close_clients],
    )
    polish(app.openapi_schema)  # built once here and cached: /schema serves the polished document
    return app
