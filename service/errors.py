"""The service's domain errors: plain exceptions, free of HTTP.

Domain code (resolve, limits, store) raises these; the worker imports some of that code, so nothing here may pull
in the web framework. How each becomes an HTTP answer (status, problem-details document) is decided in one place,
service/controllers/problems.py.
"""

from __future__ import annotations


class ValidationProblem(Exception):
    """A job request that parses but cannot run (unknown model, layer out of range, …)."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class BackendUnavailable(Exception):
    """Redis or the broker did not answer: the request may succeed later."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
