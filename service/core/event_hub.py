"""One subscription per API process that tells waiting streams and long polls when their job changed.

Why not a blocking read per waiter: an XREAD BLOCK holds a pooled Redis connection for its whole wait. redis-py caps
a pool at 100 connections, so 100 event streams of one key used to leave every other request of the process
"Too many connections" (503); and the read outlived the client's socket timeout (5 s in redis-py 8) and was cut.

Why a publish-and-subscribe hint rather than one shared XREAD over every watched stream: the job's event stream
stays the only record (a waiter reads it itself, with the same cursor logic as before), and the channel only says
"job X has something new". A hint that is lost (the subscription reconnecting after a Redis restart) costs latency,
never an event: every waiter re-reads its stream at least each quiet interval, and all are woken when the
subscription comes back. A shared XREAD would have to rebuild its key list and wake itself whenever a waiter
arrives or leaves, and pay for every watched key on every call.

So a waiter holds no connection while it waits: it holds an asyncio.Event. Its reads (XREAD without BLOCK, a short
command) go through the process's pool under a semaphore, so however many waiters one change wakes at once, they
take at most `READS_AT_ONCE` connections between them and leave the rest of the pool to other requests.

Writers (JobStore.emit) PUBLISH the job id on `events_channel` in the same pipeline as the XADD of its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import redis
import redis.asyncio

logger = logging.getLogger(__name__)

T = TypeVar("T")

READS_AT_ONCE = 8  # stream reads of all waiters of this process in flight at once (pooled connections they take)
LISTEN_S = 1.0  # one read of the subscription: below the client's socket timeout, so an idle channel is no error
RETRY_MAX_S = 5.0  # backoff ceiling between subscription attempts while Redis is away


class Waiter:
    """One stream's or long poll's flag: set when its job may have changed (a hint; the stream says what)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    def clear(self) -> None:
        """Forget earlier hints: call before reading the stream, so a change during the read wakes the next wait."""
        self._changed.clear()

    async def wait(self, timeout_s: float) -> bool:
        """True once notified, False after `timeout_s` without a hint."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class EventHub:
    """The API process's subscription to job changes, fanned out to the waiters of each job."""

    def __init__(self, client: redis.asyncio.Redis, channel: str, reads_at_once: int = READS_AT_ONCE) -> None:
        self.client = client
        self.channel = channel
        self._waiters: dict[str, set[Waiter]] = {}
        self._reads = asyncio.Semaphore(reads_at_once)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the subscription in the background (in the running event loop) until `close`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="hydra-event-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Waiter]:
        """A Waiter notified of the job's changes while the block runs (register before the first read)."""
        waiter = Waiter()
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]

    async def read(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run one short Redis command of a waiter, at most `reads_at_once` of them at a time in this process."""
        async with self._reads:
            return await command()

    def notify(self, job_id: str) -> None:
        for waiter in self._waiters.get(job_id, ()):
            waiter.notify()

    def notify_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.notify()

    async def _listen(self) -> None:
        delay = 0.1
        outage = False
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if outage:
                    logger.info("event subscription restored")
                outage, delay = False, 0.1
                self.notify_all()  # hints published while unsubscribed are lost: every waiter reads its stream now
                while True:
                    # An explicit read timeout: the connection's socket timeout bounds ordinary commands, and an
                    # idle channel must not count as a dead server. None: nothing arrived (or a health-check PONG).
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_S)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self.notify(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError) as error:
                if not outage:
                    logger.warning(
                        "event subscription lost (%s); streams and long polls fall back to re-reading", error
                    )
                outage = True
                self.notify_all()
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)
