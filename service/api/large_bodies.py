"""Large request bodies are decoded, checked and tokenised in worker threads, a few at a time, never on the loop.

A 10 MB submit (thousands of long prompts) took about 5 s of CPU to decode, validate and count in tokens; on the
event loop that stalled every other request of the process (`/health` answered in 5 s, other keys' status reads
timed out). Bodies of at least HYDRA_LARGE_SUBMIT_BYTES (256 KiB) take this path instead:

- the strict decode (service/api/controllers/jobs.py `_strict_decode`) and the untyped decode Litestar would do next
  run in a thread, whose result Litestar then uses as it is;
- the submit's resolution and token count (service/core/job_actions.py) run in a thread too;
- at most HYDRA_LARGE_SUBMITS (1) such steps run at once per API process (a CapacityLimiter); a large body arriving
  while all are taken is answered 503 at once with a Retry-After of about how long one takes here (the medians of
  the last ones' steps, added up), so that ten at once cannot take the process from the small requests. One at a
  time by default: counting tokens holds the interpreter's lock, so a second thread would not finish sooner (two
  bodies in two threads took 9.1 s here, one after the other 5.8 s) and would leave the event loop less of it.

Smaller bodies, nearly every submit, keep the fast path on the loop (bench/load.py measures it).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from service.core.errors import BackendUnavailable

T = TypeVar("T")
# Retry-After before any large body has finished here: a 10 MB body of long prompts takes 3 to 5 s on a shared
# 2-core machine (its token count, mostly).
FIRST_ESTIMATE_S = 5


class LargeBodies:
    """The per-process bound on large bodies being worked on, and how long one takes (for Retry-After)."""

    def __init__(self, threshold_bytes: int, concurrency: int) -> None:
        self.threshold_bytes = threshold_bytes
        self.concurrency = max(1, concurrency)
        self._limiter: anyio.CapacityLimiter | None = None  # made in the serving loop, on first use
        self._durations: dict[str, deque[float]] = {}  # step -> seconds of its last runs

    def is_large(self, size: int) -> bool:
        return 0 < self.threshold_bytes <= size

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return self._limiter

    def retry_after_s(self) -> int:
        """About how long until a place frees up: a large body's typical time here, its steps' medians added up (at
        least a second)."""
        if "prepare" not in self._durations:
            return FIRST_ESTIMATE_S
        typical = sum(statistics.median(times) for times in self._durations.values() if times)
        return max(1, math.ceil(typical))

    def admit(self, size: int) -> None:
        """Refuse (503 with Retry-After) a large body that would have to wait for a place."""
        limiter = self.limiter
        if limiter.available_tokens < 1 or limiter.statistics().tasks_waiting > 0:
            retry = self.retry_after_s()
            raise BackendUnavailable(
                f"this API process is already working on {self.concurrency} large request bodies (at least "
                f"{self.threshold_bytes:,} bytes; this one is {size:,}), the most it takes at once "
                f"(HYDRA_LARGE_SUBMITS); retry in {retry} s",
                retry_after_s=retry,
            )

    async def run(self, fn: Callable[[], T], step: str) -> T:
        """`fn()` in a worker thread, within the bound (waiting for a place: callers `admit` first); `step` names it
        ("decode", "prepare") for the Retry-After estimate."""
        started = time.monotonic()
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self.limiter)
        finally:
            self._durations.setdefault(step, deque(maxlen=20)).append(time.monotonic() - started)
