"""Python clients for the hydra-ablate API: `HydraClient` (sync) and `AsyncHydraClient` (asyncio).

Both speak the same wire types as the server (`hydra_ablate_client.wire`), so results arrive as typed msgspec Structs.
Each endpoint is described once, as a `_Call` (how to build the request and how to decode the answer); the two
clients only differ in how they send it, so sync and async cannot drift apart.

Notebook use:

    from hydra_ablate_client import HydraClient
    c = HydraClient()                      # HYDRA_URL / HYDRA_API_KEY, else http://127.0.0.1:8000
    r = c.result(c.wait(c.submit({"preset": "hydra", "dataset": {"name": "known_1000", "limit": 8}}).id).id)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Generic, TypeVar, get_args
from urllib.parse import quote

import httpx
import msgspec

from hydra_ablate_client.vocabulary import FIGURE_MEDIA_TYPES, TERMINAL_STATES, FigureFormat
from hydra_ablate_client.vocabulary import FIGURE_NAMES as FIGURE_NAMES  # the figures `figure()` draws, for callers
from hydra_ablate_client.wire import JobPage, JobRequest, JobResult, JobStatus, ModelInfo

DEFAULT_URL = "http://127.0.0.1:8000"
# The environment variables the client reads (listed in the service's settings registry too, by hand: the client
# imports nothing of the service; tests/test_configuration.py checks the two lists agree).
URL_VARIABLE = "HYDRA_URL"
API_KEY_VARIABLE = "HYDRA_API_KEY"
ENVIRONMENT = (URL_VARIABLE, API_KEY_VARIABLE)
ModelList = list[ModelInfo]  # module-level alias: inside the client classes `list` is a method name

T = TypeVar("T")


class HydraError(Exception):
    """A request the API refused (any non-2xx), carrying the RFC 9457 problem details it answered with.

    `str(error)` is one readable line, e.g. "404 Not Found: job abc not found", so callers can show it as is.
    """

    def __init__(self, status: int, title: str, detail: str, problem: Mapping[str, Any] | None = None) -> None:
        super().__init__(status, title, detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.problem: dict[str, Any] = dict(problem or {})  # the full document: `field`, `errors`, … when present

    def __str__(self) -> str:
        head = f"{self.status} {self.title}" if self.status else self.title
        return f"{head}: {self.detail}" if self.detail and self.detail != self.title else head


class HydraConnectionError(HydraError):
    """The API could not be reached at all (refused, DNS, timeout): status 0, there was no HTTP answer."""

    def __init__(self, url: str, cause: BaseException) -> None:
        reason = str(cause) or type(cause).__name__
        super().__init__(0, "Cannot reach the API", f"{url}: {reason} (is `hydra-ablate serve` running there?)")


class HydraProtocolError(HydraError):
    """A 2xx answer that is not the document the endpoint promises: a version mismatch between client and server."""


def problem_from_response(response: httpx.Response) -> HydraError:
    """The HydraError for a non-2xx answer: problem details when the body is one, else the status and body text."""
    status = response.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = response.reason_phrase or "Error"
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict) and ("title" in document or "detail" in document):
        title = str(document.get("title") or phrase)
        detail = str(document.get("detail") or "")
        return HydraError(status, title, detail, document)
    text = " ".join(response.text.split())  # a proxy's HTML page or plain text: one line, bounded
    return HydraError(status, phrase, text[:300] if text else phrase)


def _decoder(kind: Any, name: str | None = None) -> Callable[[httpx.Response], Any]:
    """Typed msgspec decoding of a success body; a body of another shape is a HydraProtocolError."""
    expected = name or getattr(kind, "__name__", str(kind))

    def decode(response: httpx.Response) -> Any:
        try:
            return msgspec.json.decode(response.content, type=kind)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise HydraProtocolError(
                response.status_code,
                "Unexpected response",
                f"{response.request.method} {response.request.url.path} did not return a {expected}: {exc}",
            ) from exc

    return decode


def _raw(response: httpx.Response) -> bytes:
    return response.content


def _job_path(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/jobs", quote(job_id, safe=""), *(quote(part, safe="") for part in rest)])


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API request and how its success answer decodes; errors are mapped uniformly by `_finish`."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ok: Callable[[httpx.Response], bool] = lambda response: response.is_success


def _submit(request: Mapping[str, Any] | JobRequest, idempotency_key: str | None) -> _Call[JobStatus]:
    # Dicts go out as given: the server validates against the same schema and names the offending field.
    headers = {"Content-Type": "application/json"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return _Call("POST", "/v1/jobs", _decoder(JobStatus), content=msgspec.json.encode(request), headers=headers)


def _figure(job_id: str, name: str, format: str, options: Mapping[str, Any] | None = None) -> _Call[bytes]:
    media = FIGURE_MEDIA_TYPES.get(format)  # type: ignore[call-overload]  # checked here, at run time
    if media is None or format not in get_args(FigureFormat):
        raise ValueError(f"figure format must be png, svg or pdf, not {format!r}")
    path = _job_path(job_id, "figures", name)
    headers = {"Accept": f"{media}, application/problem+json"}
    params = {"format": format, **{k: v for k, v in (options or {}).items() if v is not None}}
    return _Call("GET", path, _raw, params=params, headers=headers)


def _status(job_id: str) -> _Call[JobStatus]:
    return _Call("GET", _job_path(job_id), _decoder(JobStatus))


def _result(job_id: str) -> _Call[JobResult]:
    return _Call("GET", _job_path(job_id, "result"), _decoder(JobResult))


def _cancel(job_id: str) -> _Call[JobStatus]:
    # keep_finished: a job that ends just before the request keeps its result (200 with its final status).
    return _Call("DELETE", _job_path(job_id), _decoder(JobStatus), params={"keep_finished": "true"})


def _list(offset: int, limit: int) -> _Call[JobPage]:
    return _Call("GET", "/v1/jobs", _decoder(JobPage), params={"offset": offset, "limit": limit})


_MODELS: _Call[ModelList] = _Call("GET", "/v1/models", _decoder(ModelList, "list of ModelInfo"))


# /ready answers 503 with a body when not ready: a boolean, not an error.
_READY: _Call[bool] = _Call("GET", "/ready", lambda response: response.status_code == 200, ok=lambda _: True)


def _finish(call: _Call[T], response: httpx.Response) -> T:
    if not call.ok(response):
        raise problem_from_response(response)
    return call.decode(response)


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """Base URL and headers, falling back to HYDRA_URL / HYDRA_API_KEY so notebooks and the CLI agree."""
    url = (base_url or os.environ.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE)
    headers = {"Accept": "application/json, application/problem+json", "User-Agent": "hydra-ablate-cli/0.1"}
    if key:
        headers["X-API-Key"] = key
    return url, headers


class _Deadline:
    """The polling budget of `wait`, shared by both clients."""

    def __init__(self, job_id: str, timeout_s: float | None) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        self.end = None if timeout_s is None else time.monotonic() + timeout_s

    def check(self, status: JobStatus) -> bool:
        """True when `status` is final; raises TimeoutError once the budget is spent."""
        if status.status in TERMINAL_STATES:
            return True
        if self.end is not None and time.monotonic() >= self.end:
            done, total = status.progress.done, status.progress.total
            raise TimeoutError(f"job {self.job_id} is still {status.status} ({done}/{total}) after {self.timeout_s:g}s")
        return False


class HydraClient:
    """Blocking client; use as a context manager (or call `close`) to release the connection pool."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30) -> None:
        self.base_url, headers = _settings(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(
                call.method, call.path, params=call.params, content=call.content, headers=call.headers
            )
        except httpx.TransportError as exc:
            raise HydraConnectionError(self.base_url, exc) from exc
        return _finish(call, response)

    def submit(self, request: Mapping[str, Any] | JobRequest, idempotency_key: str | None = None) -> JobStatus:
        """Queue a job (202); poll it with `status` or `wait`."""
        return self._send(_submit(request, idempotency_key))

    def status(self, job_id: str) -> JobStatus:
        return self._send(_status(job_id))

    def wait(
        self,
        job_id: str,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Poll until the job succeeded, failed or was cancelled; TimeoutError after `timeout_s`."""
        deadline = _Deadline(job_id, timeout_s)
        while True:
            status = self.status(job_id)
            if on_progress is not None:
                on_progress(status)
            if deadline.check(status):
                return status
            time.sleep(poll_s)

    def result(self, job_id: str) -> JobResult:
        """A succeeded job's result; HydraError 409 while it runs or when it failed (the detail says which)."""
        return self._send(_result(job_id))

    def figure(self, job_id: str, name: str, format: FigureFormat = "png", **options: Any) -> bytes:
        """A rendered figure of a succeeded job (names in FIGURE_NAMES), as PNG, SVG or PDF bytes; `options` are
        the figure's query parameters (width, height, dpi, prompt, component)."""
        return self._send(_figure(job_id, name, format, options))

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job; a job that has already finished is returned as it is, result kept
        (deleting a finished job is the API's DELETE without keep_finished)."""
        return self._send(_cancel(job_id))

    def list(self, offset: int = 0, limit: int = 50) -> JobPage:
        """One page of jobs, newest first."""
        return self._send(_list(offset, limit))

    def models(self) -> ModelList:
        return self._send(_MODELS)

    def ready(self) -> bool:
        """Whether Redis and a worker answer; False also when the API itself is unreachable."""
        try:
            return self._send(_READY)
        except HydraConnectionError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HydraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHydraClient:
    """The asyncio twin of HydraClient: same methods, awaited; use `async with` (or `await aclose()`)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30) -> None:
        self.base_url, headers = _settings(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, params=call.params, content=call.content, headers=call.headers
            )
        except httpx.TransportError as exc:
            raise HydraConnectionError(self.base_url, exc) from exc
        return _finish(call, response)

    async def submit(self, request: Mapping[str, Any] | JobRequest, idempotency_key: str | None = None) -> JobStatus:
        return await self._send(_submit(request, idempotency_key))

    async def status(self, job_id: str) -> JobStatus:
        return await self._send(_status(job_id))

    async def wait(
        self,
        job_id: str,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        deadline = _Deadline(job_id, timeout_s)
        while True:
            status = await self.status(job_id)
            if on_progress is not None:
                on_progress(status)
            if deadline.check(status):
                return status
            await asyncio.sleep(poll_s)

    async def result(self, job_id: str) -> JobResult:
        return await self._send(_result(job_id))

    async def figure(self, job_id: str, name: str, format: FigureFormat = "png", **options: Any) -> bytes:
        return await self._send(_figure(job_id, name, format, options))

    async def cancel(self, job_id: str) -> JobStatus:
        return await self._send(_cancel(job_id))

    async def list(self, offset: int = 0, limit: int = 50) -> JobPage:
        return await self._send(_list(offset, limit))

    async def models(self) -> ModelList:
        return await self._send(_MODELS)

    async def ready(self) -> bool:
        try:
            return await self._send(_READY)
        except HydraConnectionError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHydraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
