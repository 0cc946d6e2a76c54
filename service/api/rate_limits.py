"""Per-key request rate: a limit that keeps one client from starving the others.

(The cap on queued + running jobs per key is enforced where jobs are created, atomically, in JobStore.create; the
request body size is Litestar's own `request_max_body_size`, set in the app factory; prompt length in tokens is
checked in service/core/prompt_tokens.py.)

Rate: a fixed window per key and bucket, counted in Redis with one script (INCR, and PEXPIRE on the window's first
request), so every API process behind a load balancer shares the same counters and a burst cannot slip between a
read and a write. Litestar's RateLimitConfig keys on the client IP and does a read-modify-write on its store, which
is neither per key nor race-free across processes, hence this guard.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
import redis.asyncio
from litestar.connection import ASGIConnection
from litestar.exceptions import TooManyRequestsException
from litestar.handlers.base import BaseRouteHandler

from service.core.lua_scripts import lua
from service.core.redis_keys import RedisKeys
from service.core.redis_refusals import is_write_refusal
from service.core.settings import Settings

logger = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RateSpent(Exception):
    """The cause of a rate-limit 429: the limit and when its window resets (for the RateLimit-* headers)."""

    def __init__(self, limit: int, reset_s: int) -> None:
        super().__init__(limit, reset_s)
        self.limit = limit
        self.reset_s = reset_s


RATE_SCRIPT = lua("service.api", "rate_limits.hit")  # loaded at the API's start-up with the store's loop scripts


class RateLimiter:
    """Fixed-window request counters per key name and bucket ("read" or "write"), shared through Redis."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.client = client
        self.prefix = settings.key_prefix
        self.window_ms = settings.rate_window_s * 1000
        # "login": sign-in attempts on the web page, counted per client address and per the key's first characters
        # (service/api/ui/controller.py), before any key is known.
        self.limits = {
            "read": settings.rate_limit_read, "write": settings.rate_limit_write, "login": settings.ui_login_limit
        }  # fmt: skip
        self._hit = client.register_script(RATE_SCRIPT)

    def counter_key(self, bucket: str, name: str) -> str:
        return RedisKeys(self.prefix).rate_counter(bucket, name)

    async def check(self, bucket: str, name: str) -> tuple[int, int, int] | None:
        """Count one request; TooManyRequestsException with Retry-After once the window's limit is spent.

        Returns (limit, remaining, seconds until the window resets) for the RateLimit-* headers; None without a limit.
        """
        limit = self.limits[bucket]
        if limit <= 0:
            return None
        try:
            count, ttl_ms = await self._hit(keys=[self.counter_key(bucket, name)], args=[self.window_ms])
        except redis.ResponseError as exc:
            if not is_write_refusal(exc):
                raise
            # Redis refuses writes (full at maxmemory, or its append-only file cannot be written): the counter
            # cannot be written. Refusing the request would turn every read into a 503 although reads still work;
            # let it through uncounted (a submit then fails on its own write with a 503 that says why).
            logger.warning("rate limit not counted for %r: Redis refuses writes (%s)", name, exc)
            return None
        reset_s = max(1, math.ceil(int(ttl_ms) / 1000))
        if int(count) > limit:
            retry_after = reset_s
            kind = {"write": "submit and cancel requests", "login": "sign-in attempts"}.get(bucket, "read requests")
            whose = f"for key {name!r}" if bucket != "login" else f"from {name}"
            raise TooManyRequestsException(
                detail=(
                    f"rate limit: at most {limit} {kind} per {self.window_ms // 1000} s {whose}; "
                    f"retry in {retry_after} s"
                ),
                headers={"Retry-After": str(retry_after)},
            ) from RateSpent(limit, reset_s)
        return limit, limit - int(count), reset_s


async def rate_limit(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard on the job routes (after authentication, so it counts per key, not per IP).

    OPTIONS passes the authentication middleware without a key (CORS preflights carry none), so it has no caller
    to count against; its handler only lists the allowed methods, touching neither Redis nor a model.
    """
    from service.api.observability import RATE_STATE_KEY

    user = connection.scope.get("user")
    if user is None:
        return
    bucket = "write" if connection.scope.get("method") in WRITE_METHODS else "read"
    limiter: RateLimiter = connection.app.state.limiter
    try:
        counted = await limiter.check(bucket, user.name)
    except TooManyRequestsException as exc:
        if isinstance(exc.__cause__, RateSpent):
            connection.scope.setdefault("state", {})[RATE_STATE_KEY] = (exc.__cause__.limit, 0, exc.__cause__.reset_s)
        raise
    if counted is not None:  # the observability middleware turns it into RateLimit-* headers
        connection.scope.setdefault("state", {})[RATE_STATE_KEY] = counted
