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
from litestar.exceptions import NotFoundException, ValidationException
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromPath, PathParameter, QueryParameter

from service.auth import SECURITY
from service.cleanup import figure_key as cache_key
from service.controllers.dependencies import RouteContext
from service.controllers.jobs import finished_result, not_acceptable_response, require_succeeded
from service.controllers.problems import PROTECTED, problem_responses
from service.controllers.strict_query import RATE_LIMITED
from service.exports import negotiate
from service.figures import (
    DPI,
    FIGURE_DESCRIPTIONS,
    FIGURE_MEDIA_TYPES,
    FIGURE_NAMES,
    HEIGHT_PX,
    MAX_DPI,
    MAX_PX,
    MIN_DPI,
    MIN_PX,
    WIDTH_PX,
    FigureFormat,
    FigureName,
    FigureOptionError,
    check_size,
    render,
)
from service.redis_replies import bytes_or_none
from service.schemas import JobResult
from service.store import JobStore

FIGURE_ACCEPT: dict[str, FigureFormat] = {media: fmt for fmt, media in FIGURE_MEDIA_TYPES.items()}


@dataclass(frozen=True)
class FigureOptions:
    """Size and, for `profile`, which prompt and component; part of the cache key."""

    width: int = WIDTH_PX
    height: int = HEIGHT_PX
    dpi: int = DPI
    prompt: int | None = None
    component: str | None = None

    def key_suffix(self) -> str:
        """Empty for the defaults, so the default figure keeps its plain key."""
        if self == FigureOptions():
            return ""
        return f":{self.width}x{self.height}@{self.dpi}:{self.prompt}:{self.component}"


def figure_key(store: JobStore, job_id: str, name: str, fmt: str, options: FigureOptions | None = None) -> str:
    return cache_key(store, job_id, name, fmt, (options or FigureOptions()).key_suffix())


def cached_figure(
    store: JobStore, job_id: str, name: FigureName, fmt: FigureFormat, options: FigureOptions | None = None
) -> bytes:
    """The figure from the cache, else rendered from the stored result and cached until the result expires."""
    options = options or FigureOptions()
    key = figure_key(store, job_id, name, fmt, options)
    cached = bytes_or_none(store.client.get(key))
    if cached is not None:
        return cached
    result = msgspec.json.decode(finished_result(store, job_id), type=JobResult)
    try:
        data = render(result, name, fmt, width=options.width, height=options.height, dpi=options.dpi,
                      prompt=options.prompt, component=options.component)
    except FigureOptionError as error:
        raise ValidationException(detail=str(error)) from error
    ttl_ms = store.client.pttl(store.result_key(job_id))  # -1 no expiry, -2 gone: fall back to the store's TTL
    # The cache must not outlive the result: the result's remaining time is read before the write, so take a
    # margin for the time in between.
    margin_ms = 100
    store.cache_figure(job_id, key, data, max(1, ttl_ms - margin_ms) if ttl_ms > 0 else store.ttl_s * 1000)
    return data


@dataclass
class FigureOperation(Operation):
    """The figure route's OpenAPI operation: PNG and SVG bodies (a ResponseSpec documents one media type)."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
        self.responses = {
            **(self.responses or {}),
            "200": OpenAPIResponse(
                description=f"The figure: PNG of exactly width × height px (default {WIDTH_PX} × {HEIGHT_PX}), or SVG "
                "or PDF of width / dpi × height / dpi inches",
                content={media: OpenAPIMediaType(schema=binary) for media in FIGURE_ACCEPT},
            ),
        }


_NAMES_DOC = "; ".join(f"`{name}`: {FIGURE_DESCRIPTIONS[name]}" for name in FIGURE_NAMES)


class FiguresController(Controller):
    path = "/v1/jobs"
    tags = ("figures",)
    security = SECURITY
    opt = {RATE_LIMITED: True}  # noqa: RUF012 - read by the app's guard (service/controllers/strict_query.py)

    @get(
        "/{job_id:str}/figures/{name:str}",
        sync_to_thread=True,  # rendering is CPU-bound: keep it off the event loop
        summary="A finished job's figure",
        description=(
            f"Figures: {_NAMES_DOC}. Format by `?format=png|svg|pdf` or else the Accept header (image/png, "
            f"image/svg+xml or application/pdf; PNG by default). Size: `width` × `height` px ({MIN_PX}–{MAX_PX}, "
            f"default {WIDTH_PX} × {HEIGHT_PX}) at `dpi` ({MIN_DPI}–{MAX_DPI}, default {DPI}): a PNG is exactly "
            "that many pixels. `prompt` (a position in the result's prompts) and `component` choose the `profile` "
            "figure's example. Rendered on first request and cached as long as the result lives. 400 for an option "
            "out of range, 404 for an unknown job or figure name, 409 until the job has succeeded."
        ),
        responses={**problem_responses(400, *PROTECTED, 404, 409, 503), **not_acceptable_response()},
        operation_class=FigureOperation,
    )
    def get_figure(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        name: Annotated[str, PathParameter(description=f"one of {', '.join(FIGURE_NAMES)}")],
        ctx: NamedDependency[RouteContext],
        format: Annotated[
            FigureFormat | None, QueryParameter(description="png, svg or pdf; overrides the Accept header")
        ] = None,
        width: Annotated[int, QueryParameter(description="width in pixels", ge=MIN_PX, le=MAX_PX)] = WIDTH_PX,
        height: Annotated[int, QueryParameter(description="height in pixels", ge=MIN_PX, le=MAX_PX)] = HEIGHT_PX,
        dpi: Annotated[int, QueryParameter(description="dots per inch", ge=MIN_DPI, le=MAX_DPI)] = DPI,
        prompt: Annotated[
            int | None, QueryParameter(description="profile: a position in the result's prompts (default 0)", ge=0)
        ] = None,
        component: Annotated[
            str | None,
            QueryParameter(description="profile: the ablated component (default: the attention layer with the "
                           "largest Δunembed on that prompt)", max_length=32),
        ] = None,
    ) -> Response[bytes]:
        store, principal = ctx.store, ctx.principal
        if name not in FIGURE_NAMES:
            raise NotFoundException(detail=f"unknown figure {name!r}; figures are {', '.join(FIGURE_NAMES)}")
        fmt, media_type = negotiate(format, request.accept, FIGURE_ACCEPT, "figures")
        try:
            check_size(width, height, dpi)
        except FigureOptionError as error:
            raise ValidationException(detail=str(error)) from error
        require_succeeded(store, job_id, principal)  # another key's job: 404
        options = FigureOptions(width=width, height=height, dpi=dpi, prompt=prompt, component=component)
        data = cached_figure(store, job_id, name, fmt, options)  # type: ignore[arg-type]  # checked above
        disposition = f'inline; filename="{job_id}-{name}.{fmt}"'
        headers = {"Vary": "Accept", "Content-Disposition": disposition}
        return Response(content=data, media_type=media_type, headers=headers)
