"""Redis connections whose health check survives Redis refusing writes. No torch, no HTTP.

redis-py checks a pooled connection that sat idle for `health_check_interval` seconds with a PING before using it.
While Redis cannot persist (its append-only file or snapshot fails: "MISCONF ..."), Redis refuses PING as it
refuses writes, although it serves reads; redis-py then raises the refusal from the health check, so a plain read
(a job's status, a listing) on a connection idle for 30 s failed with a 503 while reads still worked. Here the
health check takes a refused PING for what it is: Redis answered, the connection is alive. Any other reply or
error is handled as redis-py does.

Pick the class with `connection_class(url, asyncio=...)`: redis-py chooses the class from the URL's scheme
(redis://, rediss:// for TLS, unix://), and a `connection_class` passed to `from_url` replaces that choice, so each
kind has its own subclass.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio.connection as async_connection
import redis.connection as sync_connection
from redis.exceptions import ConnectionError, ResponseError
from redis.utils import str_if_bytes

from service.core.redis_refusals import is_write_refusal


def _alive(reply: Any) -> None:
    if str_if_bytes(reply) != "PONG":
        raise ConnectionError("Bad response from PING health check")


class _SyncPing:
    def _send_ping(self: Any) -> None:
        self.send_command("PING", check_health=False)
        try:
            reply = self.read_response()
        except ResponseError as exc:
            if is_write_refusal(exc):
                return  # Redis answered: it refuses PING while it cannot persist
            raise
        _alive(reply)


class _AsyncPing:
    async def _send_ping(self: Any) -> None:
        await self.send_command("PING", check_health=False)
        try:
            reply = await self.read_response()
        except ResponseError as exc:
            if is_write_refusal(exc):
                return  # Redis answered: it refuses PING while it cannot persist
            raise
        _alive(reply)


class SyncConnection(_SyncPing, sync_connection.Connection):
    pass


class SyncSSLConnection(_SyncPing, sync_connection.SSLConnection):
    pass


class SyncUnixConnection(_SyncPing, sync_connection.UnixDomainSocketConnection):
    pass


class AsyncConnection(_AsyncPing, async_connection.Connection):
    pass


class AsyncSSLConnection(_AsyncPing, async_connection.SSLConnection):
    pass


class AsyncUnixConnection(_AsyncPing, async_connection.UnixDomainSocketConnection):
    pass


_CLASSES: dict[tuple[str, bool], type] = {
    ("redis", False): SyncConnection,
    ("rediss", False): SyncSSLConnection,
    ("unix", False): SyncUnixConnection,
    ("redis", True): AsyncConnection,
    ("rediss", True): AsyncSSLConnection,
    ("unix", True): AsyncUnixConnection,
}


def connection_class(url: str, asyncio: bool = False) -> type:
    """The connection class for `url`'s scheme (as redis-py would pick it), with the tolerant health check."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "redis"
    try:
        return _CLASSES[(scheme, asyncio)]
    except KeyError:
        raise ValueError(f"a Redis URL must start with redis://, rediss:// or unix://, not {scheme}://") from None
