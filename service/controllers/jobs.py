"""/v1/jobs: submit, inspect, fetch results of and cancel ablation jobs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_406_NOT_ACCEPTABLE, HTTP_409_CONFLICT

from service.auth import SECURITY, Principal
from service.chunks import ChunkBook
from service.controllers.problems import PROBLEM_JSON, PROTECTED, problem_responses
from service.errors import BackendUnavailable
from service.exports import (
    CSV_COLUMNS,
    EXPORT_ACCEPT,
    POSITION_CSV_COLUMNS,
    ExportFormat,
    export,
    has_positions,
    negotiate,
    position_csv_rows,
    summary_of,
    to_csv,
)
from service.idempotency import IDEMPOTENCY_HEADER, REPLAYED_HEADER, IdempotencyRecords
from service.limits import TokenCounters, check_prompt_tokens, rate_limit
from service.queue import JobQueue
from service.resolve import ablation_count, resolve
from service.schemas import JobPage, JobRequest, JobResult, JobStatus, ProblemDetails, Summary
from service.settings import Settings
from service.store import JobStore

logger = logging.getLogger(__name__)

JobId = FromPath[str]
MAX_OFFSET = 1_000_000_000  # far beyond any real listing; Redis ranges reject offsets past 64-bit integers


def _conflict(detail: str) -> ClientException:
    return ClientException(status_code=HTTP_409_CONFLICT, detail=detail)


def _not_found(job_id: str) -> NotFoundException:
    return NotFoundException(detail=f"job {job_id} not found (unknown, or its results have expired)")


def visible_status(store: JobStore, job_id: str, principal: Principal | None) -> JobStatus:
    """The job's status, or 404 when it does not exist or belongs to another key: the same answer for both, so a
    key cannot probe which job ids exist."""
    status = store.status(job_id)
    if status is None or (principal is not None and not principal.may_see(status.owner)):
        raise _not_found(job_id)
    return status


def require_succeeded(store: JobStore, job_id: str, principal: Principal | None = None) -> None:
    """404 for an unknown (or another key's) job, 409 (saying why) until it has succeeded: shared by the result and
    figure routes."""
    status = visible_status(store, job_id, principal)
    if status.status in ("queued", "running"):
        done, total = status.progress.done, status.progress.total
        raise _conflict(f"job {job_id} is {status.status} ({done}/{total} ablations done); no result yet")
    if status.status == "failed":
        raise _conflict(f"job {job_id} failed: {status.error or 'no error message'}")
    if status.status == "cancelled":
        raise _conflict(f"job {job_id} was cancelled; it has no result")


def finished_result(store: JobStore, job_id: str, principal: Principal | None = None) -> bytes:
    """The stored result of a succeeded job; 404 when it expired between the status check and the read."""
    require_succeeded(store, job_id, principal)
    result = store.result(job_id)
    if result is None:
        raise _not_found(job_id)
    return result


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


@dataclass
class ResultOperation(Operation):
    """The result route's OpenAPI operation: MessagePack and CSV beside JSON (a ResponseSpec documents one type)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if not isinstance(ok, OpenAPIResponse) or not ok.content or "application/json" not in ok.content:
            return
        schema = ok.content["application/json"].schema
        ok.description = "The job's result: JSON (default), MessagePack of the same JobResult, or CSV"
        ok.content["application/msgpack"] = OpenAPIMediaType(schema=schema)
        ok.content["text/csv"] = OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.STRING,
                description="A header row (" + ",".join(CSV_COLUMNS) + ") then one row per prompt × component",
            )
        )


def queue_job(
    data: JobRequest,
    job_id: str | None,
    principal: Principal,
    store: JobStore,
    queue: JobQueue,
    settings: Settings,
    tokens: TokenCounters,
) -> JobStatus:
    """Resolve and check the request, register the job under the caller (within its cap) and hand it to Celery."""
    models = {info.id: info for info in store.models()}
    spec = resolve(data, models, settings, store.refused_models())
    check_prompt_tokens(spec, lambda model_id: tokens.get(store, model_id), settings)
    status = store.create(spec, ablation_count(spec), principal.name, job_id=job_id, max_active=settings.max_active_jobs)
    try:
        queue.enqueue(status.id)
    except Exception as exc:  # kombu raises its own OperationalError family; any failure means not queued
        store.mark_failed(status.id, f"could not be queued: {exc}")
        raise BackendUnavailable(f"the job queue is unavailable, job {status.id} was not queued: {exc}") from exc
    return status


def cancel_job(store: JobStore, queue: JobQueue, job_id: str, principal: Principal | None) -> JobStatus:
    """Cancel a queued or running job: 404 for an unknown (or another key's) job, 409 once it has finished."""
    visible_status(store, job_id, principal)  # another key's job: 404, and it stays as it is
    status = store.request_cancel(job_id)
    if status is None:
        raise _not_found(job_id)
    if status.status in ("succeeded", "failed"):
        raise _conflict(f"job {job_id} already {status.status}; there is nothing to cancel")
    # Queued chunks are dropped now; a running chunk sees the job cancelled at its next prompt. The cancel is
    # already stored: if the broker cannot take the revoke, chunks that start later skip themselves anyway.
    try:
        queue.revoke(ChunkBook.for_store(store).pending_task_ids(job_id))
    except Exception:  # noqa: BLE001 - kombu's errors are not RedisError; the answer stays the stored cancel
        logger.warning("job %s: could not revoke its queued chunks", job_id, exc_info=True)
    return status


IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=255,
        description=(
            "Makes the submit safe to retry: the same key (per API key) with the same body answers with the job "
            "the first request created (202, same id, `Idempotent-Replayed: true`) and queues nothing; with a "
            "different body it is a 409. Kept as long as jobs are."
        ),
    ),
]


def _conflict_on_submit() -> dict[int, str]:
    return {409: "The Idempotency-Key was already used with a different request body (or that request is in flight)"}


class JobsController(Controller):
    """Every route needs an API key; each key sees and changes only its own jobs (admins: all of them)."""

    path = "/v1/jobs"
    tags = ("jobs",)
    security = SECURITY
    guards = [rate_limit]  # noqa: RUF012 - Litestar reads the class attribute

    @post(
        "/",
        status_code=HTTP_202_ACCEPTED,
        sync_to_thread=True,
        summary="Submit an ablation job",
        description=(
            "Validates and resolves the request (preset, then defaults; component kinds expanded to explicit "
            "names), stores the job and queues it. Answers 202 with the queued job; poll GET /v1/jobs/{job_id}. "
            "Limits: the job size (prompts × components × samples), prompt length in characters and, where the "
            "model's tokenizer is published, in tokens (422); queued + running jobs per API key and the request "
            "rate (429); the body size (413)."
        ),
        responses=problem_responses(400, 401, 409, 413, 422, 429, 503, descriptions=_conflict_on_submit()),
    )
    def submit(
        self,
        data: JSONBody[JobRequest],
        store: NamedDependency[JobStore],
        queue: NamedDependency[JobQueue],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
        idempotency: NamedDependency[IdempotencyRecords],
        tokens: NamedDependency[TokenCounters],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[JobStatus]:
        def create(job_id: str | None = None) -> JobStatus:
            return queue_job(data, job_id, principal, store, queue, settings, tokens)

        if idempotency_key is None:
            return Response(create(), status_code=HTTP_202_ACCEPTED)
        outcome = idempotency.submit_once(principal.name, idempotency_key, data, create, store.status)
        headers = {REPLAYED_HEADER: "true"} if outcome.replayed else {}
        return Response(outcome.status, status_code=HTTP_202_ACCEPTED, headers=headers)

    @get(
        "/",
        sync_to_thread=True,
        summary="List jobs, newest first",
        description="The calling key's jobs; an admin key sees every job.",
        responses=problem_responses(400, *PROTECTED, 503),
    )
    def list_jobs(
        self,
        store: NamedDependency[JobStore],
        principal: NamedDependency[Principal],
        offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="jobs to skip, newest first")] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="jobs per page")] = 50,
    ) -> JobPage:
        return store.page(offset, limit, owner=None if principal.admin else principal.name)

    @get(
        "/{job_id:str}",
        sync_to_thread=True,
        summary="A job's status and progress",
        responses=problem_responses(400, *PROTECTED, 404, 503),
    )
    def get_job(
        self, job_id: JobId, store: NamedDependency[JobStore], principal: NamedDependency[Principal]
    ) -> JobStatus:
        return visible_status(store, job_id, principal)

    @get(
        "/{job_id:str}/result",
        sync_to_thread=True,
        summary="A finished job's result",
        description=(
            "409 while the job is queued or running, and for failed or cancelled jobs (detail says why). "
            "Formats, by `?format=` or else the Accept header: `json` (application/json, the default: the stored "
            "document as it is), `msgpack` (application/msgpack or application/x-msgpack: the same JobResult in "
            "MessagePack) and `csv` (text/csv: one row per prompt × component with the columns "
            + ", ".join(CSV_COLUMNS)
            + "; for per-position jobs, streamed, one row per prompt × position × component with the columns "
            + ", ".join(POSITION_CSV_COLUMNS)
            + "). An Accept header that allows none of these is 406. `GET …/summary` answers the summary alone."
        ),
        responses={
            200: ResponseSpec(data_container=JobResult, description="The job's result", generate_examples=False),
            **problem_responses(400, *PROTECTED, 404, 409, 503),
            **not_acceptable_response(),
        },
        operation_class=ResultOperation,
    )
    def get_result(
        self,
        request: Request[Any, Any, Any],
        job_id: JobId,
        store: NamedDependency[JobStore],
        principal: NamedDependency[Principal],
        format: Annotated[
            ExportFormat | None, QueryParameter(description="json, msgpack or csv; overrides the Accept header")
        ] = None,
    ) -> Response[bytes] | Stream:
        fmt, media_type = negotiate(format, request.accept, EXPORT_ACCEPT, "results")
        # The worker stored the encoded JobResult: JSON serves those bytes as they are; other formats decode them.
        stored = finished_result(store, job_id, principal)
        headers = {"Vary": "Accept"}
        if fmt == "csv":
            headers["Content-Disposition"] = f'attachment; filename="{job_id}.csv"'
            result = msgspec.json.decode(stored, type=JobResult)
            if has_positions(result):  # streamed one prompt at a time; the stored JSON is dropped first
                del stored
                return Stream(position_csv_rows(result), media_type=media_type, headers=headers)
            return Response(content=to_csv(result), media_type=media_type, headers=headers)
        return Response(content=export(stored, fmt), media_type=media_type, headers=headers)

    @get(
        "/{job_id:str}/summary",
        sync_to_thread=True,
        summary="A finished job's summary alone",
        description=(
            "The `summary` of the job's result without its per-prompt (and per-position) data: per component "
            "means, regressions and, for per-position jobs, self-repair over the top pairs by direct effect. "
            "409 while the job is queued or running, and for failed or cancelled jobs."
        ),
        responses=problem_responses(400, *PROTECTED, 404, 409, 503),
    )
    def get_summary(
        self, job_id: JobId, store: NamedDependency[JobStore], principal: NamedDependency[Principal]
    ) -> Summary:
        return summary_of(finished_result(store, job_id, principal))

    @delete(
        "/{job_id:str}",
        status_code=HTTP_202_ACCEPTED,
        sync_to_thread=True,
        summary="Cancel a job",
        description=(
            "A queued job never starts; a running job stops at the worker's next check. Answers 202 with the "
            "cancelled job (also when it was already cancelled); 409 when it had already succeeded or failed."
        ),
        responses=problem_responses(400, *PROTECTED, 404, 409, 503),
    )
    def cancel(
        self,
        job_id: JobId,
        store: NamedDependency[JobStore],
        queue: NamedDependency[JobQueue],
        principal: NamedDependency[Principal],
    ) -> JobStatus:
        return cancel_job(store, queue, job_id, principal)
