"""The service's exceptions and how each becomes an RFC 9457 problem-details response.

Domain code (resolve, store) raises plain exceptions; only this module knows their HTTP status, so the
mapping lives in one place and every error leaves the API as `application/problem+json`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import redis
from litestar.exceptions import HTTPException
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException

from service.store import ActiveJobsExceeded

logger = logging.getLogger(__name__)


class ValidationProblem(Exception):
    """A job request that parses but cannot run (unknown model, layer out of range, …): answered with 422."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class BackendUnavailable(Exception):
    """Redis or the broker did not answer: the request may succeed later, so 503 rather than 500."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _phrase(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def _field_errors(extra: Any) -> list[dict[str, Any]] | None:
    """Litestar's request validation puts one {message, key, source} per bad field in `extra`."""
    if isinstance(extra, list) and all(isinstance(item, Mapping) for item in extra):
        return [dict(item) for item in extra]
    return None


def _where(error: Mapping[str, Any]) -> str:
    key = error.get("key")
    if key in (None, "", "data"):
        return str(error.get("source") or "request")
    return str(key)


def http_to_problem(exc: HTTPException) -> ProblemDetailsException:
    """Title is the status phrase and `detail` says exactly what was wrong, field errors spelled out."""
    detail = exc.detail or _phrase(exc.status_code)
    extra: dict[str, Any] | None = None
    errors = _field_errors(exc.extra)
    if errors:
        detail = f"{detail}: " + "; ".join(f"{_where(e)}: {e.get('message', 'invalid')}" for e in errors)
        extra = {"errors": errors}
    elif isinstance(exc.extra, Mapping) and exc.extra:
        extra = dict(exc.extra)
    return ProblemDetailsException(
        status_code=exc.status_code,
        title=_phrase(exc.status_code),
        detail=detail,
        headers=exc.headers,
        extra=extra,
    )


def validation_to_problem(exc: ValidationProblem) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=HTTPStatus.UNPROCESSABLE_ENTITY,
        title=_phrase(HTTPStatus.UNPROCESSABLE_ENTITY),
        detail=exc.detail,
        extra={"field": exc.field} if exc.field else None,
    )


def unavailable_to_problem(exc: BackendUnavailable) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=HTTPStatus.SERVICE_UNAVAILABLE,
        title=_phrase(HTTPStatus.SERVICE_UNAVAILABLE),
        detail=exc.detail,
        headers={"Retry-After": "5"},
    )


def quota_to_problem(exc: ActiveJobsExceeded) -> ProblemDetailsException:
    """429 without Retry-After: when a slot frees up depends on how long the owner's jobs run, not on a clock."""
    return ProblemDetailsException(
        status_code=HTTPStatus.TOO_MANY_REQUESTS,
        title=_phrase(HTTPStatus.TOO_MANY_REQUESTS),
        detail=(
            f"too many jobs in flight: key {exc.owner!r} has {exc.active} queued or running jobs and this server "
            f"allows {exc.cap}; wait for one to finish or cancel one (DELETE /v1/jobs/{{id}})"
        ),
    )


def redis_to_problem(exc: redis.RedisError) -> ProblemDetailsException:
    logger.warning("redis error while serving a request: %s", exc)
    return unavailable_to_problem(BackendUnavailable(f"the job store (Redis) is unavailable: {exc}"))


def unexpected_to_problem(exc: Exception) -> ProblemDetailsException:
    """A bug, not bad input: logged with its traceback, answered without internals."""
    logger.error("unhandled error", exc_info=exc)
    return ProblemDetailsException(
        status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
        title=_phrase(HTTPStatus.INTERNAL_SERVER_ERROR),
        detail="internal error; the server log has the details",
    )


def problem_details_config() -> ProblemDetailsConfig:
    """Every HTTP exception and every domain exception answered as problem details."""
    return ProblemDetailsConfig(
        enable_for_all_http_exceptions=True,
        exception_to_problem_detail_map={
            HTTPException: http_to_problem,
            ValidationProblem: validation_to_problem,
            BackendUnavailable: unavailable_to_problem,
            ActiveJobsExceeded: quota_to_problem,
            redis.RedisError: redis_to_problem,
            Exception: unexpected_to_problem,
        },
    )
