"""Per-key limits that keep one client from starving the others: request rate and prompt length in tokens.

(The cap on queued + running jobs per key is enforced where jobs are created, atomically, in JobStore.create; the
request body size is Litestar's own `request_max_body_size`, set in the app factory.)

Rate: a fixed window per key and bucket, counted in Redis with one script (INCR, and PEXPIRE on the window's first
request), so every API process behind a load balancer shares the same counters and a burst cannot slip between a
read and a write. Litestar's RateLimitConfig keys on the client IP and does a read-modify-write on its store, which
is neither per key nor race-free across processes, hence this guard.

Tokens: the workers publish each model's tokenizer (Hugging Face `tokenizers` JSON) in Redis; prompts longer than
`max_prompt_tokens` are refused with 422 before they reach a GPU. The `tokenizers` package is Rust, no torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
import redis.asyncio
from litestar.connection import ASGIConnection
from litestar.exceptions import TooManyRequestsException
from litestar.handlers.base import BaseRouteHandler

from service.errors import ValidationProblem
from service.schemas import JobSpec, ModelInfo
from service.settings import Settings
from service.store import JobStore

try:  # optional at run time: without it the token cap is skipped, the character cap still applies
    from tokenizers import Tokenizer
except ImportError:  # pragma: no cover - installed with transformers
    Tokenizer = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# KEYS[1] counter. ARGV[1] window in ms. Returns {count, ms until the window ends}.
_HIT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if count == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


def is_out_of_memory(exc: redis.RedisError) -> bool:
    """A write refused because Redis reached maxmemory (directly, or from inside a script)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(exc)


class RateSpent(Exception):
    """The cause of a rate-limit 429: the limit and when its window resets (for the RateLimit-* headers)."""

    def __init__(self, limit: int, reset_s: int) -> None:
        super().__init__(limit, reset_s)
        self.limit = limit
        self.reset_s = reset_s


RATE_SCRIPT = _HIT  # loaded at the API's start-up with the store's loop scripts


class RateLimiter:
    """Fixed-window request counters per key name and bucket ("read" or "write"), shared through Redis."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.client = client
        self.prefix = settings.key_prefix
        self.window_ms = settings.rate_window_s * 1000
        self.limits = {"read": settings.rate_limit_read, "write": settings.rate_limit_write}
        self._hit = client.register_script(_HIT)

    def counter_key(self, bucket: str, name: str) -> str:
        return f"{self.prefix}rate:{bucket}:{name}"

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
            if not is_out_of_memory(exc):
                raise
            # Redis is full (maxmemory, noeviction): the counter cannot be written. Refusing the request would turn
            # every read into a 503 although reads still work; let it through uncounted (a submit then fails on its
            # own write with a 503 that says Redis is full).
            logger.warning("rate limit not counted for %r: Redis is out of memory (%s)", name, exc)
            return None
        reset_s = max(1, math.ceil(int(ttl_ms) / 1000))
        if int(count) > limit:
            retry_after = reset_s
            kind = "submit and cancel" if bucket == "write" else "read"
            raise TooManyRequestsException(
                detail=(
                    f"rate limit: at most {limit} {kind} requests per {self.window_ms // 1000} s for key "
                    f"{name!r}; retry in {retry_after} s"
                ),
                headers={"Retry-After": str(retry_after)},
            ) from RateSpent(limit, reset_s)
        return limit, limit - int(count), reset_s


async def rate_limit(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard on the job routes (after authentication, so it counts per key, not per IP).

    OPTIONS passes the authentication middleware without a key (CORS preflights carry none), so it has no caller
    to count against; its handler only lists the allowed methods, touching neither Redis nor a model.
    """
    from service.observability import RATE_STATE_KEY

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


class TokenCounters:
    """Per-model token counters built from the published tokenizer JSON, re-read at most every `refresh_s`.

    Parsing a 50k-vocabulary tokenizer takes ~0.1 s, so a parsed one is kept and only rebuilt when the published
    JSON changes; the short refresh means a worker publishing a new tokenizer is noticed within a minute.

    Single flight: one thread per model fetches and parses; on a cold start the others wait for it (50 concurrent
    first submits used to fetch and parse the same 1.6 MB fifty times), and on a refresh they keep using the
    previous tokenizer meanwhile.
    """

    def __init__(self, refresh_s: float = 60.0) -> None:
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str | None, Any]] = {}  # model -> (fetched at, JSON digest, tokenizer)
        self._flights: dict[str, threading.Lock] = {}  # model -> held by the thread loading it
        self.loads = 0  # tokenizers fetched and parsed (for tests and benchmarks)

    def get(self, store: JobStore, model_id: str) -> Any | None:
        """The model's tokenizers.Tokenizer, or None when none is published (or the package is missing)."""
        if Tokenizer is None:
            return None
        with self._lock:
            cached = self._cache.get(model_id)
            flight = self._flights.setdefault(model_id, threading.Lock())
        if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
            return cached[2]
        if not flight.acquire(blocking=cached is None):
            return cached[2] if cached is not None else None  # another thread refreshes it: use the one we have
        try:
            with self._lock:
                cached = self._cache.get(model_id)  # the thread we waited for may have loaded it
            if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
                return cached[2]
            return self._load(store, model_id, cached)
        finally:
            flight.release()

    def keep_warm(
        self,
        store: JobStore,
        stop: threading.Event,
        idle_s: float = 1.0,
        models: Callable[[], Iterable[ModelInfo]] | None = None,
    ) -> None:
        """Parse every advertised model's tokenizer ahead of the requests that need it, and refresh each one before
        it goes stale, until `stop` is set: run in a background thread, so a request never pays for a parse (a
        burst of first submits used to queue behind one), only a model advertised in the last `idle_s` may.
        `models` reads the advertised models (default `store.models`; the app's reads them into its
        ServedModels on the way). Redis errors are skipped: the next round tries again, and a request still loads
        on its own."""
        if Tokenizer is None and models is None:
            return
        read_models = models or store.models
        while not stop.is_set():
            try:
                for info in read_models():
                    if Tokenizer is None:
                        continue
                    with self._lock:
                        cached = self._cache.get(info.id)
                    if cached is None or time.monotonic() - cached[0] > self.refresh_s / 2:
                        self.refresh(store, info.id)
            except Exception as error:  # noqa: BLE001 - Redis away or a malformed record: try again next round
                logger.debug("tokenizer warm-up skipped a round: %s", error)
            stop.wait(idle_s)

    def recent(self, model_id: str) -> tuple[bool, Any | None]:
        """(True, the tokenizer or None when none is published) when a fresh one is kept; (False, None) when `get`
        would read Redis. For the event loop, which must not."""
        if Tokenizer is None:
            return True, None
        with self._lock:
            cached = self._cache.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
            return True, cached[2]
        return False, None

    def refresh(self, store: JobStore, model_id: str) -> None:
        """Fetch (and parse when it changed) one model's tokenizer now, unless another thread is doing so."""
        with self._lock:
            flight = self._flights.setdefault(model_id, threading.Lock())
        if not flight.acquire(blocking=False):
            return
        try:
            with self._lock:
                cached = self._cache.get(model_id)
            self._load(store, model_id, cached)
        finally:
            flight.release()

    def _load(self, store: JobStore, model_id: str, cached: tuple[float, str | None, Any] | None) -> Any | None:
        now = time.monotonic()
        text = store.tokenizer_json(model_id)
        digest = None if text is None else hashlib.sha256(text.encode()).hexdigest()
        if cached is not None and cached[1] == digest:
            tokenizer = cached[2]
        else:
            tokenizer = None if text is None else _parse(text)
            self.loads += 1
        with self._lock:
            self._cache[model_id] = (now, digest, tokenizer)
        return tokenizer


def _parse(text: str) -> Any | None:
    try:
        return Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - a malformed publication must not take submissions down: skip the check
        return None


def check_prompt_tokens(spec: JobSpec, tokenizer_for: Callable[[str], Any | None], settings: Settings) -> None:
    """422 naming the first prompt over `max_prompt_tokens` (with its count); nothing to do without a tokenizer."""
    if settings.max_prompt_tokens <= 0:
        return
    if spec.max_tokens is not None and spec.max_tokens <= settings.max_prompt_tokens:
        return  # every text is cut to max_tokens before it reaches the model
    tokenizer = tokenizer_for(spec.model)
    if tokenizer is None:
        return
    # One prompt at a time: encode_batch hands the prompts to a pool of threads that spin while they wait, twice
    # the CPU for the few short prompts of a typical job, on cores the API shares.
    for index, prompt in enumerate(spec.prompts):
        count = len(tokenizer.encode(prompt).ids)
        if count > settings.max_prompt_tokens:
            raise ValidationProblem(
                f"prompts[{index}] is {count:,} tokens long for model {spec.model}, above this server's limit of "
                f"{settings.max_prompt_tokens:,} tokens per prompt; shorten it",
                f"prompts[{index}]",
            )
