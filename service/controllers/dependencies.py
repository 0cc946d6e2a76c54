"""Providers for the app's singletons (settings, store, queue), created once by the factory and kept in app.state."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from service.queue import JobQueue
from service.settings import Settings
from service.store import JobStore


def provide_settings(state: State) -> Settings:
    return state.settings


def provide_store(state: State) -> JobStore:
    return state.store


def provide_queue(state: State) -> JobQueue:
    return state.queue


def dependencies() -> dict[str, Provide]:
    """Handlers ask for `settings`, `store` and `queue` by name (NamedDependency)."""
    return {
        "settings": Provide(provide_settings, sync_to_thread=False),
        "store": Provide(provide_store, sync_to_thread=False),
        "queue": Provide(provide_queue, sync_to_thread=False),
    }
