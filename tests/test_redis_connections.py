"""Reads on idle pooled connections while Redis cannot persist, for real: a private redis-server whose append-only
file cannot grow (tests/redis_faults.py) refuses writes and PING with MISCONF but serves reads.

redis-py's health check (a PING before using a connection idle for `health_check_interval`) turned that refused PING
into an error of the read it preceded: the API answered a 503 to a job listing while reads worked. The service's
connection classes (service/core/redis_connections.py) take the refused PING for a live connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from service.core.redis_connections import (
    AsyncConnection,
    AsyncSSLConnection,
    AsyncUnixConnection,
    SyncConnection,
    SyncSSLConnection,
    SyncUnixConnection,
    connection_class,
)
from service.core.redis_refusals import is_write_refusal, register_refusal_errors
from tests.redis_faults import FaultyRedis

CHECK_S = 1  # health check after a second idle


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyRedis]:
    server = FaultyRedis(Path(tmp_path_factory.mktemp("redis-connections")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("registered", [False, True], ids=["as found", "refusal errors registered"])
def test_a_read_on_an_idle_connection_works_while_redis_cannot_persist(faulty: FaultyRedis, registered: bool) -> None:
    if registered:
        register_refusal_errors()  # what the API and the worker do at start-up (idempotent, for the process)
    plain = redis.Redis.from_url(faulty.url, health_check_interval=CHECK_S)
    tolerant = redis.Redis.from_url(
        faulty.url, health_check_interval=CHECK_S, connection_class=connection_class(faulty.url)
    )
    try:
        for client in (plain, tolerant):
            client.set("redis-connections:key", "value")  # one pooled connection each, then idle
        # (The reply's text starts with MISCONF, unless register_refusal_errors ran in this process: redis-py then
        # raises WritesRefused with the code cut off. is_write_refusal knows both.)
        with faulty.failing_aof() as error:
            assert "AOF" in error
            time.sleep(CHECK_S + 0.5)
            # What redis-py does by itself: the refused PING fails the read (the behaviour worked around here).
            with pytest.raises(redis.ResponseError) as refused_read:
                plain.get("redis-connections:key")
            assert is_write_refusal(refused_read.value), refused_read.value
            assert tolerant.get("redis-connections:key") == b"value"
            time.sleep(CHECK_S + 0.5)
            assert tolerant.get("redis-connections:key") == b"value"  # and again, after another idle spell
            with pytest.raises(redis.ResponseError) as refused_write:  # writes are still refused, and said so
                tolerant.set("redis-connections:key", "other")
            assert is_write_refusal(refused_write.value), refused_write.value
    finally:
        plain.close()
        tolerant.close()


def test_the_asyncio_client_reads_on_an_idle_connection_while_redis_cannot_persist(faulty: FaultyRedis) -> None:
    async def read_after_idle() -> object:
        client = redis.asyncio.Redis.from_url(
            faulty.url, health_check_interval=CHECK_S, connection_class=connection_class(faulty.url, asyncio=True)
        )
        try:
            await client.set("redis-connections:async", "value")
            with faulty.failing_aof():
                await asyncio.sleep(CHECK_S + 0.5)
                return await client.get("redis-connections:async")
        finally:
            await client.aclose()

    assert asyncio.run(read_after_idle()) == b"value"


def test_a_connection_redis_closed_is_replaced(faulty: FaultyRedis) -> None:
    """A pooled connection Redis closed while it sat idle is not taken for a live one: the read goes to a new one."""
    client = redis.Redis.from_url(
        faulty.url, health_check_interval=CHECK_S, connection_class=connection_class(faulty.url)
    )
    try:
        client.set("redis-connections:dead", "value")
        client.client_kill_filter(_type="normal", skipme=False)  # Redis closes every client connection
        time.sleep(CHECK_S + 0.5)
        assert client.get("redis-connections:dead") == b"value"
    finally:
        client.close()


@pytest.mark.parametrize(
    ("url", "asyncio_client", "expected"),
    [
        ("redis://127.0.0.1:6379/0", False, SyncConnection),
        ("rediss://example.org:6380/0", False, SyncSSLConnection),
        ("unix:///run/redis.sock", False, SyncUnixConnection),
        ("redis://127.0.0.1:6379/0", True, AsyncConnection),
        ("REDISS://example.org:6380/0", True, AsyncSSLConnection),
        ("unix:///run/redis.sock", True, AsyncUnixConnection),
    ],
)
def test_the_class_follows_the_urls_scheme_as_redis_py_does(url: str, asyncio_client: bool, expected: type) -> None:
    chosen = connection_class(url, asyncio=asyncio_client)
    assert chosen is expected
    own = redis.asyncio.ConnectionPool if asyncio_client else redis.ConnectionPool
    assert issubclass(chosen, own.from_url(url).connection_class)  # the class redis-py would have picked, extended


def test_an_unknown_scheme_is_refused_without_the_rest_of_the_url() -> None:
    with pytest.raises(ValueError, match=r"redis://, rediss:// or unix://, not http://") as caught:
        connection_class("http://user:secret@example.org")
    assert "secret" not in str(caught.value)
