"""Choosing a format per request: the result endpoint (JSON, MessagePack, CSV, Parquet) and the figures endpoint
(PNG, SVG) both do it the same way: an explicit `?format=` wins, else the Accept header, else the first format
offered; nothing acceptable is 406. And whether a response may be gzipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from litestar.datastructures import Accept
from litestar.exceptions import ClientException
from litestar.status_codes import HTTP_406_NOT_ACCEPTABLE

from hydra_ablate_client.vocabulary import ExportFormat

# Accept header values understood by the result endpoint, in the order preferred for `*/*`.
EXPORT_ACCEPT: dict[str, ExportFormat] = {
    "application/json": "json",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
    "text/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}

F = TypeVar("F", bound=str)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip` or `*` with a non-zero q; RFC 9110 12.5.3)."""
    if not accept_encoding:
        return False
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[name.strip().lower()] = q
    if "gzip" in weights:
        return weights["gzip"] > 0
    return weights.get("*", 0.0) > 0


def negotiate(query: F | None, accept: Accept, offered: Mapping[str, F], what: str) -> tuple[F, str]:
    """(format, media type) for a request; `offered` maps media types to formats, the first is the default.

    `?format=` wins; its media type is the first one offered for that format. Otherwise the Accept header's best
    match (the first offered for `*/*` or no header). Raises 406 when the header accepts none of them.
    """
    if query is not None:
        return query, next(media for media, fmt in offered.items() if fmt == query)
    media = accept.best_match(list(offered))
    if media is None or media not in offered:
        choices = ", ".join(offered)
        formats = "|".join(dict.fromkeys(offered.values()))
        raise ClientException(
            status_code=HTTP_406_NOT_ACCEPTABLE,
            detail=f"none of the accepted media types ({', '.join(accept)}) is available: {what} come as "
            f"{choices} (or ask with ?format={formats})",
        )
    return offered[media], media
