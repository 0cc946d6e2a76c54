"""Providers for the app's singletons (settings, store, queue, …), created once by the factory and kept in app.state,
and for the caller's identity, which the authentication middleware put on the request.

Routes that need several of them take one `ctx` (RouteContext) instead: Litestar resolves two or more
dependencies of a handler concurrently, in an anyio task group (a task and an Event each), and under load that
took a fifth of the API's CPU per request for providers that only read app.state; a single dependency is
resolved inline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio
from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from service.api.auth import provide_principal
from service.api.idempotency import IdempotencyRecords
from service.core.api_keys import Principal
from service.core.prompt_tokens import TokenCounters
from service.core.queue import JobQueue
from service.core.served_models import ServedModels
from service.core.settings import Settings
from service.core.store import JobStore


@dataclass(frozen=True, slots=True)
class RouteContext:
    """The caller and the app's singletons, as one dependency (see the module doc)."""

    principal: Principal
    settings: Settings
    store: JobStore
    queue: JobQueue
    idempotency: IdempotencyRecords
    tokens: TokenCounters
    served: ServedModels
    aredis: redis.asyncio.Redis  # the event loop's own client (made at start-up)


def provide_context(request: Request[Any, Any, Any]) -> RouteContext:
    state = request.app.state
    return RouteContext(
        principal=provide_principal(request),
        settings=state.settings,
        store=state.store,
        queue=state.queue,
        idempotency=state.idempotency,
        tokens=state.tokens,
        served=state.served,
        aredis=state.aredis,
    )


def provide_settings(state: State) -> Settings:
    return state.settings


def provide_store(state: State) -> JobStore:
    return state.store


def provide_queue(state: State) -> JobQueue:
    return state.queue


def provide_idempotency(state: State) -> IdempotencyRecords:
    return state.idempotency


def provide_tokens(state: State) -> TokenCounters:
    return state.tokens


def dependencies() -> dict[str, Provide]:
    """Handlers ask for these by name (NamedDependency): `principal` is the authenticated caller."""
    return {
        "settings": Provide(provide_settings, sync_to_thread=False),
        "store": Provide(provide_store, sync_to_thread=False),
        "queue": Provide(provide_queue, sync_to_thread=False),
        "idempotency": Provide(provide_idempotency, sync_to_thread=False),
        "tokens": Provide(provide_tokens, sync_to_thread=False),
        "principal": Provide(provide_principal, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }
