"""/ui: the lab's web page, served by the API process: jobs, submit, one job, compare.

Server-rendered Jinja2 pages and plain HTML forms; one small script of our own (static/ui.js) moves progress bars.
The pages call the same domain functions as the JSON API (queue_job, visible_status, cancel_job, export,
cached_figure), so a page shows what the API would answer. The API-key middleware does not run here
(`exclude_from_auth`): a page's caller is its session (session.py), and every form carries the session's CSRF token.
Errors are HTML pages with the right status, never problem+json, never a 500 for bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast, get_args
from urllib.parse import quote

import anyio.to_thread
import msgspec
import redis
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_303_SEE_OTHER,
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_403_FORBIDDEN,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from hydra_ablate_client.vocabulary import ACTIVE_STATES, FIGURE_MEDIA_TYPES, FIGURE_NAMES, ExportFormat, JobState
from hydra_ablate_client.wire import JobResult, JobSpec, JobStatus
from service.api.negotiation import EXPORT_ACCEPT
from service.api.ui import forms
from service.api.ui.session import CSRF_FIELD, UiSession, UiSessions
from service.core.api_keys import Principal
from service.core.errors import BackendUnavailable, JobConflict, JobNotFound, ValidationProblem
from service.core.job_actions import cancel_job, finished_result, queue_job, require_succeeded, visible_status
from service.core.job_deletion import delete_finished_job
from service.core.prompt_tokens import TokenCounters
from service.core.queue import JobQueue
from service.core.resolve import DEFAULTS
from service.core.settings import Settings
from service.core.store import ActiveJobsExceeded, JobStore
from service.rendering.estimate_table import estimate_table
from service.rendering.exports import export
from service.rendering.figure_cache import cached_figure
from service.rendering.figure_style import FigureOptionError
from service.rendering.figures import FIGURE_DESCRIPTIONS, shown_figures
from service.rendering.job_comparison import (
    MAX_JOBS,
    MIN_JOBS,
    Compared,
    component_rows,
    layer_tables,
    partial_repair_count,
    render_comparison,
    weak_count,
)
from service.rendering.patch_comparison import (
    ComparisonKind,
    MixedComparison,
    comparison_kind,
    patch_rows,
    render_patch_comparison,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
LIST_WINDOW = 500  # newest jobs the list page filters (the API pages the rest)
EXPORT_MEDIA: dict[str, str] = {}
for _media, _fmt in EXPORT_ACCEPT.items():
    EXPORT_MEDIA.setdefault(_fmt, _media)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
JOB_STATES: tuple[str, ...] = get_args(JobState)


class SignInRequired(Exception):
    """Auth is on and this browser has not signed in (or its key was revoked): off to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


async def blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a synchronous store or rendering call off the event loop (typed: mypy checks the arguments)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def provide_ui_session(request: Request[Any, Any, Any], state: State) -> UiSession:
    settings: Settings = state.settings
    sessions = UiSessions(state.aredis, settings.key_prefix, state.api_keys, settings.auth_enabled)
    return await sessions.load(request)


LOGIN_KEY_PREFIX = 8  # characters of a tried key that its sign-in throttle counts by ("hk_" and 5 random ones)


def signed_in(session: UiSession, request: Request[Any, Any, Any]) -> Principal:
    if session.principal is None:
        raise SignInRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return session.principal


def page(
    session: UiSession | None, name: str, status_code: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> Template:
    """A page with the session's cookie (when it is new) and what the layout needs."""
    context.update(session=session, csrf_field=CSRF_FIELD, nav=name)
    cookies = session.cookies if session is not None else []
    return Template(
        f"{name}.html.jinja", context=context, status_code=status_code, cookies=cookies, headers=headers or {}
    )


async def count_write(request: Request[Any, Any, Any], principal: Principal) -> None:
    """Submits, cancels and deletes from the page count against the key's write limit, as the API's do (429)."""
    await request.app.state.limiter.check("write", principal.name)


def see_other(session: UiSession, path: str) -> Redirect:
    """After a form: 303 so a reload does not post again."""
    return Redirect(path, status_code=HTTP_303_SEE_OTHER, cookies=session.cookies)


def job_label(status: JobStatus) -> str:
    name = getattr(status, "name", None)
    return str(name) if name else status.id[:8]


def job_tags(status: JobStatus) -> list[str]:
    return list(getattr(status, "tags", None) or [])


def percent(status: JobStatus) -> int:
    total = status.progress.total
    if status.status == "succeeded":
        return 100
    return int(100 * status.progress.done / total) if total else 0


def safe_next(raw: str | None) -> str:
    """Only a path of this site's pages (no `//host`, no scheme): an open redirect would make the form a lure."""
    if raw and raw.startswith("/ui/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/ui/jobs"


async def read_form(request: Request[Any, Any, Any], session: UiSession) -> dict[str, str]:
    """The posted form as single values, after the CSRF check (403 page when the token is missing or wrong)."""
    try:
        form = await request.form()
    except Exception as exc:
        raise HTTPException(status_code=HTTP_400_BAD_REQUEST, detail=f"the form could not be read: {exc}") from exc
    values = {key: str(form.get(key, "")) for key in form}
    if not session.csrf_ok(values.get(CSRF_FIELD)):
        raise HTTPException(
            status_code=HTTP_403_FORBIDDEN,
            detail="the form's security token is missing or out of date; reload the page and send it again",
        )
    return values


def decode_result(stored: bytes) -> JobResult:
    return msgspec.json.decode(stored, type=JobResult)


def html_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Every error on a page route as an HTML page with its status."""
    if isinstance(exc, SignInRequired):
        return Redirect(f"/ui/login?next={quote(exc.next_path, safe='')}", status_code=HTTP_303_SEE_OTHER)
    headers: dict[str, str] = {}
    if isinstance(exc, HTTPException):
        status, detail = exc.status_code, exc.detail
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "retry-after"}
    elif isinstance(exc, ValidationProblem):
        status, detail = HTTP_422_UNPROCESSABLE_ENTITY, exc.detail
    elif isinstance(exc, JobNotFound):
        status, detail = HTTP_404_NOT_FOUND, exc.detail
    elif isinstance(exc, JobConflict):
        status, detail = HTTP_409_CONFLICT, exc.detail
    elif isinstance(exc, FigureOptionError):
        status, detail = HTTP_400_BAD_REQUEST, str(exc)
    elif isinstance(exc, ActiveJobsExceeded):
        status, detail = HTTP_429_TOO_MANY_REQUESTS, str(exc)
    elif isinstance(exc, redis.RedisError | BackendUnavailable):
        status, detail = HTTP_503_SERVICE_UNAVAILABLE, "the job store is unavailable right now; try again shortly"
    else:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        status, detail = 500, "internal error; the server log has the details"
    return page(None, "error", status_code=status, headers=headers, status=status, detail=detail)


class UiController(Controller):
    path = "/ui"
    include_in_schema = False
    opt = {"exclude_from_auth": True}  # noqa: RUF012 - Litestar reads the class attribute; sessions do auth here
    dependencies = {"ui": Provide(provide_ui_session)}  # noqa: RUF012
    # Every class the app maps to problem details is mapped here too: Litestar picks the most specific class.
    exception_handlers = {  # noqa: RUF012
        cls: html_error
        for cls in (
            Exception,
            HTTPException,
            ValidationProblem,
            JobNotFound,
            JobConflict,
            FigureOptionError,
            BackendUnavailable,
            ActiveJobsExceeded,
            redis.RedisError,
        )
    }

    @get("/")
    async def home(self) -> Redirect:
        return Redirect("/ui/jobs", status_code=HTTP_303_SEE_OTHER)

    # --- signing in ------------------------------------------------------------------------------------------

    @get("/login")
    async def login_page(self, ui: NamedDependency[UiSession], next: FromQuery[str | None] = None) -> Response[Any]:
        if not ui.auth_enabled:
            return see_other(ui, "/ui/jobs")
        return page(ui, "login", next=safe_next(next))

    @post("/login")
    async def login(
        self, request: Request[Any, Any, Any], ui: NamedDependency[UiSession], state: State
    ) -> Response[Any]:
        # Throttled before anything else (429 page with Retry-After past HYDRA_UI_LOGIN_LIMIT per window): per
        # client address, and per the first characters of the key tried, so that neither one address nor many
        # addresses trying one key can use the form as an oracle at full speed.
        address = request.client.host if request.client else "unknown"
        await state.limiter.check("login", f"address {address}")
        form = await read_form(request, ui)
        if not ui.auth_enabled:
            return see_other(ui, "/ui/jobs")
        settings: Settings = state.settings
        sessions = UiSessions(state.aredis, settings.key_prefix, state.api_keys, settings.auth_enabled)
        key = form.get("api_key", "").strip()
        if key:
            await state.limiter.check("login", f"keys starting {key[:LOGIN_KEY_PREFIX]!r}")
        fresh = await sessions.sign_in(ui, key) if key else None
        if fresh is None:
            message = "enter your API key" if not key else "this API key is unknown or was revoked"
            return page(ui, "login", status_code=HTTP_401_UNAUTHORIZED, next=safe_next(form.get("next")), error=message)
        return see_other(fresh, safe_next(form.get("next")))

    @post("/logout")
    async def logout(self, request: Request[Any, Any, Any], ui: NamedDependency[UiSession], state: State) -> Redirect:
        await read_form(request, ui)
        settings: Settings = state.settings
        await UiSessions(state.aredis, settings.key_prefix, state.api_keys, settings.auth_enabled).sign_out(ui)
        return see_other(ui, "/ui/login" if ui.auth_enabled else "/ui/jobs")

    # --- jobs --------------------------------------------------------------------------------------------------

    @get("/jobs")
    async def jobs(
        self,
        request: Request[Any, Any, Any],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
        status: FromQuery[str | None] = None,
        model: FromQuery[str | None] = None,
        tag: FromQuery[str | None] = None,
    ) -> Template:
        principal = signed_in(ui, request)
        owner = None if principal.admin else principal.name
        listing = await blocking(store.page, 0, LIST_WINDOW, owner)
        models = sorted({job.model for job in listing.items})
        tags = sorted({t for job in listing.items for t in job_tags(job)})
        shown = [
            job
            for job in listing.items
            if (not status or job.status == status)
            and (not model or job.model == model)
            and (not tag or tag in job_tags(job))
        ]
        return page(
            ui,
            "jobs",
            jobs=shown,
            total=listing.total,
            window=LIST_WINDOW,
            states=JOB_STATES,
            models=models,
            tags=tags,
            filters={"status": status or "", "model": model or "", "tag": tag or ""},
            label=job_label,
            job_tags=job_tags,
            percent=percent,
            active_states=ACTIVE_STATES,
        )

    @get("/progress")
    async def progress(
        self,
        request: Request[Any, Any, Any],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
        ids: FromQuery[str] = "",
    ) -> Response[dict[str, Any]]:
        """What the progress bars poll: status and progress of the caller's jobs among `ids` (others are left out)."""
        if ui.principal is None:
            return Response({"jobs": [], "signed_in": False}, status_code=HTTP_401_UNAUTHORIZED)
        principal = ui.principal
        wanted = [job_id for job_id in ids.split(",") if job_id][:200]
        statuses = await blocking(lambda: [store.status(job_id) for job_id in wanted])
        jobs = [
            {"id": s.id, "status": s.status, "done": s.progress.done, "total": s.progress.total, "percent": percent(s)}
            for s in statuses
            if s is not None and principal.may_see(s.owner)
        ]
        return Response({"jobs": jobs, "signed_in": True}, headers={"Cache-Control": "no-store"})

    # --- submit ------------------------------------------------------------------------------------------------

    @get("/submit")
    async def submit_page(
        self, request: Request[Any, Any, Any], ui: NamedDependency[UiSession], store: NamedDependency[JobStore]
    ) -> Template:
        signed_in(ui, request)
        defaults = {"source": "prompts", "components": "attn, mlp"}
        return await self._submit_form(ui, store, defaults, {})

    async def _submit_form(
        self, ui: UiSession, store: JobStore, values: dict[str, str], errors: dict[str, str], status_code: int = 200
    ) -> Template:
        models = await blocking(store.models)
        return page(
            ui,
            "submit",
            status_code=status_code,
            values=values,
            errors=errors,
            models=[m.id for m in models],
            choices=forms.CHOICES,
            defaults=DEFAULTS,
            dataset_flags=forms.DATASET_FLAGS,
            estimates=forms.ESTIMATES,
            verify_fields=forms.VERIFY_FIELDS,
            has_name=forms.request_has("name"),
            has_tags=forms.request_has("tags"),
        )

    @post("/submit")
    async def submit(
        self,
        request: Request[Any, Any, Any],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
        queue: NamedDependency[JobQueue],
        settings: NamedDependency[Settings],
        tokens: NamedDependency[TokenCounters],
    ) -> Response[Any]:
        principal = signed_in(ui, request)
        form = await read_form(request, ui)
        await count_write(request, principal)
        values = {name: form.get(name, "") for name in forms.FORM_FIELDS}
        outcome = forms.parse_form(form)
        if outcome.request is None:
            return await self._submit_form(ui, store, values, outcome.errors, HTTP_400_BAD_REQUEST)
        job_request = outcome.request
        try:
            served = request.app.state.served
            status = await blocking(queue_job, job_request, None, principal, store, queue, settings, tokens, served)
        except ValidationProblem as exc:
            errors = {forms.form_field(exc.field): exc.detail}
            return await self._submit_form(ui, store, values, errors, HTTP_422_UNPROCESSABLE_ENTITY)
        except ActiveJobsExceeded as exc:
            message = f"you have {exc.active} queued or running jobs (limit {exc.cap}); wait or cancel one"
            return await self._submit_form(ui, store, values, {"": message}, HTTP_429_TOO_MANY_REQUESTS)
        except (BackendUnavailable, redis.RedisError) as exc:
            message = f"the job could not be queued: {exc}"
            return await self._submit_form(ui, store, values, {"": message}, HTTP_503_SERVICE_UNAVAILABLE)
        return see_other(ui, f"/ui/jobs/{status.id}")

    # --- one job -----------------------------------------------------------------------------------------------

    @get("/jobs/{job_id:str}")
    async def job(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
    ) -> Template:
        principal = signed_in(ui, request)
        status = await blocking(visible_status, store, job_id, principal)
        spec: JobSpec | None = await blocking(store.spec, job_id)
        result: JobResult | None = None
        if status.status == "succeeded":
            stored = await blocking(store.result, job_id)
            result = None if stored is None else await blocking(decode_result, stored)
        return page(
            ui,
            "job",
            job=status,
            spec=spec,
            result=result,
            label=job_label(status),
            tags=job_tags(status),
            percent=percent(status),
            active=status.status in ACTIVE_STATES,
            # Only the figures that draw this job (a patching job has its own); none before there is a result.
            figures=[(name, FIGURE_DESCRIPTIONS[name]) for name in (shown_figures(result) if result else ())],
            # Jobs with estimates (every kind): their agreement with the exact effects and what they cost.
            estimate_view=estimate_table(result) if result else None,
            formats=EXPORT_FORMATS,
        )

    @get("/jobs/{job_id:str}/figures/{name:str}")
    async def figure(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        name: FromPath[str],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
    ) -> Response[bytes]:
        principal = signed_in(ui, request)
        if name not in FIGURE_NAMES:
            raise NotFoundException(detail=f"unknown figure {name!r}; figures are {', '.join(FIGURE_NAMES)}")
        await blocking(require_succeeded, store, job_id, principal)
        data = await blocking(cached_figure, store, job_id, name, "png")
        headers = {"Cache-Control": "private, max-age=3600"}  # a finished job's figure never changes
        return Response(content=data, media_type=FIGURE_MEDIA_TYPES["png"], headers=headers)

    @get("/jobs/{job_id:str}/download/{fmt:str}")
    async def download(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        fmt: FromPath[str],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
    ) -> Response[bytes]:
        principal = signed_in(ui, request)
        if fmt not in EXPORT_FORMATS:
            raise NotFoundException(detail=f"unknown format {fmt!r}; formats are {', '.join(EXPORT_FORMATS)}")
        stored = await blocking(finished_result, store, job_id, principal)
        content = await blocking(export, stored, cast(ExportFormat, fmt))  # checked against EXPORT_FORMATS above
        disposition = f'attachment; filename="{job_id}.{fmt}"'
        return Response(content=content, media_type=EXPORT_MEDIA[fmt], headers={"Content-Disposition": disposition})

    @post("/jobs/{job_id:str}/cancel")
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
        queue: NamedDependency[JobQueue],
    ) -> Redirect:
        principal = signed_in(ui, request)
        await read_form(request, ui)
        await count_write(request, principal)
        await blocking(cancel_job, store, queue, job_id, principal)
        return see_other(ui, f"/ui/jobs/{job_id}")

    @post("/jobs/{job_id:str}/delete")
    async def delete(
        self,
        request: Request[Any, Any, Any],
        job_id: FromPath[str],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
    ) -> Redirect:
        principal = signed_in(ui, request)
        await read_form(request, ui)
        await count_write(request, principal)
        await blocking(visible_status, store, job_id, principal)
        deleted = await blocking(delete_finished_job, store, job_id)
        if deleted is None:
            raise NotFoundException(detail=f"job {job_id} not found")
        if not deleted:
            raise HTTPException(status_code=HTTP_409_CONFLICT, detail=f"job {job_id} is still running; cancel it first")
        return see_other(ui, "/ui/jobs")

    # --- compare -----------------------------------------------------------------------------------------------

    async def _compared(
        self, store: JobStore, ids: list[str], principal: Principal
    ) -> tuple[ComparisonKind, list[Compared]]:
        """The selected jobs and what they are (all ablation or all patching jobs; a 400 saying why for a mix)."""
        unique = list(dict.fromkeys(job_id.strip() for job_id in ids if job_id.strip()))
        if not MIN_JOBS <= len(unique) <= MAX_JOBS:
            raise HTTPException(
                status_code=HTTP_400_BAD_REQUEST,
                detail=f"pick {MIN_JOBS} to {MAX_JOBS} finished jobs to compare (got {len(unique)})",
            )
        # Every id first (an unknown one is a 404 whatever the others' states), then every result (409 until done).
        statuses = [await blocking(visible_status, store, job_id, principal) for job_id in unique]
        compared = []
        for status in statuses:
            result = await blocking(decode_result, await blocking(finished_result, store, status.id, principal))
            compared.append(Compared(f"{job_label(status)} ({status.model})", result))
        try:
            return comparison_kind(compared), compared
        except MixedComparison as mixed:
            raise HTTPException(status_code=HTTP_400_BAD_REQUEST, detail=str(mixed)) from None

    @get("/compare")
    async def compare(
        self,
        request: Request[Any, Any, Any],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
        ids: FromQuery[list[str] | None] = None,
    ) -> Template:
        principal = signed_in(ui, request)
        kind, compared = await self._compared(store, ids or [], principal)
        query = "&".join(f"ids={quote(c.result.id, safe='')}" for c in compared)
        if kind == "patching":
            return page(ui, "compare_patching", compared=compared, query=query, rows=patch_rows(compared))
        names, per_job = component_rows(compared)
        return page(ui, "compare", compared=compared, query=query, tables=layer_tables(compared), names=names,
                    per_job=per_job, partial=[partial_repair_count(c.result) for c in compared],
                    weak=[weak_count(c.result) for c in compared])

    @get("/compare/figure")
    async def compare_figure(
        self,
        request: Request[Any, Any, Any],
        ui: NamedDependency[UiSession],
        store: NamedDependency[JobStore],
        ids: FromQuery[list[str] | None] = None,
    ) -> Response[bytes]:
        principal = signed_in(ui, request)
        kind, compared = await self._compared(store, ids or [], principal)
        data = await blocking(render_patch_comparison if kind == "patching" else render_comparison, compared)
        return Response(content=data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
