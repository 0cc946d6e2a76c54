"""Readiness without holding request threads: one probe at a time, its answer shared for a moment.

A Celery broadcast ping blocks for up to `ready_timeout_s`. Run per request in the thread pool, a few clients
polling /ready (no key needed) held every pool thread and starved authenticated requests (a status read went from
4 ms to seconds). Here the route is async and only one probe (Redis ping, then worker ping) runs at a time, in one
worker thread; callers that arrive meanwhile await that same probe, and its outcome (the readiness or the error)
is reused for `ttl_s`, so a flood of probes costs the server no I/O at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio.to_thread
import redis

from hydra_ablate_client.wire import Readiness
from service.core.errors import BackendUnavailable
from service.core.queue import JobQueue
from service.core.settings import Settings
from service.core.store import JobStore

T = TypeVar("T")


def probe(store: JobStore, queue: JobQueue, settings: Settings) -> Readiness:
    """Redis answers and at least one worker answers a ping (blocking); BackendUnavailable says which did not."""
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


def redis_alive(store: JobStore) -> bool:
    """/health with HYDRA_HEALTH_CHECKS_REDIS: Redis answers a ping (blocking); BackendUnavailable if not."""
    try:
        store.ping()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"unhealthy: Redis at the configured REDIS_URL does not answer ({exc})") from exc
    return True


class Shared(Generic[T]):
    """`make()` (blocking) run at most once per `ttl_s`, by one thread, its outcome shared by every caller."""

    def __init__(self, make: Callable[[], T], ttl_s: float) -> None:
        self._make = make
        self.ttl_s = ttl_s
        self._at = -float("inf")
        self._outcome: T | BaseException | None = None
        self._running: asyncio.Future[T] | None = None

    async def get(self) -> T:
        """The value; raises what `make` raised (cached alike, so a dead broker is not hammered)."""
        if self._outcome is not None and time.monotonic() - self._at < self.ttl_s:
            return self._result(self._outcome)
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._running)

    async def _refresh(self) -> T:
        try:
            outcome: T | BaseException = await anyio.to_thread.run_sync(self._make)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller, who raises it
            outcome = exc
        finally:
            self._running = None
        self._outcome, self._at = outcome, time.monotonic()
        return self._result(outcome)

    @staticmethod
    def _result(outcome: T | BaseException) -> T:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
