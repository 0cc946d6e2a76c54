"""Refusal tables of job options: each row a bad request and the 422 it gets, checked by one parametrized test per
table (tests/test_estimate_jobs.py, tests/test_position_estimate_jobs.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.test_api import assert_problem

# (test id, fields over the table's base job, fragments of the 422's detail, the field the 422 names)
Refusal = tuple[str, dict[str, Any], tuple[str, ...], str]


def refusal_cases(table: Sequence[Refusal]) -> pytest.MarkDecorator:
    """Parametrizes a test with `body`, `fragments` and `field`, one case per row, named by its id."""
    return pytest.mark.parametrize(("body", "fragments", "field"), [c[1:] for c in table], ids=[c[0] for c in table])


def assert_refused(
    client: TestClient, job: dict[str, Any], body: dict[str, Any], fragments: tuple[str, ...], field: str
) -> None:
    """`job` with `body` over it is refused: a 422 whose detail holds every fragment and names `field`, and no job
    is stored."""
    problem = assert_problem(client.post("/v1/jobs", json={**job, **body}), 422, *fragments)
    assert problem["field"] == field
    assert client.get("/v1/jobs").json()["total"] == 0
