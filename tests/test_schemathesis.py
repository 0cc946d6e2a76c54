"""Schemathesis fuzzes every operation of the live API (uvicorn on a free port, the session's Redis, a test key)
and checks that nothing answers 5xx and every response matches the OpenAPI document the app serves.

Bounded: a fixed number of examples per operation and no deadline per example, so the module takes well under
90 s on 2 cores. Generated job ids are random (404s); a seeded, succeeded job is checked as well, so the 200 answers
of the result and figure routes are validated too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from service.api.app import create_app
from service.core.settings import Settings
from service.core.store import JobStore
from tests.live_server import serve
from tests.test_api import SMOLLM, TINY
from tests.test_figures import build_result, store_succeeded

ADMIN_KEY = "schemathesis-admin-key"
USER_KEY = "schemathesis-user-key"  # a second, non-admin key: the same inputs under another owner
CHECKS = [not_a_server_error, response_schema_conformance]
# Per operation and mode: reaches every documented status of this API and takes ~15 s on 2 cores; raise it with
# HYDRA_FUZZ_EXAMPLES for a longer hunt (500 ran clean).
EXAMPLES = int(os.environ.get("HYDRA_FUZZ_EXAMPLES", "60"))


@dataclass(frozen=True)
class Live:
    url: str
    settings: Settings
    job_id: str  # a succeeded job with a real result


@pytest.fixture(scope="module")
def live(redis_url: str, celery_worker: object) -> Iterator[Live]:
    """The app served by uvicorn; the session's real Celery worker (same Redis) answers /ready's ping.

    Starting and stopping a second in-thread worker here would stop the session worker's consumer too (Celery's
    worker state is per process), so the fuzzer shares the session worker; its queue is its own, so that worker
    runs none of the fuzzer's jobs.
    """
    tag = uuid.uuid4().hex
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"test-st:{tag}:",
        queue_name=f"hydra-test-{tag}",
        ready_timeout_s=2.0,  # an in-thread worker can take ~1 s to answer a ping
        api_keys=f"fuzzer:{ADMIN_KEY}:admin,other:{USER_KEY}",
        rate_limit_read=0,  # the fuzzer is one key sending hundreds of requests a second
        rate_limit_write=0,
        max_active_jobs=0,  # nothing runs the queued jobs: a cap would turn most submits into 429s
    )
    store = JobStore.from_settings(settings)
    store.advertise_model(SMOLLM)
    store.advertise_model(TINY)
    job_id = store_succeeded(store, build_result(heads=2))
    try:
        with serve(create_app(settings)) as url:
            yield Live(url, settings, job_id)
    finally:
        for key in store.client.scan_iter(match=f"{settings.key_prefix}*"):
            store.client.delete(key)
        store.client.delete(settings.queue_name)
        store.close()


@pytest.fixture(scope="module")
def api_schema(live: Live) -> schemathesis.BaseSchema:
    """The document the running app serves, not the committed file (test_openapi keeps those equal)."""
    return schemathesis.openapi.from_url(f"{live.url}/schema/openapi.json")


def operation_cases() -> list[tuple[str, GenerationMode]]:
    """Every operation of the app's document (no Redis needed to build it), e.g. "POST /v1/jobs", with valid
    inputs, and with invalid ones where it takes any (an operation without parameters has none to break)."""
    document = create_app(Settings()).openapi_schema.to_schema()
    cases = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            cases.append((label, GenerationMode.POSITIVE))
            if operation.get("parameters") or operation.get("requestBody"):
                cases.append((label, GenerationMode.NEGATIVE))
    return cases


# Driven through Hypothesis directly: schemathesis' pytest fixture integration (`from_fixture`) reads a pytest
# internal that pytest 9 no longer has.
def case_id(value: object) -> str:
    if isinstance(value, GenerationMode):
        return "valid" if value is GenerationMode.POSITIVE else "invalid"
    return str(value)


@pytest.mark.parametrize(("label", "mode"), operation_cases(), ids=case_id)
def test_no_server_errors_and_responses_match_the_schema(
    label: str, mode: GenerationMode, api_schema: schemathesis.BaseSchema, live: Live
) -> None:
    """Valid requests and requests that break the schema: neither may get a 5xx or an undocumented answer."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=live.url, headers={"X-API-Key": ADMIN_KEY}, checks=CHECKS)

    fuzz()


def test_success_answers_of_a_real_job_match_the_schema(api_schema: schemathesis.BaseSchema, live: Live) -> None:
    headers = {"X-API-Key": ADMIN_KEY}
    def call(case: schemathesis.Case) -> Any:
        return case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS)

    reads = [
        api_schema["/v1/jobs/{job_id}"]["GET"].Case(path_parameters={"job_id": live.job_id}),
        api_schema["/v1/jobs/{job_id}/result"]["GET"].Case(path_parameters={"job_id": live.job_id}),
        api_schema["/v1/jobs/{job_id}/figures/{name}"]["GET"].Case(
            path_parameters={"job_id": live.job_id, "name": "te_vs_de"}, query={"format": "svg"}
        ),
        api_schema["/v1/jobs"]["GET"].Case(),
        api_schema["/v1/models"]["GET"].Case(),
        api_schema["/health"]["GET"].Case(),
        api_schema["/ready"]["GET"].Case(),
    ]
    assert [call(case).status_code for case in reads] == [200] * len(reads)
    # A new job (its model has no worker, so it stays queued), then DELETE cancels it: 202 with its status. (DELETE
    # of a finished job deletes it, 204; the live job must stay for the other tests.)
    submitted = call(api_schema["/v1/jobs"]["POST"].Case(body={"model": "tiny", "prompts": ["a b", "c d"]}))
    assert submitted.status_code == 202
    cancel = api_schema["/v1/jobs/{job_id}"]["DELETE"].Case(path_parameters={"job_id": submitted.json()["id"]})
    cancelled = call(cancel)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    # Without a key: 401, documented as problem details.
    unauthorized = api_schema["/v1/jobs"]["GET"].Case().call_and_validate(base_url=live.url, checks=CHECKS)
    assert unauthorized.status_code == 401


def test_the_fuzzed_server_is_still_consistent(live: Live) -> None:
    client = redis.Redis.from_url(live.settings.redis_url)
    try:
        assert client.exists(f"{live.settings.key_prefix}job:{live.job_id}")
    finally:
        client.close()


# Per operation: the second key's share of the hunt (its own owner, no admin rights).
OTHER_KEY_EXAMPLES = max(1, EXAMPLES // 3)


@pytest.mark.parametrize(
    "label", sorted({label for label, mode in operation_cases() if mode is GenerationMode.POSITIVE})
)
def test_a_second_key_gets_no_server_errors_either(label: str, api_schema: schemathesis.BaseSchema, live: Live) -> None:
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @hypothesis_settings(
        max_examples=OTHER_KEY_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=live.url, headers={"X-API-Key": USER_KEY}, checks=CHECKS)

    fuzz()


def test_the_second_key_cannot_see_the_first_keys_job(live: Live) -> None:
    with httpx.Client(base_url=live.url, headers={"X-API-Key": USER_KEY}, timeout=30) as other:
        assert other.get(f"/v1/jobs/{live.job_id}").status_code == 404
        assert other.get(f"/v1/jobs/{live.job_id}/result").status_code == 404
        assert other.delete(f"/v1/jobs/{live.job_id}").status_code == 404


def hostile_requests(live: Live) -> list[tuple[str, str, bytes | None]]:
    """(method, path, raw body) for every operation of the app: OPTIONS on each path, and for each method a body of
    invalid UTF-8 inside a JSON string and a 50,000-deep nesting, whether or not the route takes a body."""
    document = create_app(Settings()).openapi_schema.to_schema()
    depth = 50_000
    bodies = [
        b'{"model": "tiny", "prompts": ["caf\xc3\x28", "\xff\xfe\xfd"]}',
        b'{"prompts": ' + b"[" * depth + b"]" * depth + b"}",
        b"[" * depth + b"]" * depth,
        b"\xff\xfe{\x00",  # not even text
    ]
    requests: list[tuple[str, str, bytes | None]] = []
    for template, operations in document["paths"].items():
        path = template.replace("{job_id}", live.job_id).replace("{name}", "te_vs_de")
        requests.append(("OPTIONS", path, None))
        for method in operations:
            requests.extend((method.upper(), path, body) for body in bodies)
    return requests


@pytest.mark.parametrize("key", [None, ADMIN_KEY, USER_KEY], ids=["no-key", "admin-key", "user-key"])
def test_options_raw_non_utf8_bodies_and_deep_nesting_never_get_a_server_error(live: Live, key: str | None) -> None:
    """Inputs a schema-driven fuzzer does not generate: answered 2xx or 4xx, every 4xx as problem details."""
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": key} if key else {})
    failures = []
    with httpx.Client(base_url=live.url, headers=headers, timeout=60) as http:
        for method, path, body in hostile_requests(live):
            response = http.request(method, path, content=body)
            if response.status_code >= 500:
                size = len(body or b"")
                failures.append(f"{method} {path} ({size} bytes): {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400 and not response.headers["content-type"].startswith(
                "application/problem+json"
            ):
                failures.append(f"{method} {path}: {response.status_code} is not problem details")
    assert not failures, "\n".join(failures)
