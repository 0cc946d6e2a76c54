"""Request ids, access timing, RateLimit-* headers and JSON logs: one ASGI middleware and a log formatter.

- `X-Request-ID`: taken from the request when it is a sane token (1-128 of A-Z a-z 0-9 . _ -), else made here; echoed
  on every response and put on every log record of the request (with the job id when the route has one).
- HTTP latency: observed per method, route template and status into the app's Prometheus registry.
- `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (IETF draft "RateLimit header fields"): on every
  response of a rate-limited route, from what the rate-limit guard counted (service/limits.py).
- `HYDRA_LOG_FORMAT=json`: one JSON object per log line with time, level, logger, message, request_id and job_id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import env_bool

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_STATE_KEY = "hydra_request_id"
RATE_STATE_KEY = "hydra_rate_limit"  # scope["state"] key the rate-limit guard fills: (limit, remaining, reset_s)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("hydra_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("hydra_job_id", default=None)
access_log = logging.getLogger("hydra.access")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_id_for(scope: Scope) -> str:
    given = _header(scope, b"x-request-id")
    return given if given is not None and _SANE_ID.match(given) else uuid.uuid4().hex


def observability_middleware(app: ASGIApp) -> ASGIApp:
    """The outermost middleware of the app (see service/app.py); headers are added by `add_headers`."""

    # HYDRA_ACCESS_LOG=off: no line per request (the local stack's default, whose terminal shows a progress bar);
    # the metrics still count every request.
    log_access = env_bool("HYDRA_ACCESS_LOG", True)

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


async def add_headers(message: Message, scope: Scope) -> None:
    """The app's before_send hook: X-Request-ID and RateLimit-* on every response, errors included (Litestar
    answers exceptions outside the middleware stack, so the middleware cannot add them itself)."""
    if message["type"] != "http.response.start":
        return
    state = scope.get("state", {})
    request_id = state.get(REQUEST_ID_STATE_KEY) or request_id_for(scope)
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", request_id.encode()))
    rate = state.get(RATE_STATE_KEY)
    if rate is not None:
        limit, remaining, reset_s = rate
        headers += [
            (b"ratelimit-limit", str(limit).encode()),
            (b"ratelimit-remaining", str(remaining).encode()),
            (b"ratelimit-reset", str(reset_s).encode()),
        ]
    message["headers"] = headers  # type: ignore[typeddict-unknown-key]


class ContextFilter(logging.Filter):
    """Puts the current request id and job id on every record (None outside a request or task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "job_id") or record.job_id is None:
            record.job_id = job_id_var.get()
        return True


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, job_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in document:
                document[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def json_logs_requested() -> bool:
    value = os.environ.get("HYDRA_LOG_FORMAT", "text").strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"HYDRA_LOG_FORMAT must be text or json, got {value!r}")
    return value == "json"


def configure_json_logging(level: int = logging.INFO) -> None:
    """Route every logger through one JSON handler on stderr (called when HYDRA_LOG_FORMAT=json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("litestar", "uvicorn", "uvicorn.access", "uvicorn.error", "celery", "hydra.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
