"""OpenAPI documentation of error responses: every error is a ProblemDetails document (application/problem+json).

Declared per route so generated clients and schema fuzzers know each route's failure modes; Litestar's own
automatic 400 entry (plain JSON, another shape) is replaced by these.
"""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from service.schemas import ProblemDetails

PROBLEM_JSON = "application/problem+json"

_DESCRIPTIONS = {
    400: "Malformed request: bad JSON, an unknown field, a wrong type or a value out of bounds",
    404: "No such job (never existed, or expired)",
    409: "The job is not in a state that allows this",
    422: "Well-formed but cannot run: unknown model, component out of range, mismatched lists, too many ablations",
    503: "Redis, the broker or the workers are not available",
}


def problem_responses(*status_codes: int) -> dict[int, ResponseSpec]:
    """ResponseSpecs for the given error statuses, all documented as problem details."""
    return {
        code: ResponseSpec(
            data_container=ProblemDetails,
            media_type=PROBLEM_JSON,
            description=_DESCRIPTIONS[code],
            generate_examples=False,
        )
        for code in status_codes
    }
