"""The service's domain errors: plain exceptions, free of HTTP.

Domain code (resolve, limits, store) raises these; the worker imports some of that code, so nothing here may pull
in the web framework. How each becomes an HTTP answer (status, problem-details document) is decided in one place,
service/api/controllers/problems.py.
"""

from __future__ import annotations


class ValidationProblem(Exception):
    """A job request that parses but cannot run (unknown model, layer out of range, …)."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class BackendUnavailable(Exception):
    """Redis or the broker did not answer, or the process is busy: the request may succeed later (Retry-After)."""

    def __init__(self, detail: str, retry_after_s: int = 5) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class JobNotFound(Exception):
    """No such job for this caller: never existed, expired, or owned by another API key (the same answer for all)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class JobConflict(Exception):
    """The job is not in a state that allows this (no result yet, failed, cancelled, already finished)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
