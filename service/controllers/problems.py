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
