"""Types of Redis replies at the redis-py boundary.

Every Redis client of this project is made without `decode_responses` (results and specs are stored as raw bytes),
so every string in a reply is `bytes`. redis-py types its replies `bytes | str` (it cannot know how the connection
was made), and stream and sorted-set replies as unions over RESP2 and RESP3 shapes; these helpers narrow them to
what a RESP2 connection without `decode_responses` returns. Each is a `typing.cast`: nothing is checked, copied or
converted at runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, cast

from redis.typing import EncodableT, FieldT

__all__ = [
    "EncodableT",
    "FieldT",
    "ScriptArgs",
    "StreamEntry",
    "as_bytes",
    "bytes_hash",
    "bytes_list",
    "bytes_or_none",
    "optional_bytes_list",
    "scored_members",
    "stream_entries",
    "stream_read",
]

# What a Lua script (or a command) accepts as arguments: bytes, str, int or float.
ScriptArgs: TypeAlias = "list[EncodableT]"
# One stream entry: its id and its fields.
StreamEntry: TypeAlias = "tuple[bytes, dict[bytes, bytes]]"


def as_bytes(value: bytes | str) -> bytes:
    """A string reply (GET of a present key, HGET of a present field, a stream or entry id)."""
    return cast(bytes, value)


def bytes_or_none(value: bytes | str | None) -> bytes | None:
    """A string reply that may be nil (GET, HGET)."""
    return cast("bytes | None", value)


def bytes_list(values: Sequence[Any]) -> list[bytes]:
    """A list of strings (LRANGE, SMEMBERS as a list, ZRANGE and ZRANGEBYSCORE without scores)."""
    return cast("list[bytes]", values)


def optional_bytes_list(values: Sequence[bytes | str | None]) -> list[bytes | None]:
    """A list of strings that may be nil (HMGET, MGET)."""
    return cast("list[bytes | None]", values)


def scored_members(values: Sequence[Any]) -> list[tuple[bytes, float]]:
    """ZRANGE and ZRANGEBYSCORE WITHSCORES: (member, score) pairs."""
    return cast("list[tuple[bytes, float]]", values)


def bytes_hash(fields: Mapping[bytes | str, bytes | str]) -> dict[bytes, bytes]:
    """A hash (HGETALL)."""
    return cast("dict[bytes, bytes]", fields)


def stream_entries(entries: Sequence[Any] | None) -> list[StreamEntry] | None:
    """XRANGE / XREVRANGE: (id, fields) per entry."""
    return cast("list[StreamEntry] | None", entries)


def stream_read(answer: Any) -> list[tuple[bytes, list[StreamEntry]]] | None:
    """XREAD over RESP2: (stream key, entries) per stream that had any; None when nothing came within `block`."""
    return cast("list[tuple[bytes, list[StreamEntry]]] | None", answer)
