"""Request ids, access timing and RateLimit-* headers: one ASGI middleware and a before-send hook.

- `X-Request-ID`: taken from the request when it is a sane token (1-128 of A-Z a-z 0-9 . _ -), else made here; echoed
  on every response and put on every log record of the request (with the job id when the route has one).
- HTTP latency: observed per method, route template and status into the app's Prometheus registry.
- `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (IETF draft "RateLimit header fields"): on every
  response of a rate-limited route, from what the rate-limit guard counted (service/api/rate_limits.py).
- `HYDRA_LOG_FORMAT=json`: one JSON object per log line with time, level, logger, message, request_id and job_id
  (service/core/json_logging.py, which the worker uses too).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.core.json_logging import job_id_var, request_id_var

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_STATE_KEY = "hydra_request_id"
RATE_STATE_KEY = "hydra_rate_limit"  # scope["state"] key the rate-limit guard fills: (limit, remaining, reset_s)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

access_log = logging.getLogger("hydra.access")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_id_for(scope: Scope) -> str:
    given = _header(scope, b"x-request-id")
    return given if given is not None and _SANE_ID.match(given) else uuid.uuid4().hex


def observability_middleware(app: ASGIApp, log_access: bool = True) -> ASGIApp:
    """The outermost middleware of the app (see service/api/app.py); headers are added by `add_headers`.

    `log_access` (Settings.access_log, HYDRA_ACCESS_LOG): off, no line per request (the local stack's default,
    whose terminal shows a progress bar); the metrics still count every request."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        scope.setdefault("state", {})[REQUEST_ID_STATE_KEY] = request_id
        job_id = (scope.get("path_params") or {}).get("job_id")
        tokens = (request_id_var.set(request_id), job_id_var.set(job_id))
        started = time.perf_counter()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, send_recording)
        except Exception as exc:  # answered by Litestar's exception handling outside this middleware
            status = int(getattr(exc, "status_code", 500))
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"
            method = scope.get("method", "")
            metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if metrics is not None:
                metrics.observe_http(method, route, status, elapsed)
            if log_access:
                access_log.info(
                    "%s %s %d %.1f ms", method, scope.get("path", ""), status, elapsed * 1000,
                    extra={"route": route, "status_code": status, "duration_ms": round(elapsed * 1000, 3)},
                )
            request_id_var.reset(tokens[0])
            job_id_var.reset(tokens[1])

    return middleware


# On every response: no page of this server may be framed by another site (clickjacking of the web page's forms),
# no body is sniffed into another type. The web page (/ui) also gets a policy that runs only this server's own
# files: its one script and stylesheet are files under /ui/static, and it has no inline script or style.
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
UI_CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


async def add_headers(message: Message, scope: Scope) -> None:
    """The app's before_send hook: X-Request-ID, RateLimit-* and the security headers on every response, errors
    included (Litestar answers exceptions outside the middleware stack, so the middleware cannot add them)."""
    if message["type"] != "http.response.start":
        return
    state = scope.get("state", {})
    request_id = state.get(REQUEST_ID_STATE_KEY) or request_id_for(scope)
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", request_id.encode()))
    headers += SECURITY_HEADERS
    if str(scope.get("path", "")).startswith("/ui"):
        headers.append((b"content-security-policy", UI_CONTENT_SECURITY_POLICY))
    rate = state.get(RATE_STATE_KEY)
    if rate is not None:
        limit, remaining, reset_s = rate
        headers += [
            (b"ratelimit-limit", str(limit).encode()),
            (b"ratelimit-remaining", str(remaining).encode()),
            (b"ratelimit-reset", str(reset_s).encode()),
        ]
    message["headers"] = headers  # type: ignore[typeddict-unknown-key]
