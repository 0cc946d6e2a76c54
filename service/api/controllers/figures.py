"""/v1/jobs/{job_id}/figures/{name}: a finished job's figures, rendered on first request and cached in Redis
(service/rendering/figure_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromPath, PathParameter, QueryParameter

from hydra_ablate_client.vocabulary import FIGURE_MEDIA_TYPES, FIGURE_NAMES, FigureFormat
from service.api.auth import SECURITY
from service.api.controllers.dependencies import RouteContext
from service.api.controllers.problems import PROTECTED, not_acceptable_response, problem_responses
from service.api.controllers.strict_query import RATE_LIMITED
from service.api.negotiation import negotiate
from service.core.job_actions import require_succeeded
from service.rendering.figure_cache import FigureOptions, cached_figure
from service.rendering.figure_style import FigureOptionError
from service.rendering.figures import (
    DPI,
    FIGURE_DESCRIPTIONS,
    HEIGHT_PX,
    MAX_DPI,
    MAX_PX,
    MIN_DPI,
    MIN_PX,
    WIDTH_PX,
    check_size,
)

FIGURE_ACCEPT: dict[str, FigureFormat] = {media: fmt for fmt, media in FIGURE_MEDIA_TYPES.items()}


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
    opt = {RATE_LIMITED: True}  # noqa: RUF012 - read by the app's guard (service/api/controllers/strict_query.py)

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
        try:
            data = cached_figure(store, job_id, name, fmt, options)  # type: ignore[arg-type]  # checked above
        except FigureOptionError as error:  # e.g. a `prompt` past the result's prompts
            raise ValidationException(detail=str(error)) from error
        disposition = f'inline; filename="{job_id}-{name}.{fmt}"'
        headers = {"Vary": "Accept", "Content-Disposition": disposition}
        return Response(content=data, media_type=media_type, headers=headers)
