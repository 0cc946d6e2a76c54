"""Who is calling: the `X-API-Key` header resolved to a Principal (service/core/api_keys.py) before any handler.

Litestar has no API-key backend, so this is an AbstractAuthenticationMiddleware: it sets `request.user` to a
Principal, and routes marked `exclude_from_auth=True` (health, readiness, the model list) and the /schema routes
stay open. A missing or unknown key is a 401 problem with `WWW-Authenticate: ApiKey`.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi.spec import Components, SecurityScheme

from service.core.api_keys import Principal

API_KEY_HEADER = "X-API-Key"
SECURITY_SCHEME = "ApiKey"  # the OpenAPI security scheme's name, also the WWW-Authenticate challenge
SECURITY: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]  # what protected routes declare in OpenAPI


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Sets `request.user` to the caller's Principal, or answers 401 before any handler runs."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        state = connection.app.state
        key = connection.headers.get(API_KEY_HEADER)
        principal = await state.api_keys.principal(key, state.aredis)
        if principal is None:
            reason = "missing" if not key else "unknown or revoked"
            raise NotAuthorizedException(
                detail=f"API key {reason}: send a valid key in the {API_KEY_HEADER} header",
                headers={"WWW-Authenticate": SECURITY_SCHEME},
            )
        return AuthenticationResult(user=principal, auth=None)


def auth_middleware() -> DefineMiddleware:
    """The middleware as the app installs it: the OpenAPI document and its UIs stay readable without a key."""
    return DefineMiddleware(ApiKeyMiddleware, exclude=["^/schema"])


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """DI provider: handlers ask for `principal` instead of reading request.user themselves."""
    return request.user  # type: ignore[no-any-return]


def security_components() -> Components:
    """The OpenAPI security scheme protected routes refer to."""
    return Components(
        security_schemes={
            SECURITY_SCHEME: SecurityScheme(
                type="apiKey",
                name=API_KEY_HEADER,
                security_scheme_in="header",
                description="An API key from `hydra-ablate keys create NAME` or HYDRA_API_KEYS",
            )
        }
    )
