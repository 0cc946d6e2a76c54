"""Issue 12, operations: /metrics parses with the Prometheus text parser and counts a job that ran (live stack);
X-Request-ID accepted and echoed; RateLimit-* headers; JSON logs carrying request and job ids."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.core.json_logging import ContextFilter, JsonFormatter
from service.core.settings import Settings
from tests import test_api
from tests.test_api import submit
from tests.test_stack_e2e import wait_terminal

settings = test_api.settings
store = test_api.store
client = test_api.client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture()
def stack_api(celery_worker: object, stack_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(stack_settings)) as api:
        yield api


def test_metrics_parse_and_count_a_job_that_ran(stack_api: TestClient) -> None:
    before = samples(stack_api.get("/metrics").text)
    body = {"model": "tiny-gpt2", "prompts": ["a b c", "d e f"], "components": ["attn", "mlp"]}
    job = stack_api.post("/v1/jobs", json=body).json()
    assert wait_terminal(stack_api, job["id"])["status"] == "succeeded"
    response = stack_api.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("hydra_jobs", status="succeeded") >= 1
    assert delta("hydra_job_duration_seconds_count", status="succeeded") >= 1
    assert delta("hydra_chunk_duration_seconds_count") >= 1
    n_layers = 2  # the tiny models have two layers (tests/tiny_models.py): 2 prompts × 4 components
    assert delta("hydra_ablations_total") >= 2 * 2 * n_layers
    assert delta("hydra_model_cache_hits_total") + delta("hydra_model_cache_misses_total") >= 1
    assert ("hydra_queue_depth", (("queue", "hydra-test"),)) in after
    assert delta("hydra_http_request_duration_seconds_count", method="POST", route="/v1/jobs", status="202") == 1
    polled = [
        labels
        for name, labels in after
        if name == "hydra_http_request_duration_seconds_count" and ("method", "GET") in labels
    ]
    routes = {dict(labels)["route"] for labels in polled}
    assert "/v1/jobs/{job_id}" in routes and not any(job["id"] in route for route in routes)  # templates, not ids


def test_request_id_is_accepted_echoed_and_made_when_missing(client: TestClient) -> None:
    given = "trace-" + uuid.uuid4().hex
    assert client.get("/v1/jobs", headers={"X-Request-ID": given}).headers["x-request-id"] == given
    made = client.get("/v1/jobs").headers["x-request-id"]
    assert len(made) == 32 and made != given
    assert client.get("/v1/jobs", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != "bad id"
    unauthorised = client.get("/v1/jobs", headers={"X-API-Key": "wrong", "X-Request-ID": given})
    assert unauthorised.status_code == 401 and unauthorised.headers["x-request-id"] == given
    assert client.get("/health").headers["x-request-id"]


def test_rate_limit_headers_on_every_rate_limited_response(settings: Settings, store: Any) -> None:
    with test_api.keyed_client(replace(settings, rate_limit_read=3, rate_window_s=60)) as limited:
        seen = []
        for _ in range(4):
            response = limited.get("/v1/jobs")
            headers = response.headers
            seen.append((response.status_code, headers.get("ratelimit-limit"), headers.get("ratelimit-remaining")))
            assert 1 <= int(response.headers["ratelimit-reset"]) <= 60
        assert seen == [(200, "3", "2"), (200, "3", "1"), (200, "3", "0"), (429, "3", "0")]
        assert "ratelimit-limit" not in limited.get("/health").headers  # not a rate-limited route


def test_json_logs_carry_request_and_job_ids(client: TestClient) -> None:
    import io

    job = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    access = logging.getLogger("hydra.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        client.get(f"/v1/jobs/{job['id']}", headers={"X-Request-ID": "req-42"})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    record = next(line for line in lines if line["request_id"] == "req-42")
    assert record["job_id"] == job["id"] and record["level"] == "info" and record["logger"] == "hydra.access"
    assert record["status_code"] == 200 and record["route"] == "/v1/jobs/{job_id}" and record["time"].endswith("Z")


def test_log_format_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core.json_logging import json_logs_requested

    monkeypatch.setenv("HYDRA_LOG_FORMAT", "JSON")
    assert json_logs_requested()
    monkeypatch.setenv("HYDRA_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="HYDRA_LOG_FORMAT"):
        json_logs_requested()
