"""The app's guard: unknown query parameters are a 400, as unknown body fields are (`?stauts=failed` must not
silently list all jobs), and rate-limited routes count the request.

The guard compares the request's query names with the ones its handler declares (Litestar's own kwargs model of
the handler, computed once per handler and path shape).
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import ValidationException
from litestar.handlers.base import BaseRouteHandler

from service.api.rate_limits import rate_limit

# Keyed by id(), holding the handler too: an id is reused once its object is gone (apps made and dropped, as tests
# do), so an entry counts only for the very handler it was computed for.
_known: dict[tuple[int, frozenset[str]], tuple[BaseRouteHandler, frozenset[str]]] = {}


def _declared(handler: BaseRouteHandler, path_params: frozenset[str]) -> frozenset[str]:
    cache_key = (id(handler), path_params)
    cached = _known.get(cache_key)
    if cached is not None and cached[0] is handler:
        return cached[1]
    # Only the path parameters' names matter to the kwargs model (they are not query parameters).
    model = handler.create_kwargs_model(dict.fromkeys(path_params))  # type: ignore[arg-type]
    names = frozenset(param.field_alias for param in model.expected_query_params)
    _known[cache_key] = (handler, names)
    return names


async def reject_unknown_query(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """400 naming every query parameter the route does not take (and the ones it does)."""
    if not connection.query_params:
        return
    declared = _declared(handler, frozenset(connection.path_params))
    unknown = sorted(set(connection.query_params) - declared)
    if unknown:
        accepted = ", ".join(sorted(declared)) or "none"
        raise ValidationException(
            detail=f"unknown query parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            f"(this route accepts: {accepted})",
            extra=[{"key": name, "source": "query", "message": "unknown query parameter"} for name in unknown],
        )


RATE_LIMITED = "rate_limited"  # a controller's opt key: its routes count against the caller's rate limit


async def request_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app's one guard: unknown query parameters, then the rate limit of routes whose layers set
    `opt={RATE_LIMITED: True}`. One guard, not one per concern: Litestar copies the route handler for each guard
    of each request (a twentieth of a status read's CPU for two)."""
    await reject_unknown_query(connection, handler)
    if handler.opt.get(RATE_LIMITED):
        await rate_limit(connection, handler)
