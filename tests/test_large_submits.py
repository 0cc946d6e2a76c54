"""Large valid submits do not stall the API, for real: a uvicorn API process (keys on) on the session's Redis (a
database of its own), a model advertised with its tokenizer as a worker does, ten 9.6 MB submits at once (4,800
prompts of 2,000 characters, about 400 tokens each, every one counted) from one key.

Meanwhile `/health` and another key's status read stay fast: p99 under 0.5 s each (on the event loop these
bodies took about 5 s apiece, and ten at once made `/health` answer in 5.6 s at the median). Each large submit is
accepted (202) or, past HYDRA_LARGE_SUBMITS at once, refused at once with 503 and a Retry-After; nothing else.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest

from service.core.embedded_redis import free_port
from service.core.settings import Settings
from service.core.store import JobStore
from tests.test_submit_recovery import api_process

pytestmark = pytest.mark.serial  # latency bounds: run alone, after the parallel part of the suite

MODEL = "tiny-large"
KEY_A = "large-submits-key-of-alice"
KEY_B = "large-submits-key-of-bob"
PROMPTS = 4800
P99_BOUND_S = 0.5
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def large_body(model: str = MODEL) -> bytes:
    """About 9.6 MB of valid JSON: PROMPTS prompts of 2,000 characters (about 400 tokens each)."""
    prompts = []
    for i in range(PROMPTS):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(400)]
        prompts.append(f"{i} " + " ".join(words)[:1990])
    return msgspec.json.encode({"model": model, "prompts": prompts, "components": ["attn.0"], "ablation": "zero"})


@dataclass
class LargeStack:
    url: str
    api_log: Path


@pytest.fixture(scope="module")
def large_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LargeStack]:
    from tests.tiny_models import build_tiny_model
    from worker.model_cache import model_info, tokenizer_json
    from worker.model_sources import ModelSource

    root = tmp_path_factory.mktemp("large-submits")
    tag = uuid.uuid4().hex[:8]
    env = {
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/8",  # a database of its own
        "HYDRA_KEY_PREFIX": f"test-large-{tag}:",
        "HYDRA_QUEUE": f"hydra-large-{tag}",
        "HYDRA_API_KEYS": f"alice:{KEY_A},bob:{KEY_B}",
        "HYDRA_AUTH": "on",
        "HYDRA_ALLOW_NO_AUTH": "0",
        "HYDRA_ACCESS_LOG": "off",
        "HYDRA_RATE_LIMIT_READ": "100000",  # bob's probe reads faster than the default limit; not under test
    }
    # What a worker serving the model publishes: its shape and its tokenizer (the API counts tokens with it).
    source = ModelSource(id=MODEL, location=str(build_tiny_model("llama", root / "model")))
    store = JobStore.from_settings(Settings(redis_url=env["REDIS_URL"], key_prefix=env["HYDRA_KEY_PREFIX"]))
    published = tokenizer_json(source)
    assert published is not None
    store.publish_tokenizer(MODEL, published)
    store.advertise_model(model_info(source), ttl_s=3600)
    try:
        with api_process(env, free_port(), root / "api.log") as url:
            yield LargeStack(url, root / "api.log")
    finally:
        store.close()


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


@dataclass
class LargeSubmitRun:
    """What ten large submits at once met, and what the probes measured meanwhile."""

    answers: list[httpx.Response]
    latencies: dict[str, list[float]]  # probe name -> seconds per request
    probe_codes: dict[str, list[int]]
    seconds: float

    @property
    def codes(self) -> list[int]:
        return sorted(response.status_code for response in self.answers)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "median_s": round(statistics.median(values), 3),
                "p99_s": round(p99(values), 3),
                "max_s": round(max(values), 3),
            }
            for name, values in self.latencies.items()
        }


def ten_large_submits(
    url: str, body: bytes, headers: dict[str, str], probes: dict[str, tuple[str, dict[str, str]]]
) -> LargeSubmitRun:
    """POST `body` ten times at once with `headers` while each probe (name -> path, headers) is read in a loop, one
    request at a time, every 50 ms (from a second before the submits until they are answered)."""
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {name: [] for name in probes}
    codes: dict[str, list[int]] = {name: [] for name in probes}
    stop = threading.Event()

    def submit() -> None:
        response = httpx.post(f"{url}/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"},
                              timeout=300)
        with lock:
            answers.append(response)

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                for name, (path, probe_headers) in probes.items():
                    started = time.perf_counter()
                    try:
                        codes[name].append(client.get(path, headers=probe_headers).status_code)
                    except httpx.TransportError:
                        codes[name].append(0)
                    latencies[name].append(time.perf_counter() - started)
                stop.wait(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(1.0)
    submitters = [threading.Thread(target=submit) for _ in range(10)]
    started = time.monotonic()
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join(timeout=300)
    elapsed = time.monotonic() - started
    stop.set()
    prober.join(timeout=60)
    return LargeSubmitRun(answers, latencies, codes, elapsed)


def test_ten_large_submits_leave_health_and_other_keys_fast(large_stack: LargeStack) -> None:
    url = large_stack.url
    body = large_body()
    assert 9_000_000 < len(body) < 10 * 1024 * 1024
    small = {"model": MODEL, "prompts": ["Paris is in"], "components": ["attn.0"], "ablation": "zero"}
    bob_job = httpx.post(f"{url}/v1/jobs", json=small, headers={"X-API-Key": KEY_B}, timeout=30).json()["id"]

    run = ten_large_submits(
        url, body, {"X-API-Key": KEY_A},
        {"health": ("/health", {}), "status": (f"/v1/jobs/{bob_job}", {"X-API-Key": KEY_B})},
    )  # fmt: skip
    print(f"large submits {run.codes} in {run.seconds:.1f} s; {run.summary()}")
    assert len(run.answers) == 10 and set(run.codes) <= {202, 503}, [r.text[:300] for r in run.answers]
    assert 202 in run.codes
    for response in run.answers:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            assert "HYDRA_LARGE_SUBMITS" in response.text
    for name, codes in run.probe_codes.items():
        assert set(codes) == {200}, (name, codes)
    for name, values in run.latencies.items():
        assert p99(values) < P99_BOUND_S, (name, run.summary())
