"""Hostile inputs answered with 4xx problem details, never 500: OPTIONS without a key, invalid UTF-8 inside JSON
strings, absurdly deep nesting, a seed sent as a string. Real app, real Redis (the session's private server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from tests.test_api import API_KEY, assert_problem, keyed_client, settings, store  # noqa: F401 - fixtures

JOB_ROUTES = ["/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/result", "/v1/jobs/{id}/figures/te_vs_de"]


@pytest.fixture
def anonymous(settings, store) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]  # noqa: F811
    with keyed_client(settings) as client:
        del client.headers["X-API-Key"]
        yield client


@pytest.fixture
def client(settings, store) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]  # noqa: F811
    with keyed_client(settings) as client:
        yield client


@pytest.mark.parametrize("route", JOB_ROUTES)
def test_options_on_job_routes_without_a_key_is_not_a_server_error(anonymous: TestClient, route: str) -> None:
    response = anonymous.options(route.replace("{id}", uuid.uuid4().hex))
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_problem(response, response.status_code)


@pytest.mark.parametrize("route", JOB_ROUTES)
def test_options_on_job_routes_with_a_key_is_not_a_server_error(client: TestClient, route: str) -> None:
    response = client.options(route.replace("{id}", uuid.uuid4().hex))
    assert response.status_code < 500, response.text


def test_invalid_utf8_inside_a_json_string_is_400(client: TestClient) -> None:
    body = b'{"model": "tiny", "prompts": ["caf\xc3\x28 \xff\xfe"]}'
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert_problem(response, 400)


def test_50000_deep_nesting_is_4xx(client: TestClient) -> None:
    depth = 50_000
    body = b'{"prompts": ' + b"[" * depth + b"]" * depth + b"}"
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code)
    bare = b"[" * depth + b"]" * depth
    response = client.post("/v1/jobs", content=bare, headers={"Content-Type": "application/json"})
    assert_problem(response, response.status_code)
    assert 400 <= response.status_code < 500


def test_a_seed_sent_as_a_string_is_refused(client: TestClient) -> None:
    """Strict types: "0" is not the number 0 (msgspec's lax mode would turn it into one)."""
    response = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a b", "c d"], "seed": "0"})
    body = assert_problem(response, 400, "seed")
    assert "int" in body["detail"]
    response = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a b", "c d"], "resample_samples": "2"})
    assert_problem(response, 400, "resample_samples")
