"""/v1/jobs: submit, inspect, fetch results of and cancel ablation jobs."""

from __future__ import annotations

import functools
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import anyio.to_thread
import msgspec
import redis
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT
from litestar.utils.scope.state import ScopeState

from hydra_ablate_client.vocabulary import TERMINAL_STATES, ExportFormat, JobState
from hydra_ablate_client.wire import (
    BatchAccepted,
    BatchRequest,
    JobPage,
    JobRequest,
    JobResult,
    JobStatus,
    PatchJobSummary,
    Summary,
)
from service.api.auth import API_KEY_HEADER, SECURITY
from service.api.controllers.dependencies import RouteContext
from service.api.controllers.problems import (
    PROTECTED,
    held_request_responses,
    not_acceptable_response,
    problem_responses,
)
from service.api.controllers.strict_query import RATE_LIMITED
from service.api.idempotency import IDEMPOTENCY_HEADER, REPLAYED_HEADER
from service.api.large_bodies import LargeBodies
from service.api.negotiation import EXPORT_ACCEPT, accepts_gzip, negotiate
from service.core.api_keys import key_digest
from service.core.errors import ValidationProblem
from service.core.events import follow, last_event_id, wait_for_change
from service.core.job_actions import (
    cancel_job,
    finished_result,
    job_not_found,
    queue_job,
    queue_job_async,
    visible_status,
    visible_status_async,
)
from service.core.job_deletion import delete_finished_job
from service.core.labels import labels_of, parse_allow_list
from service.core.prompt_tokens import check_prompt_tokens
from service.core.store import JobFilter
from service.rendering.exports import (
    CSV_COLUMNS,
    POSITION_CSV_COLUMNS,
    export,
    has_positions,
    position_csv_rows,
    summary_of,
    to_csv,
)

logger = logging.getLogger(__name__)

JobId = FromPath[str]
KEY_RECHECK_S = 5.0  # an open event stream checks that its API key still exists this often (revocation ends it)
MAX_OFFSET = 1_000_000_000  # far beyond any real listing; Redis ranges reject offsets past 64-bit integers


@dataclass
class ResultOperation(Operation):
    """The result route's OpenAPI operation: MessagePack and CSV beside JSON (a ResponseSpec documents one type)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if not isinstance(ok, OpenAPIResponse) or not ok.content or "application/json" not in ok.content:
            return
        schema = ok.content["application/json"].schema
        ok.description = "The job's result: JSON (default), MessagePack of the same JobResult, CSV or Parquet"
        ok.content["application/msgpack"] = OpenAPIMediaType(schema=schema)
        ok.content["application/vnd.apache.parquet"] = OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.STRING,
                format=OpenAPIFormat.BINARY,
                description="Apache Parquet: one row per prompt × component (see the route's description)",
            )
        )
        ok.content["text/csv"] = OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.STRING,
                description="A header row (" + ",".join(CSV_COLUMNS) + ") then one row per prompt × component",
            )
        )


_MSGSPEC_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def strict_body(body_type: type) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """A before_request hook that parses the body as `body_type` strictly before Litestar does (see below)."""

    async def check(request: Request[Any, Any, Any]) -> None:
        await _strict_decode(request, body_type)

    return check


async def _strict_decode(request: Request[Any, Any, Any], body_type: type) -> None:
    """Parse a JSON body strictly before Litestar does, so hostile bodies are 400s, not 500s.

    Litestar decodes the body into untyped objects first, then converts them leniently: "0" becomes the number 0,
    invalid UTF-8 inside a string raises UnicodeDecodeError and 50,000 nested arrays raise RecursionError, both
    unhandled. A typed, strict msgspec decode checks UTF-8 and stops at the first value of the wrong type (the
    schema nests three levels at most), so none of that reaches Litestar's decoder.

    A large body (HYDRA_LARGE_SUBMIT_BYTES) is decoded in a worker thread, within the process's bound on large
    bodies (service/api/large_bodies.py), both strictly and into the untyped objects Litestar would decode next on
    the event loop; Litestar finds those in the request's state and uses them as they are.
    """
    body = await request.body()
    if not body:
        return  # Litestar's own "no body" answer
    large: LargeBodies = request.app.state.large_bodies
    if not large.is_large(len(body)):
        _decode_checked(request, body, body_type)
        return
    large.admit(len(body))

    def decode() -> Any:
        _decode_checked(request, body, body_type)
        return msgspec.json.decode(body)

    ScopeState.from_scope(request.scope).json = await large.run(decode, "decode")
    request.scope.setdefault("state", {})[LARGE_BODY_STATE] = True


LARGE_BODY_STATE = "hydra_large_body"  # set in the request's state when its body took the large-body path


def _decode_checked(request: Request[Any, Any, Any], body: bytes, body_type: type) -> None:
    try:
        msgspec.json.decode(body, type=body_type)
    except UnicodeDecodeError as exc:
        detail = f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        raise ClientException(detail=detail) from None
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _MSGSPEC_PATH.search(message)
        key = match["path"] if match and match["path"] else None
        text = message[: match.start()] if match else message
        raise ClientException(
            detail=f"Validation failed for {request.method} {request.url.path}",
            extra=[{"message": text, "key": key, "source": "body"}],
        ) from None
    except msgspec.DecodeError as exc:
        raise ClientException(detail=str(exc)) from None


IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=255,
        description=(
            "Makes the submit safe to retry: the same key (per API key) with the same body answers with the job "
            "the first request created (202, same id, `Idempotent-Replayed: true`) and queues nothing; with a "
            "different body it is a 409; once its job was deleted, a 410. Kept as long as jobs are."
        ),
    ),
]


def _conflict_on_submit() -> dict[int, str]:
    return {
        409: "The Idempotency-Key was already used with a different request body (or that request is in flight)",
        410: "The job this Idempotency-Key created was deleted (or expired); a new key submits it again",
    }


class JobsController(Controller):
    """Every route needs an API key; each key sees and changes only its own jobs (admins: all of them)."""

    path = "/v1/jobs"
    tags = ("jobs",)
    security = SECURITY
    opt = {RATE_LIMITED: True}  # noqa: RUF012 - read by the app's guard (service/api/controllers/strict_query.py)

    @post(
        "/",
        status_code=HTTP_202_ACCEPTED,
        summary="Submit an ablation job",
        description=(
            "Validates and resolves the request (preset, then defaults; component kinds expanded to explicit "
            "names), stores the job and queues it. Answers 202 with the queued job; poll GET /v1/jobs/{job_id}. "
            "Limits: the job size (prompts × components × samples), prompt length in characters and, where the "
            "model's tokenizer is published, in tokens (422); queued + running jobs per API key and the request "
            "rate (429); the body size (413)."
        ),
        responses=problem_responses(400, 401, 409, 410, 413, 422, 429, 503, descriptions=_conflict_on_submit()),
        before_request=strict_body(JobRequest),
    )
    async def submit(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[JobRequest],
        ctx: NamedDependency[RouteContext],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[JobStatus]:
        store, queue, settings, principal, tokens = ctx.store, ctx.queue, ctx.settings, ctx.principal, ctx.tokens
        if idempotency_key is None:
            # A large body's resolution and token count run in a thread, within the bound (service/api/large_bodies.py).
            large = request.app.state.large_bodies if request.state.get(LARGE_BODY_STATE) else None
            status = await queue_job_async(
                data, principal, ctx.aredis, store, queue, settings, tokens, ctx.served,
                offload=None if large is None else functools.partial(large.run, step="prepare"),
            )  # fmt: skip
            return Response(status, status_code=HTTP_202_ACCEPTED)

        # With a key: the record is claimed before the job exists, naming its id (service/api/idempotency.py); a
        # duplicate may wait for the first request's job. Done in a thread, on the store's own client.
        def create(job_id: str | None = None) -> JobStatus:
            return queue_job(data, job_id, principal, store, queue, settings, tokens, ctx.served)

        key = idempotency_key
        outcome = await anyio.to_thread.run_sync(
            lambda: ctx.idempotency.submit_once(principal.name, key, data, create, store.status)
        )
        headers = {REPLAYED_HEADER: "true"} if outcome.replayed else {}
        return Response(outcome.status, status_code=HTTP_202_ACCEPTED, headers=headers)

    @post(
        "/batch",
        status_code=HTTP_202_ACCEPTED,
        sync_to_thread=True,
        before_request=strict_body(BatchRequest),
        summary="Submit many jobs at once",
        operation_id="submitJobBatch",
        description=(
            "Up to 100 job requests in one body. Every request is resolved and checked first (a 422 names the "
            "job, e.g. `jobs[3].prompts`); then all are queued, or, when one cannot be (the per-key cap), the ones "
            "already queued are cancelled and the whole batch is refused. Answers 202 with the jobs in order."
        ),
        responses=problem_responses(400, 401, 413, 422, 429, 503),
    )
    def submit_batch(
        self,
        data: JSONBody[BatchRequest],
        ctx: NamedDependency[RouteContext],
    ) -> Response[BatchAccepted]:
        store, queue, settings, principal, tokens = ctx.store, ctx.queue, ctx.settings, ctx.principal, ctx.tokens
        allowed = parse_allow_list(settings.callback_allow)
        for index, request in enumerate(data.jobs):  # check every job before queueing any
            try:
                spec = ctx.served.resolve(request, store, settings)
                labels_of(request, allowed)
                check_prompt_tokens(spec, lambda model_id: tokens.get(store, model_id), settings)
            except ValidationProblem as problem:
                field = f"jobs[{index}].{problem.field}" if problem.field else f"jobs[{index}]"
                raise ValidationProblem(f"jobs[{index}]: {problem.detail}", field) from None
        queued: list[JobStatus] = []
        try:
            for request in data.jobs:
                queued.append(queue_job(request, None, principal, store, queue, settings, tokens, ctx.served))
        except BaseException:
            for status in queued:  # all or nothing: a half-queued batch would be re-sent whole by the client
                store.request_cancel(status.id)
            raise
        return Response(BatchAccepted(jobs=queued), status_code=HTTP_202_ACCEPTED)

    @get(
        "/",
        sync_to_thread=True,
        summary="List jobs, newest first",
        operation_id="listJobs",
        description=(
            "The calling key's jobs (an admin key sees every job), filtered by any of status, model, tag and "
            "creation time; `total` counts the jobs that match. Unknown query parameters are a 400."
        ),
        responses=problem_responses(400, *PROTECTED, 503),
    )
    def list_jobs(
        self,
        ctx: NamedDependency[RouteContext],
        offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="jobs to skip, newest first")] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="jobs per page")] = 50,
        status: Annotated[JobState | None, QueryParameter(description="only jobs in this state")] = None,
        model: Annotated[
            str | None, QueryParameter(min_length=1, max_length=512, description="only jobs of this model id")
        ] = None,
        tag: Annotated[
            str | None, QueryParameter(min_length=1, max_length=64, description="only jobs carrying this tag")
        ] = None,
        created_after: Annotated[
            datetime | None, QueryParameter(description="only jobs created after this instant (ISO-8601)")
        ] = None,
        created_before: Annotated[
            datetime | None, QueryParameter(description="only jobs created before this instant (ISO-8601)")
        ] = None,
    ) -> JobPage:
        store, principal = ctx.store, ctx.principal
        filters = JobFilter(
            status=status,
            model=model,
            tag=tag,
            created_after=None if created_after is None else _timestamp(created_after),
            created_before=None if created_before is None else _timestamp(created_before),
        )
        return store.page(offset, limit, owner=None if principal.admin else principal.name, filters=filters)

    @get(
        "/{job_id:str}",
        summary="A job's status and progress",
        operation_id="getJob",
        description=(
            "With `?wait=S` (a long poll, at most 60 s) the answer waits until the job's status, phase or progress "
            "changes, or S seconds pass, whichever is first; a finished job answers at once. A waiting long poll "
            "counts against the caps on held requests shared with event streams (429 with Retry-After past them)."
        ),
        responses=held_request_responses(),
    )
    async def get_job(
        self,
        request: Request[Any, Any, Any],
        job_id: JobId,
        ctx: NamedDependency[RouteContext],
        wait: Annotated[
            float | None,
            QueryParameter(ge=0, le=60, description="seconds to wait for the next change (long poll)"),
        ] = None,
    ) -> JobStatus:
        store, principal = ctx.store, ctx.principal
        client = request.app.state.aredis
        if not wait:
            return await visible_status_async(client, store, job_id, principal)
        after = await last_event_id(client, store, job_id)  # read before the status, so no change slips between
        status = await visible_status_async(client, store, job_id, principal)
        if status.status in TERMINAL_STATES:
            return status
        slot = request.app.state.stream_slots.acquire(principal.name)  # TooManyStreams: 429
        try:
            await wait_for_change(client, request.app.state.event_hub, store, job_id, after, wait)
        finally:
            slot.release()
        return await visible_status_async(client, store, job_id, principal)

    @get(
        "/{job_id:str}/events",
        summary="Stream a job's status and progress (server-sent events)",
        operation_id="streamJobEvents",
        description=(
            "A `text/event-stream` of the job's changes until it ends: `event: status` when its state or phase "
            "changes, `event: progress` for progress, each with the JobStatus as JSON `data` and an `id`; a "
            "comment every few quiet seconds keeps proxies from closing the stream; `event: end` closes it. The "
            "stream starts with the changes already kept (every phase of the job), or after `Last-Event-ID`. Open "
            "streams are capped per API key and per server process, together with waiting long polls (429 with "
            "Retry-After past a cap); a stream's place is freed when the job ends or the client disconnects. The "
            "stream rides out a Redis outage of up to a minute (keep-alives go on); after that it closes without "
            "`event: end`, to be resumed with `Last-Event-ID`. A stream whose API key is revoked closes within about "
            "ten seconds (a reconnect answers 401)."
        ),
        responses={
            200: ResponseSpec(
                data_container=str,
                media_type="text/event-stream",
                description="Server-sent events, each `data` a JobStatus",
                generate_examples=False,
            ),
            **held_request_responses(),
        },
    )
    async def job_events(
        self,
        request: Request[Any, Any, Any],
        job_id: JobId,
        ctx: NamedDependency[RouteContext],
        last_event: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID",
                pattern=r"^\d+-\d+$",
                description="Resume after this event id (browsers send it on reconnect)",
            ),
        ] = None,
    ) -> ServerSentEvent:
        store, principal = ctx.store, ctx.principal
        await anyio.to_thread.run_sync(visible_status, store, job_id, principal)
        state = request.app.state
        client, hub = state.aredis, state.event_hub
        slot = state.stream_slots.acquire(principal.name)  # TooManyStreams: 429, before the stream starts

        key = request.headers.get(API_KEY_HEADER)
        digest = key_digest(key) if key else None
        checked = time.monotonic()

        async def messages() -> AsyncIterator[ServerSentEventMessage]:
            # The slot is freed when the stream ends (the job ended or vanished), or when the client disconnects:
            # Litestar then cancels the task that iterates this generator, and `finally` runs.
            nonlocal checked
            try:
                async for event in follow(client, hub, store, job_id, after=last_event or "0"):
                    # The key is checked again every KEY_RECHECK_S (at the latest on a keep-alive, every few quiet
                    # seconds): a key revoked meanwhile ends its open streams, as it ends its next request (401).
                    if digest is not None and time.monotonic() - checked >= KEY_RECHECK_S:
                        checked = time.monotonic()
                        if await state.api_keys.principal_for_digest(digest, client) is None:
                            logger.info("event stream of job %s closed: its API key was revoked", job_id)
                            yield ServerSentEventMessage(comment="the API key was revoked", data=None)
                            return
                    if event.kind == "keepalive":
                        # A comment only: an empty `data:` line would be dispatched to EventSource as a message.
                        yield ServerSentEventMessage(comment="keep-alive", data=None)
                        continue
                    data = msgspec.json.encode(event.status).decode() if event.status is not None else "null"
                    yield ServerSentEventMessage(data=data, event=event.kind, id=event.event_id)
            except redis.RedisError as error:
                # The answer has started (200): all that is left is to end it cleanly, without an `end` event, so
                # the client resumes with Last-Event-ID once Redis is back.
                logger.warning("event stream of job %s ended: Redis stayed unavailable (%s)", job_id, error)
            finally:
                slot.release()

        stream = messages()
        weakref.finalize(stream, slot.release)  # a stream dropped before its first step never reaches `finally`
        return ServerSentEvent(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @get(
        "/{job_id:str}/result",
        sync_to_thread=True,
        summary="A finished job's result",
        description=(
            "409 while the job is queued or running, and for failed or cancelled jobs (detail says why). "
            "Formats, by `?format=` or else the Accept header: `json` (application/json, the default: the stored "
            "document as it is), `msgpack` (application/msgpack or application/x-msgpack: the same JobResult in "
            "MessagePack), `csv` (text/csv: one row per prompt × component with the columns "
            + ", ".join(CSV_COLUMNS)
            + "; for per-position jobs, streamed, one row per prompt × position × component with the columns "
            + ", ".join(POSITION_CSV_COLUMNS)
            + ") and `parquet` (application/vnd.apache.parquet: the long table, one row per prompt × component with "
            "every measure, the response vector and the dataset fields; for per-position jobs one row per prompt × "
            "position × component with the prompt, position, target, clean metric, top-2 gap, every per-position "
            "measure (float32), the capped TE of soft-capped models and, with position_responses full, the "
            "response vector; the rest of the result in the file's `hydra.result` metadata; streamed row group by "
            "row group). An Accept header that allows none of these is 406. `GET …/summary` answers the summary "
            "alone. JSON comes gzip-compressed (Content-Encoding: gzip) when the request's Accept-Encoding allows "
            "gzip, as stored; otherwise uncompressed."
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
        ctx: NamedDependency[RouteContext],
        format: Annotated[
            ExportFormat | None,
            QueryParameter(description="json, msgpack, csv or parquet; overrides the Accept header"),
        ] = None,
    ) -> Response[bytes] | Stream:
        store, principal = ctx.store, ctx.principal
        fmt, media_type = negotiate(format, request.accept, EXPORT_ACCEPT, "results")
        headers = {"Vary": "Accept, Accept-Encoding"}
        # Results are stored as gzip of their JSON: a client that accepts gzip gets those bytes as they are (no
        # decompression, a fraction of the transfer); others get the JSON, and other formats are built from it.
        if fmt == "json" and accepts_gzip(request.headers.get("accept-encoding")):
            headers["Content-Encoding"] = "gzip"
            compressed = finished_result(store, job_id, principal, compressed=True)
            return Response(content=compressed, media_type=media_type, headers=headers)
        stored = finished_result(store, job_id, principal)
        if fmt == "parquet":  # streamed: one row group at a time (service/rendering/parquet.py)
            headers["Content-Disposition"] = f'attachment; filename="{job_id}.parquet"'
            from service.rendering.parquet import iter_parquet  # pyarrow is heavy: imported on first use

            result = msgspec.json.decode(stored, type=JobResult)
            del stored  # the decoded result is the only copy while the row groups stream
            return Stream(iter_parquet(result), media_type=media_type, headers=headers)  # type: ignore[return-value]
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
            "A patching job (intervention `patch`) answers a PatchJobSummary instead: per site and knockout set "
            "(and position) the mean patching score with its interval and the pooled score, with the pair counts. "
            "409 while the job is queued or running, and for failed or cancelled jobs."
        ),
        responses=problem_responses(400, *PROTECTED, 404, 409, 503),
    )
    def get_summary(self, job_id: JobId, ctx: NamedDependency[RouteContext]) -> Summary | PatchJobSummary:
        return summary_of(finished_result(ctx.store, job_id, ctx.principal))

    @delete(
        "/{job_id:str}",
        status_code=HTTP_202_ACCEPTED,
        sync_to_thread=True,
        summary="Cancel a running job, or delete a finished one",
        operation_id="cancelOrDeleteJob",
        description=(
            "A queued job never starts; a running job stops at the worker's next check: both answer 202 with the "
            "cancelled job. A finished job (succeeded, failed or cancelled) is deleted with its result, figures "
            "and events: 204, and the job is 404 from then on. With `keep_finished=true` the request only "
            "cancels: a job that has already finished is left as it is and answered 200 with its status (a "
            "client cancelling a job that ends at that moment keeps its result)."
        ),
        responses={
            200: ResponseSpec(
                data_container=JobStatus,
                description="keep_finished=true and the job had already finished: nothing was changed",
                generate_examples=False,
            ),
            202: ResponseSpec(data_container=JobStatus, description="The job, now cancelled", generate_examples=False),
            204: ResponseSpec(data_container=None, description="The finished job and its result were deleted"),
            **problem_responses(400, *PROTECTED, 404, 503),
        },
    )
    def cancel(
        self,
        job_id: JobId,
        ctx: NamedDependency[RouteContext],
        keep_finished: Annotated[
            bool, QueryParameter(description="only cancel: leave a finished job and its result as they are (200)")
        ] = False,
    ) -> Response[JobStatus | None]:
        store, queue, principal = ctx.store, ctx.queue, ctx.principal
        current = visible_status(store, job_id, principal)  # another key's job: 404, and it stays as it is
        if current.status in TERMINAL_STATES:
            if keep_finished:
                return Response(current, status_code=HTTP_200_OK)
            if delete_finished_job(store, job_id) is None:
                raise job_not_found(job_id)
            return Response(None, status_code=HTTP_204_NO_CONTENT)
        status = cancel_job(store, queue, job_id, principal)
        return Response(status, status_code=HTTP_202_ACCEPTED)


def _timestamp(moment: datetime) -> float:
    """Unix seconds; a time without a zone is taken as UTC (the API writes every time in UTC)."""
    if moment.tzinfo is None:
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
