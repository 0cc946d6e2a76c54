"""Jobs split into chunks: planning, the merge (identical to one piece), progress, cancel, redelivery guards.

The stack tests go through the real API and the session's in-thread Celery worker (tests/conftest.py); the chunk
size is HYDRA_CHUNK_PROMPTS, which the worker reads with its settings, so a test sets it with the `worker_setting`
fixture (the worker reads its settings again).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import torch
from litestar.testing import TestClient
from torch import nn

from hydra_ablate_client.wire import JobSpec
from service.core.chunk_book import Chunk, ChunkBook, plan_chunks
from service.core.queue import TASK_RUN_JOB, model_queue, time_limits, visibility_timeout
from service.core.settings import Settings
from service.core.store import JobStore
from tests.numbers import assert_same_numbers
from worker.engine.errors import InputError
from worker.model_cache import LoadedModel, ModelCache, ModelNotServed
from worker.model_sources import ModelSource

TERMINAL = {"succeeded", "failed", "cancelled"}


# --- pure parts ------------------------------------------------------------------------------------------------


def test_plan_chunks_covers_every_prompt_in_order() -> None:
    assert plan_chunks(10, 3) == [Chunk(0, 0, 3), Chunk(1, 3, 6), Chunk(2, 6, 9), Chunk(3, 9, 10)]
    assert plan_chunks(10, 64) == [Chunk(0, 0, 10)]
    assert plan_chunks(6, 3) == [Chunk(0, 0, 3), Chunk(1, 3, 6)]
    with pytest.raises(ValueError):
        plan_chunks(5, 0)


def test_model_queue_names_are_safe_and_distinct() -> None:
    assert model_queue("hydra", "smollm2-135m") == "hydra.smollm2-135m"
    a, b = model_queue("hydra", "org/model"), model_queue("hydra", "org_model")
    assert a.startswith("hydra.org_model-") and b == "hydra.org_model" and a != b


def test_visibility_timeout_stays_above_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRA_CHUNK_TIME_LIMIT_S", raising=False)
    monkeypatch.delenv("HYDRA_VISIBILITY_TIMEOUT_S", raising=False)
    assert time_limits(Settings.from_env()) == (6 * 3600 - 300, 6 * 3600)
    assert visibility_timeout(Settings.from_env()) == 7 * 3600
    monkeypatch.setenv("HYDRA_CHUNK_TIME_LIMIT_S", "100")
    assert time_limits(Settings.from_env()) == (90, 100)
    monkeypatch.setenv("HYDRA_VISIBILITY_TIMEOUT_S", "50")  # too low: raised above the hard limit
    assert visibility_timeout(Settings.from_env()) > 100


def _fake_loaded(model_id: str, n_params: int) -> LoadedModel:
    source = ModelSource(id=model_id, location=f"/nowhere/{model_id}")
    model: Any = nn.Linear(n_params, 1, bias=False)  # n_params float32 parameters, in place of a PreTrainedModel
    no_tokenizer: Any = None
    return LoadedModel(source=source, model=model, tokenizer=no_tokenizer, revision=None, file_sha256=None)


def test_model_cache_evicts_least_recently_used_until_the_new_model_fits() -> None:
    sizes = {"a": 100, "b": 100, "c": 250, "huge": 1000}  # parameters; 4 bytes each
    sources = {m: ModelSource(id=m, location=f"/nowhere/{m}") for m in sizes}
    loads: list[str] = []

    def loader(source: ModelSource, device: str) -> LoadedModel:
        loads.append(source.id)
        return _fake_loaded(source.id, sizes[source.id])

    cache = ModelCache(
        sources, capacity=3, max_bytes=1600, loader=loader, estimator=lambda source: 4 * sizes[source.id]
    )
    cache.get("a"), cache.get("b")
    assert cache.cached == ["a", "b"] and cache.used_bytes == 800
    cache.get("a")  # a becomes the most recently used
    cache.get("c")  # 800 + 1000 > 1600: b (least recently used) goes, a stays
    assert cache.cached == ["a", "c"] and cache.used_bytes == 1400
    cache.get("b")  # 1400 + 400 > 1600: a goes
    assert cache.cached == ["c", "b"]
    cache.get("huge")  # larger than the whole budget: loads alone
    assert cache.cached == ["huge"]
    assert loads == ["a", "b", "c", "b", "huge"]
    with pytest.raises(ModelNotServed, match="does not serve model 'unknown'"):
        cache.get("unknown")
    by_count = ModelCache(sources, capacity=1, loader=loader)
    by_count.get("a"), by_count.get("b")
    assert by_count.cached == ["b"]


# --- the merge equals the job in one piece (in-process, no Redis) -----------------------------------------------


def _spec(prompts: list[str], **overrides: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        model="tiny-llama",
        prompts=prompts,
        answers=None,
        counterfactuals=None,
        components=["attn.0", "mlp.0", "attn.1", "head.1.2", "mlp.2"],
        ablation="resample",
        positions="final",
        metric="logit",
        norm_scale="clean",
        resample_samples=2,
        resample_from="random",
        mean_reference_prompts=None,
        seed=3,
    )
    fields.update(overrides)
    return JobSpec(**fields)


PROMPTS = [f"Prompt number {i} says that the sky over town {i % 4} is" for i in range(10)]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"ablation": "mean", "resample_samples": 1, "positions": "all", "metric": "logprob"},
        {"ablation": "mean", "resample_samples": 1, "mean_reference_prompts": ["One reference", "Two references"]},
        {"ablation": "zero", "resample_samples": 1, "answers": [" blue"] * 10, "counterfactuals": [" red"] * 10,
         "metric": "logit_diff"},
    ],
    ids=["resample", "mean-all-positions", "mean-reference", "zero-logit-diff"],
)
def test_merged_chunks_equal_the_job_in_one_piece(tiny_model_dirs: dict[str, str], overrides: dict[str, Any]) -> None:
    from worker.chunk_execution import execute, execute_chunk, merge_chunks
    from worker.model_cache import load_model

    loaded = load_model(ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"]))
    spec = _spec(PROMPTS, **overrides)
    whole = execute("job", spec, loaded)
    chunks = [execute_chunk("job", spec, loaded, c.index, c.start, c.stop) for c in plan_chunks(len(PROMPTS), 3)]
    chunks = [msgspec.json.decode(msgspec.json.encode(c), type=type(c)) for c in reversed(chunks)]  # via Redis
    merged = merge_chunks("job", spec, chunks)
    assert_same_numbers(msgspec.to_builtins(merged.prompts), msgspec.to_builtins(whole.prompts))
    assert_same_numbers(msgspec.to_builtins(merged.summary), msgspec.to_builtins(whole.summary))
    assert merged.components == whole.components and merged.response_basis == whole.response_basis
    assert merged.provenance.spec == spec


def test_the_chunks_of_a_job_share_their_clean_runs(tiny_model_dirs: dict[str, str]) -> None:
    """Each prompt's clean pass runs once per job, not once per chunk that needs it, and changes no number."""
    from worker.chunk_execution import execute_chunk, merge_chunks
    from worker.model_cache import load_model

    source = ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"])
    spec = _spec(PROMPTS, resample_samples=4)
    plan = plan_chunks(len(PROMPTS), 3)
    cached = load_model(source)
    uncached = load_model(source)
    uncached.clean_runs.max_bytes = 0  # keeps nothing: every clean pass runs
    merged = {}
    for name, loaded in (("cached", cached), ("uncached", uncached)):
        chunks = [execute_chunk("job", spec, loaded, c.index, c.start, c.stop) for c in plan]
        merged[name] = merge_chunks("job", spec, chunks)

    runs = cached.clean_runs
    assert runs.misses == len(PROMPTS) and len(runs) == len(PROMPTS)  # every prompt is a source somewhere
    assert runs.hits > len(PROMPTS)  # 4 chunks × (own prompts + 4 sources each), far more than 10 distinct runs
    assert uncached.clean_runs.hits == 0 and len(uncached.clean_runs) == 0
    assert uncached.clean_runs.misses == runs.hits + runs.misses  # the passes the cache saved
    assert_same_numbers(msgspec.to_builtins(merged["cached"].prompts), msgspec.to_builtins(merged["uncached"].prompts))


def test_chunks_reuse_the_top_tokens_of_evicted_clean_runs(tiny_model_dirs: dict[str, str]) -> None:
    """`different_target` sources need every prompt's clean top token in every chunk. A cache too small for the
    job's runs still remembers their top tokens, so later chunks run clean passes only for their own prompts and
    sources (each chunk used to run all of the job's), and the numbers are those of a cache that keeps everything."""
    from worker.chunk_execution import execute_chunk, merge_chunks
    from worker.model_cache import load_model

    source = ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"])
    spec = _spec(PROMPTS, resample_samples=2, resample_sources="different_target", answers=[" blue"] * len(PROMPTS))
    plan = plan_chunks(len(PROMPTS), 3)
    small, roomy = load_model(source), load_model(source)
    merged = {}
    for name, loaded in (("small", small), ("roomy", roomy)):
        if name == "small":
            loaded.clean_runs.max_bytes = 1  # keeps no run, only the top tokens
        chunks = [execute_chunk("job", spec, loaded, c.index, c.start, c.stop) for c in plan]
        merged[name] = merge_chunks("job", spec, chunks)

    sources = {p.index: set(p.sources) for p in merged["small"].prompts}
    needed_after_first = sum(len(set(range(c.start, c.stop)).union(*(sources[i] for i in range(c.start, c.stop))))
                             for c in plan[1:])
    assert len(small.clean_runs) == 0 and small.clean_runs.top_token(torch.tensor([1, 2, 3])) is None
    # The first chunk runs every prompt's pass (it learns the top tokens); each later chunk at most its own prompts'
    # and their sources' passes, and a few of those twice (its measuring and its sources' rows are asked apart).
    assert small.clean_runs.misses <= len(PROMPTS) + 2 * needed_after_first
    assert small.clean_runs.misses < len(plan) * len(PROMPTS)  # what every chunk recomputing every top token costs
    assert_same_numbers(msgspec.to_builtins(merged["small"].prompts), msgspec.to_builtins(merged["roomy"].prompts))


def test_the_clean_run_cache_keeps_the_most_recent_runs_within_its_bytes(tiny_model_dirs: dict[str, str]) -> None:
    import torch

    from worker.engine.architecture import describe
    from worker.engine.clean import CleanRunCache, run_clean
    from worker.model_cache import load_model

    loaded = load_model(ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"]))
    arch = describe(loaded.model)
    prompts = [torch.tensor(loaded.tokenizer(p).input_ids) for p in PROMPTS[:4]]
    computed: list[int] = []

    def run(i: int, cache: CleanRunCache) -> object:
        def compute() -> Any:
            computed.append(i)
            return run_clean(loaded.model, arch, prompts[i], all_positions=False, with_heads=False)

        return cache.get(prompts[i], False, False, compute)

    size = run_clean(loaded.model, arch, prompts[0], all_positions=False, with_heads=False).nbytes()
    cache = CleanRunCache(max_bytes=int(2.5 * size))  # room for two runs of these (equally long) prompts
    first = run(0, cache)
    assert run(0, cache) is first and computed == [0]
    run(1, cache)
    run(0, cache)  # 0 is now the most recently used
    run(2, cache)  # evicts 1, the least recently used
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    run(0, cache)
    run(1, cache)
    assert computed == [0, 1, 2, 1]
    # Another capture of the same prompt is another entry: a run without heads' inputs cannot serve one with them.
    cache.get(prompts[0], False, True, lambda: run_clean(loaded.model, arch, prompts[0], all_positions=False,
                                                          with_heads=True))
    assert cache.misses == 5
    tiny = CleanRunCache(max_bytes=size - 1)  # a run larger than the whole cache is returned, not kept
    run(3, tiny)
    assert len(tiny) == 0 and tiny.bytes == 0


# --- through the API and the in-thread worker --------------------------------------------------------------------


@pytest.fixture()
def api(celery_worker: object, stack_settings: Any) -> Iterator[TestClient]:
    from service.api.app import create_app

    with TestClient(create_app(stack_settings)) as client:  # the test stack runs without auth (conftest.py)
        yield client


@pytest.fixture()
def store(stack_settings: Any) -> Iterator[JobStore]:
    store = JobStore.from_settings(stack_settings)
    yield store
    store.close()


def wait_terminal(api: TestClient, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in TERMINAL:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")


def submit(api: TestClient, body: dict[str, Any]) -> str:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def run(api: TestClient, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    job_id = submit(api, body)
    status = wait_terminal(api, job_id)
    assert status["status"] == "succeeded", status
    return status, api.get(f"/v1/jobs/{job_id}/result").json()


def test_a_chunked_job_equals_the_same_job_in_one_chunk(
    api: TestClient, store: JobStore, worker_setting: Callable[[str, str], None]
) -> None:
    body = {"model": "tiny-llama", "prompts": PROMPTS, "components": ["attn", "mlp", "head.1.2"], "resample_samples": 2}
    worker_setting("HYDRA_CHUNK_PROMPTS", "3")
    chunked_status, chunked = run(api, body)
    worker_setting("HYDRA_CHUNK_PROMPTS", "64")
    whole_status, whole = run(api, body)

    assert_same_numbers(chunked["prompts"], whole["prompts"])
    assert_same_numbers(chunked["summary"], whole["summary"])
    assert [p["prompt"] for p in chunked["prompts"]] == PROMPTS
    total = 10 * 7 * 2
    assert chunked_status["progress"] == whole_status["progress"]
    assert (chunked_status["progress"]["done"], chunked_status["progress"]["total"]) == (total, total)

    book = ChunkBook.for_store(store)
    job_id = chunked["id"]
    assert book.plan(job_id) == plan_chunks(10, 3)
    assert book.deliveries(job_id) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert len(book.task_ids(job_id)) == 4
    assert book.results(job_id, range(4)) == [None] * 4  # partial results dropped once merged
    assert book.n_chunks(whole["id"]) == 1


def test_progress_is_summed_over_chunks(
    api: TestClient, store: JobStore, worker_setting: Callable[[str, str], None]
) -> None:
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")
    prompts = [f"Line {i} of a long list of sentences about rivers and" for i in range(12)]
    job_id = submit(api, {"model": "tiny-gpt2", "prompts": prompts, "components": ["head"], "resample_samples": 4})
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}").json()
        seen.append(status["progress"]["done"])
        if status["status"] in TERMINAL:
            break
        time.sleep(0.02)
    total = 12 * 12 * 4
    progress = status["progress"]
    assert status["status"] == "succeeded" and (progress["done"], progress["total"]) == (total, total)
    assert seen == sorted(seen)  # never goes backwards
    assert any(0 < s < total for s in seen)  # reported while running, not only at the end
    assert ChunkBook.for_store(store).progress(job_id) == {i: 2 * 12 * 4 for i in range(6)}


def test_cancelling_stops_the_remaining_chunks(
    api: TestClient, store: JobStore, worker_setting: Callable[[str, str], None]
) -> None:
    worker_setting("HYDRA_CHUNK_PROMPTS", "2")
    prompts = [f"Sentence number {i} is about the weather in the city of" for i in range(40)]
    job_id = submit(api, {"model": "tiny-llama", "prompts": prompts, "components": ["head"], "resample_samples": 8})
    deadline = time.monotonic() + 60
    while api.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    status = wait_terminal(api, job_id, timeout_s=30)
    assert status["status"] == "cancelled"
    # The worker is free again: a next job runs behind the cancelled job's queued chunks.
    quick = submit(api, {"model": "tiny-llama", "prompts": ["a b", "c d"], "components": ["mlp.0"]})
    assert wait_terminal(api, quick)["status"] == "succeeded"

    book = ChunkBook.for_store(store)
    assert len(book.task_ids(job_id)) == 20
    started = book.deliveries(job_id)
    assert len(started) <= 3, started  # the chunk running at the cancel (and at most one more) started; the rest not
    assert len(book.done_indices(job_id)) < 20
    assert api.get(f"/v1/jobs/{job_id}/result").status_code == 409


def _spec_for_store(prompts: list[str]) -> JobSpec:
    return _spec(prompts, components=["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"], resample_samples=1,
                 resample_from="next", seed=0)


def test_a_redelivered_run_job_does_not_plan_twice(
    celery_worker: object, store: JobStore, stack_settings: Any, worker_setting: Callable[[str, str], None]
) -> None:
    from worker.celery_app import app

    worker_setting("HYDRA_CHUNK_PROMPTS", "2")
    spec = _spec_for_store([f"Word {i} is followed by" for i in range(6)])
    job_id = store.create(spec, 6 * 6).id
    for _ in range(2):  # the same message twice, as after a redelivery
        app.send_task(TASK_RUN_JOB, args=[job_id], queue=stack_settings.queue_name)
    deadline = time.monotonic() + 60
    while store.status(job_id).status not in TERMINAL and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.05)
    assert store.status(job_id).status == "succeeded"  # type: ignore[union-attr]
    book = ChunkBook.for_store(store)
    time.sleep(0.3)  # a second planning would have sent more chunks by now
    assert len(book.task_ids(job_id)) == 3
    assert book.deliveries(job_id) == {0: 1, 1: 1, 2: 1}


def test_a_chunk_delivered_too_often_fails_its_job(celery_worker: object, store: JobStore, stack_settings: Any) -> None:
    from worker.celery_app import app

    spec = _spec_for_store([f"Colour {i} is" for i in range(4)])
    job_id = store.create(spec, 4 * 6).id
    book = ChunkBook.for_store(store)
    for _ in range(3):  # as if three workers had died running chunk 0
        book.count_delivery(job_id, 0)
    app.send_task(TASK_RUN_JOB, args=[job_id], queue=stack_settings.queue_name)
    deadline = time.monotonic() + 60
    while store.status(job_id).status not in TERMINAL and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.05)
    status = store.status(job_id)
    assert status is not None and status.status == "failed"
    assert status.error is not None
    assert f"chunk 0 (prompts 0-3) of job {job_id} was delivered 4 times" in status.error
    assert "out of memory?" in status.error


def test_unknown_job_ids_are_dropped(celery_worker: object, stack_settings: Any) -> None:
    from worker.tasks import run_chunk, run_job

    missing = uuid.uuid4().hex
    assert run_job.apply(args=[missing]).get() == "missing"
    assert run_chunk.apply(args=[missing, 0, 0, 1]).get() == "missing"


def _planned_job(store: JobStore, n_prompts: int, chunk_size: int) -> tuple[str, JobSpec]:
    """A job registered and planned (as `run_job` would), its chunks not sent: the test runs them itself."""
    spec = _spec_for_store([f"Number {i} comes before" for i in range(n_prompts)])
    job_id = store.create(spec, n_prompts * 6).id
    ChunkBook.for_store(store).record_plan(job_id, plan_chunks(n_prompts, chunk_size), chunk_size)
    return job_id, spec


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        # Bugs (any exception but the engine's InputError) are internal errors: type and message, no traceback.
        (RuntimeError("boom"), "internal error in chunk 0 of job {job_id}: RuntimeError: boom"),
        (ValueError("an engine bug"), "internal error in chunk 0 of job {job_id}: ValueError: an engine bug"),
        # Input errors are the user's to fix: their message is the job's error, as is.
        (InputError("prompt 'x' is bad"), "prompt 'x' is bad"),
        ("soft-time-limit", "ran past the time limit of"),
    ],
)
def test_an_exception_in_a_chunk_fails_the_job(
    celery_worker: object,
    store: JobStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    raised: Any,
    message: str,
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    import worker.chunk_execution
    from worker.tasks import run_chunk

    def explode(*_: Any, **__: Any) -> None:
        raise SoftTimeLimitExceeded() if raised == "soft-time-limit" else raised

    monkeypatch.setattr(worker.chunk_execution, "execute_chunk", explode)
    job_id, _ = _planned_job(store, 4, 2)
    ChunkBook.for_store(store).record_task(job_id, 1, "task-of-chunk-1")
    with caplog.at_level("ERROR", logger="worker.tasks"):
        assert run_chunk.apply(args=[job_id, 0, 0, 2]).get() == "failed"
    status = store.status(job_id)
    assert status is not None and status.status == "failed" and status.error is not None
    assert message.format(job_id=job_id) in status.error
    assert "Traceback" not in status.error
    logged = [record for record in caplog.records if record.exc_info]
    if isinstance(raised, InputError) or raised == "soft-time-limit":
        assert status.error == message or raised == "soft-time-limit"
        assert not logged
    else:  # the bug's traceback is in the worker's log
        assert logged and logged[0].exc_info is not None and logged[0].exc_info[1] is raised
    assert run_chunk.apply(args=[job_id, 1, 2, 4]).get() == "skipped"  # the job's other chunks skip themselves


def test_a_hard_time_limit_fails_the_job(celery_worker: object, store: JobStore) -> None:
    from billiard.exceptions import TimeLimitExceeded

    from worker.tasks import run_chunk

    job_id, _ = _planned_job(store, 4, 2)
    store.mark_running(job_id)
    # What the worker's main process calls after killing a pool process past the hard limit.
    run_chunk.on_failure(TimeLimitExceeded(21600), "task-id", [job_id, 1, 2, 4], {}, None)
    status = store.status(job_id)
    assert status is not None and status.status == "failed" and status.error is not None
    assert f"chunk 1 of job {job_id} ran past the hard time limit of" in status.error


def test_a_redelivered_last_chunk_merges_when_its_merger_died(
    celery_worker: object, store: JobStore, tiny_model_dirs: dict[str, str]
) -> None:
    from worker.chunk_execution import execute, execute_chunk
    from worker.model_cache import load_model
    from worker.tasks import run_chunk

    job_id, spec = _planned_job(store, 4, 2)
    assert run_chunk.apply(args=[job_id, 0, 0, 2]).get() == "recorded"
    # Chunk 1 finished and was recorded, but its worker died before merging: the job is still running.
    loaded = load_model(ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"]))
    book = ChunkBook.for_store(store)
    assert book.record_result(job_id, 1, execute_chunk(job_id, spec, loaded, 1, 2, 4)) == 2
    assert store.status(job_id).status == "running"  # type: ignore[union-attr]
    # Its message comes back: the chunk is not run again, the job is merged.
    assert run_chunk.apply(args=[job_id, 1, 2, 4]).get() == "succeeded"
    assert book.deliveries(job_id) == {0: 1}
    result = msgspec.json.decode(store.result(job_id) or b"", type=type(execute("x", spec, loaded)))
    whole = execute(job_id, spec, loaded)
    # `whole` ran the four prompts in one batch, the chunks two by two: equal up to float32 rounding.
    assert_same_numbers(msgspec.to_builtins(result.prompts), msgspec.to_builtins(whole.prompts))
    assert_same_numbers(msgspec.to_builtins(result.summary), msgspec.to_builtins(whole.summary))
    # And once more: nothing changes.
    assert run_chunk.apply(args=[job_id, 1, 2, 4]).get() == "duplicate"
