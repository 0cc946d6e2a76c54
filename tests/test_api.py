"""The HTTP API against a real Redis (the session's private redis-server) and a real Celery broker queue.

Each test gets its own key prefix and queue name, so tests never see each other's jobs or messages.
Model records are written straight into the store, as a worker would advertise them: data, not mocks.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import msgspec
import pytest
import redis
from litestar.testing import TestClient

from hydra_ablate_client.wire import ModelInfo
from service.api.app import create_app
from service.core.embedded_redis import free_port
from service.core.queue import TASK_RUN_JOB
from service.core.redis_replies import bytes_or_none
from service.core.settings import Settings
from service.core.store import JobStore
from tests.checks import present
from tests.conftest import private_settings

PROBLEM = "application/problem+json"
API_KEY = "test-api-key-for-tester"
API_KEYS = f"tester:{API_KEY}"  # HYDRA_API_KEYS syntax: one non-admin key named "tester"

SMOLLM = ModelInfo(
    id="smollm2-135m",
    architecture="LlamaForCausalLM",
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_model=576,
    vocab_size=49152,
    parallel_blocks=False,
    source="builtin",
)
TINY = ModelInfo(
    id="tiny",
    architecture="GPTNeoXForCausalLM",
    n_layers=4,
    n_heads=2,
    n_kv_heads=2,
    d_model=8,
    vocab_size=100,
    parallel_blocks=True,
    source="local",
)


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    with private_settings(redis_url, "api", ready_timeout_s=0.3, api_keys=API_KEYS) as settings:
        yield settings


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    store = JobStore.from_settings(settings)
    store.advertise_model(SMOLLM)
    store.advertise_model(TINY)
    yield store
    store.close()


def keyed_client(settings: Settings, key: str = API_KEY) -> TestClient:
    """A TestClient of a fresh app that sends `key` as X-API-Key on every request."""
    client = TestClient(create_app(settings))
    client.headers["X-API-Key"] = key
    return client


@pytest.fixture
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    with keyed_client(settings) as client:
        yield client


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def submit(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def assert_problem(response: Any, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], f"{fragment!r} not in {body['detail']!r}"
    return body


# --- submitting -------------------------------------------------------------------------------------------------


def test_submit_queues_the_job_and_publishes_it_on_the_broker(
    client: TestClient, settings: Settings, broker: redis.Redis
) -> None:
    prompts = ["The capital of France is", "Rome is in"]
    job = submit(client, model="tiny", prompts=prompts, components=["attn.1", "mlp.2"])
    assert job["status"] == "queued" and job["model"] == "tiny"
    assert job["progress"] == {"done": 0, "total": 2 * 2 * 1, "prompts_done": 0, "prompts_total": 2}
    assert client.get(f"/v1/jobs/{job['id']}").json() == job

    assert broker.llen(settings.queue_name) == 1
    message = json.loads(present(bytes_or_none(broker.lindex(settings.queue_name, 0))))
    assert message["headers"]["task"] == TASK_RUN_JOB
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [job["id"]] and kwargs == {}


def test_submit_stores_the_resolved_spec(client: TestClient, store: JobStore) -> None:
    job = submit(client, model="tiny", prompts=["a", "b", "c"], components=["mlp.3", "attn", "mlp", "head.1"])
    spec = present(store.spec(job["id"]))
    assert spec is not None
    assert spec.components == [
        "mlp.3",
        "attn.0",
        "mlp.0",
        "attn.1",
        "mlp.1",
        "attn.2",
        "mlp.2",
        "attn.3",
        "head.1.0",
        "head.1.1",
    ]
    assert (spec.ablation, spec.metric, spec.resample_samples, spec.resample_from, spec.seed) == (
        "resample",
        "logit",
        1,
        "next",
        0,
    )
    assert job["progress"]["total"] == 3 * 10


def test_defaults_pick_smollm_and_every_layer(client: TestClient, store: JobStore) -> None:
    job = submit(client, prompts=["a", "b"])
    spec = present(store.spec(job["id"]))
    assert spec.model == "smollm2-135m" and len(spec.components) == 60
    assert spec.components[:3] == ["attn.0", "mlp.0", "attn.1"]


def test_hydra_preset_runs_the_paper_setup_on_known_1000(client: TestClient, store: JobStore) -> None:
    dataset = {"name": "known_1000", "relation": "P36", "use_answers": True}
    job = submit(client, preset="hydra", model="tiny", dataset=dataset)
    spec = present(store.spec(job["id"]))
    assert (spec.ablation, spec.resample_samples, spec.resample_from, spec.metric) == (
        "resample",
        15,
        "random",
        "centered_logit",
    )
    assert len(spec.prompts) == 49 and spec.answers is not None and spec.answers[0].startswith(" ")
    assert job["progress"]["total"] == 49 * 8 * 15

    whole = submit(client, preset="hydra", model="tiny")
    assert len(present(store.spec(whole["id"])).prompts) == 1209


def test_mean_ablation_counts_one_sample_and_resolves_its_reference(client: TestClient, store: JobStore) -> None:
    job = submit(
        client,
        model="tiny",
        prompts=["only one"],
        components=["mlp.0"],
        ablation="mean",
        mean_reference={"name": "known_1000", "limit": 5},
    )
    assert job["progress"]["total"] == 1
    spec = present(store.spec(job["id"]))
    assert spec.resample_samples == 1 and len(present(spec.mean_reference_prompts)) == 5


# --- reading jobs and results ---------------------------------------------------------------------------------


def test_unknown_jobs_are_404_problems(client: TestClient) -> None:
    missing = uuid.uuid4().hex
    for response in (
        client.get(f"/v1/jobs/{missing}"),
        client.get(f"/v1/jobs/{missing}/result"),
        client.delete(f"/v1/jobs/{missing}"),
    ):
        assert_problem(response, 404, missing)


def test_result_is_409_until_the_job_succeeds(client: TestClient, store: JobStore) -> None:
    job = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0", "mlp.0"])
    assert_problem(client.get(f"/v1/jobs/{job['id']}/result"), 409, "queued", "0/4")

    assert store.mark_running(job["id"])
    store.set_progress(job["id"], 1, 4)
    assert_problem(client.get(f"/v1/jobs/{job['id']}/result"), 409, "running", "1/4")
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"]["done"] == 1

    result = b'{"id": "%s", "note": "stored bytes are served as they are"}' % job["id"].encode()
    assert store.mark_succeeded(job["id"], result)
    response = client.get(f"/v1/jobs/{job['id']}/result")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == result
    status = client.get(f"/v1/jobs/{job['id']}").json()
    progress = {"done": 4, "total": 4, "prompts_done": 2, "prompts_total": 2}
    assert status["status"] == "succeeded" and status["progress"] == progress


def test_result_of_failed_and_cancelled_jobs_is_409_with_the_reason(client: TestClient, store: JobStore) -> None:
    failed = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    store.mark_running(failed["id"])
    store.mark_failed(failed["id"], "CUDA out of memory")
    assert_problem(client.get(f"/v1/jobs/{failed['id']}/result"), 409, "failed", "CUDA out of memory")

    cancelled = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    client.delete(f"/v1/jobs/{cancelled['id']}")
    assert_problem(client.get(f"/v1/jobs/{cancelled['id']}/result"), 409, "cancelled")


def test_a_restarted_api_loses_nothing(settings: Settings, store: JobStore) -> None:
    """The API keeps no state of its own: a new process (a new app on the same Redis) serves every job."""
    with keyed_client(settings) as before:
        job = submit(before, model="tiny", prompts=["a", "b"], components=["attn.0"])
        listed = before.get("/v1/jobs").json()
    with keyed_client(settings) as after:
        assert after.get(f"/v1/jobs/{job['id']}").json() == job
        assert after.get("/v1/jobs").json() == listed


def test_cancel(client: TestClient, store: JobStore) -> None:
    job = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    assert store.is_cancelled(job["id"]) and not store.mark_running(job["id"])
    # A second DELETE finds the job finished (cancelled): it deletes it (issue 12).
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 204 and not again.content
    assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404, job["id"])

    running = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    store.mark_running(running["id"])
    assert client.delete(f"/v1/jobs/{running['id']}").json()["status"] == "cancelled"
    assert not store.mark_succeeded(running["id"], b"{}")  # the worker's late result is dropped

    finished = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    store.mark_running(finished["id"])
    store.mark_succeeded(finished["id"], b"{}")
    figure = f"{store.prefix}figure:{finished['id']}:erasure:png"
    assert store.cache_figure(finished["id"], figure, b"png bytes")  # a cached figure goes with its job
    assert client.delete(f"/v1/jobs/{finished['id']}").status_code == 204
    assert_problem(client.get(f"/v1/jobs/{finished['id']}"), 404, finished["id"])
    assert_problem(client.get(f"/v1/jobs/{finished['id']}/result"), 404, finished["id"])
    assert store.result(finished["id"]) is None and not store.client.exists(figure)
    assert finished["id"] not in [job["id"] for job in client.get("/v1/jobs").json()["items"]]
    assert_problem(client.delete(f"/v1/jobs/{finished['id']}"), 404, finished["id"])


def test_cancel_only_leaves_a_finished_job_and_its_result(client: TestClient, store: JobStore) -> None:
    """keep_finished=true (what the client's and CLI's cancel send): a job that finished just before the request
    is answered 200 as it is, result kept; a running one is still cancelled (202)."""
    finished = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    store.mark_running(finished["id"])
    store.mark_succeeded(finished["id"], b"{}")
    kept = client.delete(f"/v1/jobs/{finished['id']}", params={"keep_finished": "true"})
    assert kept.status_code == 200 and kept.json()["status"] == "succeeded"
    assert store.result(finished["id"]) == b"{}"
    assert client.get(f"/v1/jobs/{finished['id']}").json()["status"] == "succeeded"
    running = submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])
    store.mark_running(running["id"])
    cancelled = client.delete(f"/v1/jobs/{running['id']}", params={"keep_finished": "true"})
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert_problem(client.delete(f"/v1/jobs/{running['id']}", params={"keep_finished": "maybe"}), 400, "keep_finished")


def test_paging(client: TestClient) -> None:
    ids = [submit(client, model="tiny", prompts=["a", "b"], components=["attn.0"])["id"] for _ in range(3)]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert first["total"] == 3 and first["offset"] == 0 and first["limit"] == 2
    assert [item["id"] for item in first["items"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"offset": 2, "limit": 2}).json()
    assert [item["id"] for item in rest["items"]] == [ids[0]]
    assert client.get("/v1/jobs").json()["limit"] == 50
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 400, "limit")
    assert_problem(client.get("/v1/jobs", params={"limit": 501}), 400, "limit")
    assert_problem(client.get("/v1/jobs", params={"offset": -1}), 400, "offset")
    assert_problem(client.get("/v1/jobs", params={"limit": "many"}), 400, "limit")


def test_a_per_position_head_basis_job_is_refused_where_the_model_has_no_head_basis(
    client: TestClient, store: JobStore
) -> None:
    """Post-norm blocks with an output-projection bias (worker/engine/architecture.py, head_basis_refusal): the
    per-position head basis has no definition there, so the submit is a 422 with the reason; the layer basis runs."""
    from tests.tiny_models import make_config
    from worker.engine.architecture import head_basis_refusal

    config = make_config("olmo2", 100)
    config.attention_bias = True
    reason = head_basis_refusal(config)
    assert reason is not None and head_basis_refusal(make_config("olmo2", 100)) is None
    store.advertise_model(ModelInfo(
        id="tiny-olmo2-bias", architecture="olmo2", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, vocab_size=100,
        parallel_blocks=False, source="local", head_basis_refusal=reason,
    ))
    body = {"preset": "rushing_nanda", "model": "tiny-olmo2-bias", "texts": ["one two three", "four five six"]}
    refused = assert_problem(client.post("/v1/jobs", json=body), 422, "response_basis 'heads' is not defined")
    assert "response_basis" in refused["detail"]
    submit(client, **body, response_basis="layers")


def test_models_lists_what_workers_advertised(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models] == ["smollm2-135m", "tiny"]
    assert msgspec.convert(models[0], ModelInfo) == SMOLLM


# --- validation: every bad request is a 4xx problem that says what to change ------------------------------------

TWO = ["Paris is the capital of", "Berlin is the capital of"]

BAD_REQUESTS: list[tuple[str, dict[str, Any], int, tuple[str, ...]]] = [
    ("unknown field", {"prompts": TWO, "prompt_count": 2}, 400, ("unknown field `prompt_count`",)),
    ("wrong type", {"prompts": "one prompt"}, 400, ("prompts", "Expected `array`, got `str`")),
    ("empty prompts", {"prompts": []}, 400, ("prompts", "length >= 1")),
    ("empty prompt", {"prompts": ["a", ""]}, 400, ("prompts[1]",)),
    ("bad component syntax", {"prompts": TWO, "components": ["resid.3"]}, 400, ("components[0]",)),
    ("bad enum", {"prompts": TWO, "ablation": "noise"}, 400, ("ablation",)),
    ("too many samples for schema", {"prompts": TWO, "resample_samples": 65}, 400, ("resample_samples",)),
    (
        "unknown model",
        {"model": "gpt-9", "prompts": TWO},
        422,
        ("unknown model 'gpt-9'", "available models are smollm2-135m, tiny"),
    ),
    (
        "layer out of range",
        {"prompts": TWO, "components": ["attn.2", "attn.40"]},
        422,
        ("'attn.40'", "layer 40 is out of range: model smollm2-135m has 30 layers (0–29)"),
    ),
    (
        "head out of range",
        {"prompts": TWO, "components": ["head.3.9"]},
        422,
        ("head 9 is out of range: model smollm2-135m has 9 heads per layer (0–8)",),
    ),
    (
        "head layer out of range",
        {"model": "tiny", "prompts": TWO, "components": ["head.4"]},
        422,
        ("layer 4 is out of range: model tiny has 4 layers (0–3)",),
    ),
    ("two indices on mlp", {"prompts": TWO, "components": ["mlp.1.2"]}, 422, ("mlp takes one index",)),
    ("prompts and dataset", {"prompts": TWO, "dataset": {"name": "known_1000"}}, 422, ("not prompts and dataset",)),
    ("no prompts", {"model": "tiny"}, 422, ("no prompts",)),
    (
        "mismatched answers",
        {"prompts": TWO, "answers": [" Paris"]},
        422,
        ("answers has 1 entries but there are 2 prompts",),
    ),
    (
        "mismatched counterfactuals",
        {"prompts": TWO, "metric": "logit_diff", "counterfactuals": [" Rome"]},
        422,
        ("counterfactuals has 1 entries but there are 2 prompts",),
    ),
    (
        "logit_diff without counterfactuals",
        {"prompts": TWO, "metric": "logit_diff"},
        422,
        ("logit_diff needs counterfactuals",),
    ),
    (
        "counterfactuals without logit_diff",
        {"prompts": TWO, "counterfactuals": [" Rome", " Madrid"]},
        422,
        ("only used by metric logit_diff",),
    ),
    (
        "answers twice",
        {"dataset": {"name": "known_1000", "limit": 2, "use_answers": True}, "answers": ["a", "b"]},
        422,
        ("not both",),
    ),
    ("resample with one prompt", {"prompts": ["alone"]}, 422, ("resample needs at least 2 prompts", "got 1")),
    (
        "too many resample samples",
        {"prompts": TWO, "resample_samples": 2},
        422,
        ("resample_samples 2 is too many for 2 prompts", "at most 1"),
    ),
    ("hydra preset on too few prompts", {"preset": "hydra", "prompts": TWO}, 422, ("resample_samples 15",)),
    (
        "samples with mean ablation",
        {"prompts": TWO, "ablation": "mean", "resample_samples": 3},
        422,
        ("only applies to ablation resample",),
    ),
    (
        "mean_reference without mean",
        {"prompts": TWO, "mean_reference": {"name": "known_1000"}},
        422,
        ("mean_reference only applies to ablation mean",),
    ),
    (
        "empty dataset slice",
        {"dataset": {"name": "known_1000", "offset": 5000}},
        422,
        ("dataset slice is empty", "1209 prompts"),
    ),
    ("unknown relation", {"dataset": {"name": "known_1000", "relation": "P9999"}}, 422, ("has no prompts",)),
    ("component with a trailing newline", {"prompts": TWO, "components": ["head\n"]}, 400, ("components",)),
]


@pytest.mark.parametrize(
    ("body", "status", "fragments"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_are_explained(
    client: TestClient,
    broker: redis.Redis,
    settings: Settings,
    body: dict[str, Any],
    status: int,
    fragments: tuple[str, ...],
) -> None:
    problem = assert_problem(client.post("/v1/jobs", json=body), status, *fragments)
    if status == 400:
        assert problem["errors"] and problem["errors"][0]["message"]
    assert broker.llen(settings.queue_name) == 0
    assert client.get("/v1/jobs").json()["total"] == 0


def test_models_a_worker_refused_are_422_with_the_reason(client: TestClient, store: JobStore) -> None:
    store.refuse_model("mamba-tiny", "architecture 'mamba' cannot be decomposed: Mamba has no attention or MLP blocks")
    problem = assert_problem(client.post("/v1/jobs", json={"model": "mamba-tiny", "prompts": TWO}), 422, "decomposed")
    assert problem["field"] == "model"


def test_422_names_the_field(client: TestClient) -> None:
    problem = assert_problem(client.post("/v1/jobs", json={"prompts": TWO, "components": ["attn.40"]}), 422)
    assert problem["field"] == "components[0]"


def test_malformed_json_is_400(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert_problem(client.post("/v1/jobs", content=b"prompts=a", headers=headers), 400, "JSON is malformed")
    assert_problem(client.post("/v1/jobs", content=b'{"prompts": [', headers=headers), 400, "truncated")


def test_too_many_ablations(settings: Settings, store: JobStore) -> None:
    with keyed_client(replace(settings, max_ablations=1000)) as client:
        body = {
            "model": "tiny",
            "dataset": {"name": "known_1000", "limit": 100},
            "components": ["head"],
            "resample_samples": 2,
        }
        assert_problem(
            client.post("/v1/jobs", json=body),
            422,
            "too many ablations: 100 prompts × 8 components × 2 samples = 1,600",
            "limit of 1,000",
        )


def test_results_too_large_for_redis_are_refused(settings: Settings, store: JobStore) -> None:
    with keyed_client(replace(settings, max_result_values=10_000)) as client:
        body = {"model": "tiny", "dataset": {"name": "known_1000", "limit": 200}, "components": ["head"]}
        problem = assert_problem(client.post("/v1/jobs", json=body), 422, "limit of 10,000", "fewer prompts")
        assert "200 prompts × 8 components" in problem["detail"]


def test_no_models_advertised_yet(settings: Settings) -> None:
    with keyed_client(settings) as client:
        assert client.get("/v1/models").json() == []
        assert_problem(client.post("/v1/jobs", json={"prompts": TWO}), 422, "no worker has advertised")


def test_unknown_routes_and_methods_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/v2/nothing"), 404)
    assert_problem(client.put("/v1/jobs"), 405)


# --- health -----------------------------------------------------------------------------------------------------


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_is_503_without_a_worker(settings: Settings) -> None:
    # Another Redis database: Celery's broadcast ping is per database, so the session's worker cannot answer it.
    lonely = replace(settings, redis_url=settings.redis_url.rsplit("/", 1)[0] + "/11")
    with keyed_client(lonely) as client:
        assert_problem(client.get("/ready"), 503, "no worker answered")


def test_ready_with_a_real_worker(settings: Settings, store: JobStore, celery_worker: object) -> None:
    """The session's real Celery worker (in a thread, on the same Redis) answers the readiness ping.

    (A second in-thread worker started and stopped here would stop the session worker's consumer as well.)
    """
    settings = replace(settings, ready_timeout_s=2.0)  # an in-thread worker can take ~1 s to answer
    with TestClient(create_app(settings)) as client:
        response = client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready" and response.json()["redis"] is True
    assert response.json()["workers"] >= 1


@pytest.fixture
def dead_redis_settings() -> Settings:
    return Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="unused:", ready_timeout_s=0.3, api_keys=API_KEYS
    )


def test_redis_down_is_503_not_500(dead_redis_settings: Settings) -> None:
    with keyed_client(dead_redis_settings) as client:
        assert_problem(client.get("/ready"), 503, "Redis")
        assert_problem(client.post("/v1/jobs", json={"prompts": TWO}), 503, "Redis")
        assert_problem(client.get(f"/v1/jobs/{uuid.uuid4().hex}"), 503, "Redis")
        assert client.get("/health").status_code == 200


def test_the_service_package_never_imports_torch() -> None:
    """The API must start on a machine without a GPU stack: importing every service module pulls in no torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import pkgutil, importlib, sys, service, service.api.controllers\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "from service.api.app import create_app; create_app()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_worker_process_never_loads_litestar() -> None:
    """Domain errors are plain exceptions (service/core/errors.py); the HTTP mapping lives in the app. A worker that
    imports its task modules (and through them resolve, store, chunks, queue) loads no web framework."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, worker.celery_app, worker.tasks, worker.callback_delivery, worker.maintenance\n"
        "import worker.job_runner, worker.chunk_execution, service.core.resolve\n"
        "loaded = sorted(m for m in sys.modules if m == 'litestar' or m.startswith('litestar.'))\n"
        "assert not loaded, f'the worker loaded {loaded[:5]}'\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
