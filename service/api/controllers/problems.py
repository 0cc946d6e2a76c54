"""Every error leaves the API as an RFC 9457 problem-details document (application/problem+json): the one place
that maps domain errors (service/core/errors.py, plain exceptions) and HTTP exceptions to a status and a document, and
the OpenAPI documentation of those error responses.

The responses are declared per route so generated clients and schema fuzzers know each route's failure modes;
Litestar's own automatic 400 entry (plain JSON, another shape) is replaced by these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import redis
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException
from litestar.status_codes import HTTP_406_NOT_ACCEPTABLE

from hydra_ablate_client.wire import ProblemDetails
from service.api.stream_slots import TooManyStreams
from service.core.errors import BackendUnavailable, JobConflict, JobNotFound, ValidationProblem
from service.core.redis_refusals import is_write_refusal, refusal_reason
from service.core.store import ActiveJobsExceeded

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

_DESCRIPTIONS = {
    400: "Malformed request: bad JSON, an unknown field, a wrong type or a value out of bounds",
    401: "No API key, or an unknown or revoked one (X-API-Key); answered with `WWW-Authenticate: ApiKey`",
    404: "No such job (never existed, expired, or owned by another API key)",
    409: "The job is not in a state that allows this",
    413: "The request body is larger than this server accepts (HYDRA_MAX_BODY_BYTES)",
    422: (
        "Well-formed but cannot run: unknown model, component out of range, mismatched lists, too many ablations, "
        "a prompt over the token limit"
    ),
    429: (
        "Rate limit spent (with Retry-After, in seconds), or too many queued and running jobs for this API key "
        "(no Retry-After: wait for a job to finish)"
    ),
    503: "Redis, the broker or the workers are not available",
}

# Every route that needs a key can answer these, besides its own.
PROTECTED = (401, 429)



def problem_responses(*status_codes: int, descriptions: dict[int, str] | None = None) -> dict[int, ResponseSpec]:
    """ResponseSpecs for the given error statuses, all documented as problem details; `descriptions` overrides."""
    texts = {**_DESCRIPTIONS, **(descriptions or {})}
    return {
        code: ResponseSpec(
            data_container=ProblemDetails,
            media_type=PROBLEM_JSON,
            description=texts[code],
            generate_examples=False,
        )
        for code in status_codes
    }


def not_acceptable_response() -> dict[int, ResponseSpec]:
    """The 406 entry of a negotiating route's OpenAPI responses (problems.problem_responses has no 406)."""
    return {
        HTTP_406_NOT_ACCEPTABLE: ResponseSpec(
            data_container=ProblemDetails,
            media_type=PROBLEM_JSON,
            description="The Accept header allows none of the route's media types (the detail lists them)",
            generate_examples=False,
        )
    }


def held_request_responses() -> dict[int, ResponseSpec]:
    """The errors of the routes that may hold a request open (an event stream, a long poll): their 429 also
    covers the caps on held requests."""
    held_429 = (
        "Rate limit spent (with Retry-After, in seconds), or too many event streams and waiting long polls held "
        "open, for this API key (HYDRA_MAX_STREAMS_PER_KEY) or on this server process (HYDRA_MAX_STREAMS), also "
        "with Retry-After; close a stream, or poll without `wait`, meanwhile"
    )
    return problem_responses(400, *PROTECTED, 404, 503, descriptions={429: held_429})


# --- exceptions to problem details --------------------------------------------------------------------------


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


def not_found_to_problem(exc: JobNotFound) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=HTTPStatus.NOT_FOUND, title=_phrase(HTTPStatus.NOT_FOUND), detail=exc.detail
    )


def conflict_to_problem(exc: JobConflict) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=HTTPStatus.CONFLICT, title=_phrase(HTTPStatus.CONFLICT), detail=exc.detail
    )


def unavailable_to_problem(exc: BackendUnavailable) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=HTTPStatus.SERVICE_UNAVAILABLE,
        title=_phrase(HTTPStatus.SERVICE_UNAVAILABLE),
        detail=exc.detail,
        headers={"Retry-After": str(exc.retry_after_s)},
    )


def _too_many(detail: str, headers: dict[str, str] | None = None) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=HTTPStatus.TOO_MANY_REQUESTS,
        title=_phrase(HTTPStatus.TOO_MANY_REQUESTS),
        detail=detail,
        headers=headers,
    )


def streams_to_problem(exc: TooManyStreams) -> ProblemDetailsException:
    """429 with Retry-After: held requests end on their own (a long poll within a minute)."""
    if exc.per_key:
        where = f"key {exc.owner!r} holds {exc.held}, the most this server allows per key (HYDRA_MAX_STREAMS_PER_KEY)"
    else:
        where = f"this server process holds {exc.held}, the most it allows in all (HYDRA_MAX_STREAMS)"
    return _too_many(
        f"too many event streams and waiting long polls: {where}; close one, or poll without `wait`, and retry in "
        f"{exc.retry_after_s} s",
        headers={"Retry-After": str(exc.retry_after_s)},
    )


def quota_to_problem(exc: ActiveJobsExceeded) -> ProblemDetailsException:
    """429 without Retry-After: when a slot frees up depends on how long the owner's jobs run, not on a clock."""
    return _too_many(
        f"too many jobs in flight: key {exc.owner!r} has {exc.active} queued or running jobs and this server "
        f"allows {exc.cap}; wait for one to finish or cancel one (DELETE /v1/jobs/{{id}})"
    )


def redis_to_problem(exc: redis.RedisError) -> ProblemDetailsException:
    logger.warning("redis error while serving a request: %s", exc)
    if is_write_refusal(exc):  # reads still work: only what writes is refused, saying why
        detail = f"the job store (Redis) refuses writes for now: {refusal_reason(exc)} ({exc}); nothing was changed"
        return unavailable_to_problem(BackendUnavailable(detail))
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
            JobNotFound: not_found_to_problem,
            JobConflict: conflict_to_problem,
            BackendUnavailable: unavailable_to_problem,
            ActiveJobsExceeded: quota_to_problem,
            TooManyStreams: streams_to_problem,
            redis.RedisError: redis_to_problem,
            Exception: unexpected_to_problem,
        },
    )
