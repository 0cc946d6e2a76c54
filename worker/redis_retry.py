"""Riding out a Redis outage inside a chunk: retry with backoff on connection errors and refused writes, up to a
time budget.

A chunk talks to Redis before it starts, at every prompt (stop check, progress), to renew its lease and to record
its outcome. An outage shorter than the budget (`HYDRA_REDIS_OUTAGE_S`, 60 s) costs nothing but the wait: the
stop check and progress report are skipped while Redis is away (the computation goes on), and the calls that
matter (recording the result) are retried until Redis answers. Once Redis has been away longer than the budget
the chunk gives up with `RedisOutage`; its failure is recorded as soon as Redis is back.

A Redis that answers but refuses writes (full at maxmemory, or unable to write its append-only file:
service/core/redis_refusals.py) is an outage of the same kind, under the same budget: its reads still work, so
the stop check goes on, and the writes wait until Redis accepts them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from service.core.redis_refusals import is_write_refusal, refusal_reason

log = logging.getLogger(__name__)

T = TypeVar("T")
# BusyLoadingError (Redis replaying its append-only file after a restart) is a ConnectionError.
RETRYABLE: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


def is_retryable(exc: BaseException) -> bool:
    """Redis is away (a connection error or timeout) or refuses writes for now (full, or cannot persist)."""
    return isinstance(exc, RETRYABLE) or is_write_refusal(exc)
FIRST_WAIT_S = 0.1
LONGEST_WAIT_S = 2.0


class RedisOutage(Exception):
    """Redis has been unreachable for longer than the budget."""

    def __init__(self, what: str, away_s: float, budget_s: float, cause: BaseException | None = None) -> None:
        if cause is not None and is_write_refusal(cause):
            message = (
                f"Redis refused writes for more than {budget_s:.0f} s (HYDRA_REDIS_OUTAGE_S) while the worker tried "
                f"to {what}: {refusal_reason(cause)} ({cause})"
            )
        else:
            message = (
                f"Redis was unreachable for more than {budget_s:.0f} s (HYDRA_REDIS_OUTAGE_S) while the worker "
                f"tried to {what}"
            )
        super().__init__(message)
        self.away_s = away_s


class RedisRetry:
    """One chunk's view of Redis availability: when the current outage began, and how long it may last."""

    def __init__(
        self,
        budget_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self._sleep = sleep
        self.outage_since: float | None = None
        self.refusing = False  # the current outage is Redis refusing writes: only a write that works ends it

    def _failed(self, what: str, error: BaseException) -> float:
        now = self._clock()
        if self.outage_since is None:
            self.outage_since = now
            self.refusing = is_write_refusal(error)
            if self.refusing:
                log.warning("Redis refused a write while trying to %s (%s: %s); retrying for up to %.0f s", what,
                            refusal_reason(error), error, self.budget_s)
            else:
                log.warning("Redis unreachable while trying to %s (%s); retrying for up to %.0f s", what, error,
                            self.budget_s)
        away = now - self.outage_since
        if away > self.budget_s:
            raise RedisOutage(what, away, self.budget_s, error) from error
        return away

    def _succeeded(self, writes: bool) -> None:
        if self.outage_since is not None and (writes or not self.refusing):
            log.warning("Redis is back after %.1f s", self._clock() - self.outage_since)
            self.outage_since = None

    def call(self, what: str, fn: Callable[[], T], *, writes: bool = True) -> T:
        """`fn()`, retried with backoff while Redis is away; RedisOutage once the outage outlasts the budget.

        `writes=False` for reads: a read that works does not end an outage of refused writes (reads still work then).
        """
        wait = FIRST_WAIT_S
        while True:
            try:
                value = fn()
            except redis.RedisError as error:
                if not is_retryable(error):
                    raise
                self._failed(what, error)
                self._sleep(wait)
                wait = min(LONGEST_WAIT_S, wait * 2)
                continue
            self._succeeded(writes)
            return value

    def poll(self, what: str, fn: Callable[[], T], default: T, *, writes: bool = True) -> T:
        """`fn()` once; `default` while Redis is away (within the budget), so the caller need not wait."""
        try:
            value = fn()
        except redis.RedisError as error:
            if not is_retryable(error):
                raise
            self._failed(what, error)
            return default
        self._succeeded(writes)
        return value

    def until_back(self, what: str, fn: Callable[[], T], limit_s: float) -> T:
        """`fn()`, retried for up to `limit_s` whatever the budget (to record an outcome once Redis is back)."""
        patient = RedisRetry(limit_s, clock=self._clock, sleep=self._sleep)
        return patient.call(what, fn)
