"""Providers for the app's singletons (settings, store, queue, …), created once by the factory and kept in app.state,
and for the caller's identity, which the authentication middleware put on the request."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from service.auth import provide_principal
from service.idempotency import IdempotencyRecords
from service.limits import TokenCounters
from service.queue import JobQueue
from service.settings import Settings
from service.store import JobStore


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
    }
