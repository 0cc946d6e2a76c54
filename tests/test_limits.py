"""Per-key limits against the real app and the session's Redis: request rate (shared by API processes), jobs in
flight, request body size and prompt length in tokens (with a real tokenizer built offline)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import redis
from litestar.testing import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from service.api.app import create_app
from service.core.errors import ValidationProblem
from service.core.settings import MIB, Settings
from service.core.store import ActiveJobsExceeded, JobStore
from tests.test_api import assert_problem
from tests.test_auth import ALICE, BOB, JOB, TWO, auth, settings, store

__all__ = ["settings", "store"]


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def app_client(settings: Settings, **changes: Any) -> TestClient:
    return TestClient(create_app(replace(settings, **changes)))


def post(client: TestClient, key: str = ALICE, body: dict[str, Any] | None = None) -> Any:
    return client.post("/v1/jobs", json=body or JOB, headers=auth(key))


# --- request rate ----------------------------------------------------------------------------------------------


def assert_rate_limited(response: Any, limit: int, window_s: int) -> int:
    problem = assert_problem(response, 429, "rate limit", f"at most {limit}", f"per {window_s} s")
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= window_s, retry_after
    assert f"retry in {retry_after} s" in problem["detail"]
    return retry_after


def test_reads_and_writes_are_limited_per_key(settings: Settings, store: JobStore) -> None:
    with app_client(settings, rate_limit_read=3, rate_limit_write=2, rate_window_s=60) as client:
        for _ in range(3):
            assert client.get("/v1/jobs", headers=auth(ALICE)).status_code == 200
        assert_rate_limited(client.get("/v1/jobs", headers=auth(ALICE)), 3, 60)
        job_id = "0" * 32
        assert_rate_limited(client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)), 3, 60)  # polling counts too

        # Writes have their own budget, and another key has its own counters.
        assert post(client).status_code == 202
        assert post(client).status_code == 202
        assert_rate_limited(post(client), 2, 60)
        assert_rate_limited(client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)), 2, 60)
        assert client.get("/v1/jobs", headers=auth(BOB)).status_code == 200
        assert post(client, BOB).status_code == 202

        # Open routes are never limited.
        assert all(client.get("/health").status_code == 200 for _ in range(5))


def test_two_api_processes_share_the_limit(settings: Settings, store: JobStore) -> None:
    """Two app instances (as two uvicorn processes would be) count into the same Redis window."""
    limited = replace(settings, rate_limit_read=3, rate_window_s=60)
    with TestClient(create_app(limited)) as first, TestClient(create_app(limited)) as second:
        assert first.get("/v1/jobs", headers=auth(ALICE)).status_code == 200
        assert second.get("/v1/jobs", headers=auth(ALICE)).status_code == 200
        assert first.get("/v1/jobs", headers=auth(ALICE)).status_code == 200
        assert_rate_limited(second.get("/v1/jobs", headers=auth(ALICE)), 3, 60)
        assert_rate_limited(first.get("/v1/jobs", headers=auth(ALICE)), 3, 60)


def test_the_window_reopens_after_retry_after(settings: Settings, store: JobStore) -> None:
    with app_client(settings, rate_limit_read=1, rate_window_s=1) as client:
        assert client.get("/v1/jobs", headers=auth(ALICE)).status_code == 200
        retry_after = assert_rate_limited(client.get("/v1/jobs", headers=auth(ALICE)), 1, 1)
        time.sleep(retry_after + 0.1)
        assert client.get("/v1/jobs", headers=auth(ALICE)).status_code == 200


def test_zero_switches_the_rate_limit_off(settings: Settings, store: JobStore) -> None:
    with app_client(settings, rate_limit_read=0) as client:
        assert all(client.get("/v1/jobs", headers=auth(ALICE)).status_code == 200 for _ in range(20))


# --- jobs in flight ---------------------------------------------------------------------------------------------


def test_queued_and_running_jobs_are_capped_per_key(
    settings: Settings, store: JobStore, broker: redis.Redis
) -> None:
    with app_client(settings, max_active_jobs=2) as client:
        first, second = post(client).json(), post(client).json()
        response = post(client)
        assert_problem(response, 429, "'alice' has 2 queued or running jobs", "allows 2", "cancel one")
        assert "retry-after" not in response.headers  # when a slot frees depends on the jobs, not on a clock
        assert broker.llen(settings.queue_name) == 2
        assert post(client, BOB).status_code == 202  # another key's own budget

        # A running job still counts; a finished or cancelled one frees its slot.
        assert store.mark_running(first["id"])
        assert_problem(post(client), 429)
        assert store.mark_succeeded(first["id"], b"{}")
        third = post(client)
        assert third.status_code == 202
        assert_problem(post(client), 429)
        client.delete(f"/v1/jobs/{second['id']}", headers=auth(ALICE))
        assert post(client).status_code == 202
        assert client.get("/v1/jobs", headers=auth(ALICE)).json()["total"] == 4


def test_the_cap_holds_under_concurrent_submits(store: JobStore) -> None:
    """The check and the insert are one Redis script: ten racing creates, exactly three win."""
    spec = _spec()

    def create(_: int) -> bool:
        try:
            store.create(spec, 1, "racer", max_active=3)
        except ActiveJobsExceeded:
            return False
        return True

    with ThreadPoolExecutor(max_workers=10) as pool:
        outcomes = list(pool.map(create, range(10)))
    assert outcomes.count(True) == 3
    assert store.page(owner="racer").total == 3


def _spec() -> Any:
    from hydra_ablate_client.wire import JobSpec

    return JobSpec(
        model="tiny",
        prompts=TWO,
        answers=None,
        counterfactuals=None,
        components=["attn.0"],
        ablation="resample",
        positions="final",
        metric="logit",
        norm_scale="clean",
        resample_samples=1,
        resample_from="next",
        mean_reference_prompts=None,
        seed=0,
    )


# --- request body size -------------------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_413(settings: Settings, store: JobStore, broker: redis.Redis) -> None:
    with app_client(settings, max_body_bytes=2000) as client:
        body = {"model": "tiny", "prompts": ["x" * 1500, "y" * 1500], "components": ["attn.0"]}
        assert_problem(post(client, body=body), 413)
        assert post(client).status_code == 202  # small bodies still pass
    assert broker.llen(settings.queue_name) == 1


def test_the_default_body_limit_is_10_mib(settings: Settings, store: JobStore) -> None:
    assert Settings().max_body_bytes == 10 * MIB
    huge = b'{"model": "tiny", "prompts": ["' + b"a" * (10 * MIB) + b'"]}'
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs", content=huge, headers={**auth(ALICE), "content-type": "application/json"})
        assert_problem(response, 413)


# --- prompt length in tokens ---------------------------------------------------------------------------------------


def word_tokenizer_json() -> str:
    """A real (tiny) tokenizers.Tokenizer: one token per whitespace-separated word."""
    words = "[UNK] the capital of france is paris berlin germany a very long prompt".split()
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer.to_str()


def test_prompts_over_the_token_limit_are_422(settings: Settings, store: JobStore) -> None:
    store.client.set(store.keys.tokenizer("tiny"), word_tokenizer_json())
    assert store.tokenizer_json("tiny") == word_tokenizer_json()
    with app_client(settings, max_prompt_tokens=5) as client:
        ok = ["the capital of france is", "paris is"]
        assert post(client, body={**JOB, "prompts": ok}).status_code == 202
        too_long = ["the capital of france is", "a very long prompt of six", "short"]
        problem = assert_problem(
            post(client, body={**JOB, "prompts": too_long}),
            422,
            "prompts[1] is 6 tokens long for model tiny",
            "limit of 5 tokens",
        )
        assert problem["field"] == "prompts[1]"


def test_concurrent_first_submits_fetch_and_parse_the_tokenizer_once(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single flight: 50 threads asking for a cold model's tokenizer at once cause one fetch and one parse."""
    import threading

    from service.core import prompt_tokens

    words = [f"w{i}" for i in range(50_000)]  # a big vocabulary: parsing takes long enough for threads to pile up
    big = Tokenizer(models.WordLevel({word: i for i, word in enumerate([*words, "[UNK]"])}, unk_token="[UNK]"))
    store.client.set(store.keys.tokenizer("tiny"), big.to_str())
    parses: list[int] = []
    real_parse = prompt_tokens._parse

    def counting_parse(text: str) -> Any:
        parses.append(1)
        return real_parse(text)

    monkeypatch.setattr(prompt_tokens, "_parse", counting_parse)
    counters = prompt_tokens.TokenCounters()
    start = threading.Barrier(50)
    got: list[object] = []

    def ask() -> None:
        start.wait()
        got.append(counters.get(store, "tiny"))

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(parses) == 1, f"{len(parses)} parses"
    assert len(got) == 50 and got[0] is not None and all(t is got[0] for t in got)
    assert counters.loads == 1


def test_the_background_warmer_parses_tokenizers_before_any_request(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh API's first burst must not queue behind a parse: the warmer thread parses every advertised model's
    tokenizer on its own, then requests only read the parsed one."""
    import threading

    from service.core import prompt_tokens

    store.client.set(store.keys.tokenizer("tiny"), word_tokenizer_json())  # the other advertised model has none
    parses: list[str] = []
    real_parse = prompt_tokens._parse
    def parse(text: str) -> Any:
        parses.append(threading.current_thread().name)
        return real_parse(text)

    monkeypatch.setattr(prompt_tokens, "_parse", parse)
    counters = prompt_tokens.TokenCounters(refresh_s=60.0)
    stop = threading.Event()
    warmer = threading.Thread(target=counters.keep_warm, args=(store, stop, 0.05), name="warmer", daemon=True)
    warmer.start()
    try:
        deadline = time.monotonic() + 10
        while not parses and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # a few more rounds: a fresh tokenizer is not parsed again
        assert parses == ["warmer"], f"parsed by {parses}"
        assert counters.get(store, "tiny") is not None
        assert parses == ["warmer"], "a request parsed although the warmer had"
    finally:
        stop.set()
        warmer.join(timeout=5)
    assert not warmer.is_alive(), "the warmer did not stop when asked"


def test_new_redis_connections_do_not_look_up_the_driver_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py looks its version up with importlib.metadata for every new connection unless told it (~10 ms per
    connection on a long sys.path); the service tells it once per process."""
    import importlib.metadata

    import redis.asyncio

    from service.core.redis_options import driver_options

    driver_options()  # computed once, before the lookups are forbidden
    monkeypatch.setattr(importlib.metadata, "version", lambda name: pytest.fail(f"looked up {name}'s version"))
    for client in (
        redis.Redis.from_url("redis://127.0.0.1:1/0", **driver_options()),
        redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0", **driver_options()),
    ):
        client.connection_pool.make_connection()


def test_publishing_a_job_builds_no_result_backend_in_the_request_thread(settings: Settings, store: JobStore) -> None:
    """Celery's result backend is per thread and costly to build (an entry-point scan); the API reads no results,
    so a submit in a fresh thread must not build one."""
    import threading

    from service.core.queue import JobQueue

    queue = JobQueue(settings)
    built: list[bool] = []

    def submit_once() -> None:
        queue.enqueue("some-job")
        built.append(hasattr(queue.celery_app._local, "backend"))

    try:
        thread = threading.Thread(target=submit_once)
        thread.start()
        thread.join(timeout=30)
    finally:
        queue.close()
    assert built == [False]


def test_the_app_opens_its_redis_connections_at_start(settings: Settings, store: JobStore) -> None:
    """A burst of first requests must not each open a connection: the pools are filled at start-up."""
    from service.api.app import WARM_CONNECTIONS

    with app_client(settings) as client:
        assert client.get("/health").status_code == 200
        app_store = client.app.state.store
        assert len(app_store.client.connection_pool._available_connections) >= WARM_CONNECTIONS
        assert len(client.app.state.aredis.connection_pool._available_connections) >= WARM_CONNECTIONS


def test_without_a_published_tokenizer_the_token_check_is_skipped(settings: Settings, store: JobStore) -> None:
    assert store.tokenizer_json("tiny") is None
    with app_client(settings, max_prompt_tokens=2) as client:
        assert post(client, body={**JOB, "prompts": ["one two three four", "five six seven"]}).status_code == 202


def test_limits_come_from_the_environment(monkeypatch: Any) -> None:
    env = {
        "HYDRA_RATE_LIMIT_WRITE": "7",
        "HYDRA_RATE_LIMIT_READ": "0",
        "HYDRA_RATE_WINDOW_S": "10",
        "HYDRA_MAX_ACTIVE_JOBS": "3",
        "HYDRA_MAX_PROMPT_TOKENS": "64",
        "HYDRA_MAX_BODY_BYTES": "4096",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert (
        settings.rate_limit_write,
        settings.rate_limit_read,
        settings.rate_window_s,
        settings.max_active_jobs,
        settings.max_prompt_tokens,
        settings.max_body_bytes,
    ) == (7, 0, 10, 3, 64, 4096)
    monkeypatch.setenv("HYDRA_RATE_WINDOW_S", "0")
    with pytest.raises(ValueError, match="HYDRA_RATE_WINDOW_S must be at least 1"):
        Settings.from_env()


def test_submits_read_the_served_models_at_most_once_a_second_and_never_miss_a_new_one(
    settings: Settings, store: JobStore
) -> None:
    """The model list is kept for a second (ServedModels); a model not in the kept list is looked up afresh before
    a request is refused, so one advertised a moment ago is accepted at once, and a refused one says why."""
    import msgspec

    from hydra_ablate_client.wire import JobRequest
    from service.core.served_models import ServedModels
    from tests.test_api import SMOLLM

    served = ServedModels(max_age_s=60.0)
    reads: list[int] = []
    real_models = store.models

    def counted() -> Any:
        reads.append(1)
        return real_models()

    store.models = counted  # type: ignore[method-assign]

    def request(model: str) -> JobRequest:
        return msgspec.convert({**JOB, "model": model}, JobRequest)

    assert served.resolve(request("tiny"), store, settings).model == "tiny"
    for _ in range(5):
        served.resolve(request("tiny"), store, settings)
    assert len(reads) == 1  # one read for six submits within the minute

    store.advertise_model(msgspec.structs.replace(SMOLLM, id="fresh-model"))  # after the list was kept
    assert served.resolve(request("fresh-model"), store, settings).model == "fresh-model"
    assert len(reads) == 2

    store.refuse_model("odd-model", "its attention has no output projection")
    with pytest.raises(ValidationProblem, match="cannot be ablated: its attention has no output projection"):
        served.resolve(request("odd-model"), store, settings)
    with pytest.raises(ValidationProblem, match="unknown model 'nowhere'"):
        served.resolve(request("nowhere"), store, settings)
    with pytest.raises(ValidationProblem, match="layer") as problem:  # not a model error: no second read
        before = len(reads)
        served.resolve(msgspec.convert({**JOB, "components": ["attn.99"]}, JobRequest), store, settings)
    assert problem.value.field != "model" and len(reads) == before


def test_the_event_loop_checks_submits_against_what_is_kept_and_never_reads_redis_for_it(
    settings: Settings, store: JobStore
) -> None:
    """The submit route runs on the event loop: it resolves against the kept model list and tokenizers only
    (`resolve_recent`, `recent`), and says None (check in a thread) when the list is stale or lacks the model, or
    the tokenizer is not kept; a request that is wrong in another way is refused at once."""
    import msgspec

    from hydra_ablate_client.wire import JobRequest
    from service.core import prompt_tokens
    from service.core.served_models import ServedModels

    served = ServedModels(max_age_s=60.0)
    request = msgspec.convert(JOB, JobRequest)
    assert served.resolve_recent(request, settings) is None  # nothing read yet
    reads: list[int] = []
    real_models = store.models

    def counted() -> Any:
        reads.append(1)
        return real_models()

    store.models = counted  # type: ignore[method-assign]
    assert [info.id for info in served.refreshed(store)] and reads == [1]  # what the warm-up thread calls
    spec = served.resolve_recent(request, settings)
    assert spec is not None and spec.model == JOB["model"] and reads == [1]
    assert served.resolve_recent(msgspec.convert({**JOB, "model": "elsewhere"}, JobRequest), settings) is None
    with pytest.raises(ValidationProblem, match="layer"):
        served.resolve_recent(msgspec.convert({**JOB, "components": ["attn.99"]}, JobRequest), settings)
    assert reads == [1]
    stale = ServedModels(max_age_s=0.0)
    stale.refreshed(store)
    assert stale.resolve_recent(request, settings) is None

    store.client.set(store.keys.tokenizer("tiny"), word_tokenizer_json())
    counters = prompt_tokens.TokenCounters(refresh_s=60.0)
    assert counters.recent("tiny") == (False, None)
    tokenizer = counters.get(store, "tiny")
    assert tokenizer is not None and counters.recent("tiny") == (True, tokenizer)
    assert counters.recent("no-such-model") == (False, None)


def test_the_app_keeps_the_served_models_fresh_for_the_event_loop(settings: Settings, store: JobStore) -> None:
    """The app's warm-up thread re-reads the model list twice within its maximum age, so the submit route keeps
    finding it fresh (no thread, no Redis read) for as long as the app runs."""
    import msgspec

    from hydra_ablate_client.wire import JobRequest

    request = msgspec.convert(JOB, JobRequest)
    with app_client(settings) as client:
        served = client.app.state.served
        deadline = time.monotonic() + 10
        while served.resolve_recent(request, settings) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(6):  # past the list's maximum age: it is still fresh
            assert served.resolve_recent(request, settings) is not None
            time.sleep(served.max_age_s / 2)


def test_every_job_and_webhook_route_is_rate_limited(settings: Settings) -> None:
    """The app's one guard limits the routes whose controllers opt in (service/api/controllers/strict_query.py): every
    route under /v1/jobs and /v1/webhooks, and none of the open ones."""
    from service.api.controllers.strict_query import RATE_LIMITED

    app = create_app(settings)
    limited = {
        route.path: bool(handler.opt.get(RATE_LIMITED))
        for route in app.routes
        for handler in getattr(route, "route_handlers", [])
    }
    assert all(on for path, on in limited.items() if path.startswith(("/v1/jobs", "/v1/webhooks"))), limited
    assert not any(limited[path] for path in ("/health", "/ready", "/metrics", "/v1/models"))


def test_the_app_loads_its_event_loop_scripts_at_start_up(settings: Settings, broker: redis.Redis) -> None:
    """A fresh Redis knows no script: without loading them first, every request of the first burst would get
    NOSCRIPT and pay a second round trip."""
    import hashlib

    from service.api.rate_limits import RATE_SCRIPT
    from service.core.store import LOOP_SCRIPTS

    digests = [hashlib.sha1(script.encode()).hexdigest() for script in (*LOOP_SCRIPTS, RATE_SCRIPT)]
    broker.script_flush()  # as on a fresh server (redis-py reloads a flushed script where one is needed)
    assert not any(broker.script_exists(*digests))
    with app_client(settings):
        deadline = time.monotonic() + 10
        while not all(broker.script_exists(*digests)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(broker.script_exists(*digests))
