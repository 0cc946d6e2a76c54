"""Redis refusing writes while it still answers reads, told apart from other errors. No torch, no HTTP.

Redis refuses every write (and keeps serving reads) in two situations an operator fixes without restarting it:

- it reached `maxmemory` with the noeviction policy: "OOM command not allowed when used memory > 'maxmemory'";
- it cannot persist: the append-only file cannot be written ("MISCONF Errors writing to the AOF file: No space
  left on device") or, with RDB snapshots configured, the last one failed ("MISCONF Redis is configured to save
  RDB snapshots, but it's currently unable to persist to disk").

redis-py raises OutOfMemoryError for the first and a plain ResponseError for the second; from inside a Lua script
both arrive as "Error running script ... -OOM ..." / "... -MISCONF ..." (Redis 6) or with their own prefix (Redis 7).
`register_refusal_errors` makes redis-py raise `WritesRefused` for MISCONF replies, so that a class names every
refusal (kombu's transport needs a class: worker/broker_transport.py); `is_write_refusal` also reads messages, for
scripts.
"""

from __future__ import annotations

import redis
from redis._parsers.base import BaseParser

OOM_TEXT = "OOM command not allowed"
MISCONF_TEXT = "MISCONF"


class WritesRefused(redis.ResponseError):
    """A MISCONF reply: Redis cannot persist (its append-only file or snapshot), so it refuses writes."""


# The classes a refused write is raised as once `register_refusal_errors` ran (scripts aside).
REFUSAL_ERRORS: tuple[type[redis.ResponseError], ...] = (redis.exceptions.OutOfMemoryError, WritesRefused)


def register_refusal_errors() -> None:
    """Make redis-py raise WritesRefused for MISCONF replies in this process (idempotent).

    redis-py maps a reply's error code to an exception class through its parsers' table (OOM -> OutOfMemoryError,
    READONLY -> ReadOnlyError, ...), which has no entry for MISCONF; one is added, a ResponseError still.
    """
    BaseParser.EXCEPTION_CLASSES.setdefault(MISCONF_TEXT, WritesRefused)


def is_write_refusal(exc: BaseException) -> bool:
    """A write refused because Redis is full or cannot persist (directly, or from inside a script)."""
    if isinstance(exc, REFUSAL_ERRORS):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    return text.startswith(MISCONF_TEXT) or OOM_TEXT in text or f"-{MISCONF_TEXT} " in text


def refusal_reason(exc: BaseException) -> str:
    """What an operator reads: why Redis refuses writes and what to change."""
    text = str(exc)
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or OOM_TEXT in text:
        return "Redis is full (it reached maxmemory with the noeviction policy): raise maxmemory or free memory"
    return (
        "Redis cannot persist (it failed to write its append-only file or snapshot: a full or read-only disk?); "
        "fix the disk, Redis then accepts writes again"
    )
