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
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from litestar.connection import ASGIConnection
from litestar.exceptions import TooManyRequestsException
from litestar.handlers.base import BaseRouteHandler

from service.errors import ValidationProblem
from service.schemas import JobSpec
from service.settings import Settings
from service.store import JobStore

try:  # optional at run time: without it the token cap is skipped, the character cap still applies
    from tokenizers import Tokenizer
except ImportError:  # pragma: no cover - installed with transformers
    Tokenizer = None  # type: ignore[assignment,misc]

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

    async def check(self, bucket: str, name: str) -> None:
        """Count one request; TooManyRequestsException with Retry-After once the window's limit is spent."""
        limit = self.limits[bucket]
        if limit <= 0:
            return
        count, ttl_ms = await self._hit(keys=[self.counter_key(bucket, name)], args=[self.window_ms])
        if int(count) > limit:
            retry_after = max(1, math.ceil(int(ttl_ms) / 1000))
            kind = "submit and cancel" if bucket == "write" else "read"
            raise TooManyRequestsException(
                detail=(
                    f"rate limit: at most {limit} {kind} requests per {self.window_ms // 1000} s for key "
                    f"{name!r}; retry in {retry_after} s"
                ),
                headers={"Retry-After": str(retry_after)},
            )


async def rate_limit(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard on the job routes (after authentication, so it counts per key, not per IP)."""
    bucket = "write" if connection.scope.get("method") in WRITE_METHODS else "read"
    await connection.app.state.limiter.check(bucket, connection.user.name)


class TokenCounters:
    """Per-model token counters built from the published tokenizer JSON, re-read at most every `refresh_s`.

    Parsing a 50k-vocabulary tokenizer takes ~0.1 s, so a parsed one is kept and only rebuilt when the published
    JSON changes; the short refresh means a worker publishing a new tokenizer is noticed within a minute.
    """

    def __init__(self, refresh_s: float = 60.0) -> None:
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str | None, Any]] = {}  # model -> (fetched at, JSON digest, tokenizer)

    def get(self, store: JobStore, model_id: str) -> Any | None:
        """The model's tokenizers.Tokenizer, or None when none is published (or the package is missing)."""
        if Tokenizer is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(model_id)
        if cached is not None and now - cached[0] < self.refresh_s:
            return cached[2]
        text = store.tokenizer_json(model_id)
        digest = None if text is None else hashlib.sha256(text.encode()).hexdigest()
        if cached is not None and cached[1] == digest:
            tokenizer = cached[2]
        else:
            tokenizer = None if text is None else _parse(text)
        with self._lock:
            self._cache[model_id] = (now, digest, tokenizer)
        return tokenizer


def _parse(text: str) -> Any | None:
    try:
        return Tokenizer.from_str(text)
    except Exception:  # a malformed publication must not take submissions down: skip the check instead
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
    encodings = tokenizer.encode_batch(list(spec.prompts))
    for index, encoding in enumerate(encodings):
        count = len(encoding.ids)
        if count > settings.max_prompt_tokens:
            raise ValidationProblem(
                f"prompts[{index}] is {count:,} tokens long for model {spec.model}, above this server's limit of "
                f"{settings.max_prompt_tokens:,} tokens per prompt; shorten it",
                f"prompts[{index}]",
            )
