"""A JobResult in the result endpoint's formats (JSON, MessagePack, CSV), and choosing a format per request.

JSON is what the worker stored and is served as is; MessagePack and CSV are derived from the decoded result, so all
three carry the same numbers. Negotiation lives here too because the figures endpoint chooses PNG or SVG the same
way: an explicit `?format=` wins, else the Accept header, else the first format offered; nothing acceptable is 406.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Literal, TypeVar

import msgspec
from litestar.datastructures import Accept
from litestar.exceptions import ClientException
from litestar.status_codes import HTTP_406_NOT_ACCEPTABLE

from service.schemas import JobResult

ExportFormat = Literal["json", "msgpack", "csv", "parquet"]
EXPORT_MEDIA_TYPES: dict[ExportFormat, str] = {
    "json": "application/json",
    "msgpack": "application/msgpack",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",  # service/parquet.py, streamed
}
# Accept header values understood by the result endpoint, in the order preferred for `*/*`.
EXPORT_ACCEPT: dict[str, ExportFormat] = {
    "application/json": "json",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
    "text/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}
CSV_COLUMNS = (
    "prompt_index",
    "prompt",
    "target_id",
    "target_token",
    "component",
    "total_effect",
    "direct_effect",
    "compensation",
    "norm_response",
    "clean_metric",
    "near_tie",
)

F = TypeVar("F", bound=str)


def to_msgpack(result: JobResult) -> bytes:
    return msgspec.msgpack.encode(result)


def to_csv(result: JobResult) -> bytes:
    """One row per prompt × component (prompt-major, components in the result's order), UTF-8, CRLF rows.

    Floats are written with Python's shortest round-trip repr, so reading them back gives the same numbers.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for index, prompt in enumerate(result.prompts):
        for c, component in enumerate(result.components):
            writer.writerow(
                (
                    index,
                    prompt.prompt,
                    prompt.target_id,
                    prompt.target_token,
                    component,
                    repr(prompt.total_effect[c]),
                    repr(prompt.direct_effect[c]),
                    repr(prompt.compensation[c]),
                    repr(prompt.norm_response[c]),
                    repr(prompt.clean_metric),
                    "true" if prompt.near_tie else "false",
                )
            )
    return buffer.getvalue().encode("utf-8")


def export(stored: bytes, fmt: ExportFormat) -> bytes:
    """The stored JSON result in `fmt`; JSON is returned untouched (no decode/encode of a possibly large body)."""
    if fmt == "json":
        return stored
    result = msgspec.json.decode(stored, type=JobResult)
    if fmt == "parquet":
        from service.parquet import to_parquet  # pyarrow is heavy: imported on first use

        return to_parquet(result)
    return to_msgpack(result) if fmt == "msgpack" else to_csv(result)


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
