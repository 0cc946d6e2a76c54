"""/v1/jobs/{job_id}/figures/{name}: a finished job's figures, rendered on first request and cached in Redis.

A result never changes once its job succeeded, so a rendered figure is cached under the store's prefix as
`figure:{job_id}:{name}:{format}` for as long as the result itself lives: the second request is a Redis GET.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromPath, PathParameter, QueryParameter

from service.auth import SECURITY, Principal
from service.controllers.jobs import finished_result, not_acceptable_response, require_succeeded
from service.controllers.problems import PROTECTED, problem_responses
from service.exports import negotiate
from service.figures import (
    FIGURE_DESCRIPTIONS,
    FIGURE_MEDIA_TYPES,
    FIGURE_NAMES,
    HEIGHT_PX,
    WIDTH_PX,
    FigureFormat,
    FigureName,
    render,
)
from service.limits import rate_limit
from service.schemas import JobResult
from service.store import JobStore

FIGURE_ACCEPT: dict[str, FigureFormat] = {media: fmt for fmt, media in FIGURE_MEDIA_TYPES.items()}


def figure_key(store: JobStore, job_id: str, name: str, fmt: str) -> str:
    return f"{store.prefix}figure:{job_id}:{name}:{fmt}"


def cached_figure(store: JobStore, job_id: str, name: FigureName, fmt: FigureFormat) -> bytes:
    """The figure from the cache, else rendered from the stored result and cached until the result expires."""
    key = figure_key(store, job_id, name, fmt)
    cached = store.client.get(key)
    if cached is not None:
        return cached
    result = msgspec.json.decode(finished_result(store, job_id), type=JobResult)
    data = render(result, name, fmt)
    ttl_ms = store.client.pttl(store.result_key(job_id))  # -1 no expiry, -2 gone: fall back to the store's TTL
    # The cache must not outlive the result: the result's remaining time is read before the write, so take a
    # margin for the time in between.
    margin_ms = 100
    store.client.set(key, data, px=max(1, ttl_ms - margin_ms) if ttl_ms > 0 else store.ttl_s * 1000)
    return data


@dataclass
class FigureOperation(Operation):
    """The figure route's OpenAPI operation: PNG and SVG bodies (a ResponseSpec documents one media type)."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format="binary")  # type: ignore[arg-type]
        self.responses = {
            **(self.responses or {}),
            "200": OpenAPIResponse(
                description=f"The figure: PNG of exactly {WIDTH_PX} × {HEIGHT_PX} px, or SVG (12 × 8 in)",
                content={media: OpenAPIMediaType(schema=binary) for media in FIGURE_ACCEPT},
            ),
        }


_NAMES_DOC = "; ".join(f"`{name}`: {FIGURE_DESCRIPTIONS[name]}" for name in FIGURE_NAMES)


class FiguresController(Controller):
    path = "/v1/jobs"
    tags = ("figures",)
    security = SECURITY
    guards = [rate_limit]  # noqa: RUF012 - Litestar reads the class attribute

    @get(
        "/{job_id:str}/figures/{name:str}",
        sync_to_thread=True,  # rendering is CPU-bound: keep it off the event loop
        summary="A finished job's figure",
        description=(
            f"Figures: {_NAMES_DOC}. Format by `?format=png|svg` or else the Accept header (image/png or "
            f"image/svg+xml; PNG by default). Fixed size: 12 × 8 in at 100 dpi, so a PNG is exactly {WIDTH_PX} × "
            f"{HEIGHT_PX} px. Rendered on first request and cached as long as the result lives. 404 for an unknown "
            "job or figure name, 409 until the job has succeeded."
        ),
        responses={**problem_responses(400, *PROTECTED, 404, 409, 503), **not_acceptable_response()},
        operation_class=FigureOperation,
    )
    def get_figure(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        name: Annotated[str, PathParameter(description=f"one of {', '.join(FIGURE_NAMES)}")],
        store: NamedDependency[JobStore],
        principal: NamedDependency[Principal],
        format: Annotated[
            FigureFormat | None, QueryParameter(description="png or svg; overrides the Accept header")
        ] = None,
    ) -> Response[bytes]:
        if name not in FIGURE_NAMES:
            raise NotFoundException(detail=f"unknown figure {name!r}; figures are {', '.join(FIGURE_NAMES)}")
        fmt, media_type = negotiate(format, request.accept, FIGURE_ACCEPT, "figures")
        require_succeeded(store, job_id, principal)  # another key's job: 404
        data = cached_figure(store, job_id, name, fmt)  # type: ignore[arg-type]  # checked against FIGURE_NAMES
        disposition = f'inline; filename="{job_id}-{name}.{fmt}"'
        headers = {"Vary": "Accept", "Content-Disposition": disposition}
        return Response(content=data, media_type=media_type, headers=headers)
