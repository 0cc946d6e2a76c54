"""Chaos run on a real local stack: faults injected while jobs run, and what became of the jobs. Not a test.

    python bench/chaos.py                         # prints a report
    python bench/chaos.py --json bench/chaos-cpu.json

Starts, in a temporary folder: a private redis-server with append-only persistence, two `celery worker`
processes (prefork, one pool process each) and a uvicorn API with API keys, all serving a tiny random Llama built
offline (tests/tiny_models.py), 3 prompts per chunk and one ablated run per batch so that chunks take seconds.
Lease, sweep and Redis-outage settings are the defaults (120 s, 30 s, 60 s): the times below are what a
deployment gets. Scenarios, in order (`SCENARIOS`; add one by appending a function of the Stack that returns a
dict with at least "ok"):

  baseline        an undisturbed job; its result is the reference for the others
  redis_restart   Redis shut down mid-chunk (as `redis-cli shutdown`), restarted 8 s later: the job succeeded
                  with the same numbers (max |difference| against the reference, tolerance 1e-5 relative)
  api_killed      the API killed between storing a job and queueing it, then restarted: the job ran
  hostile_inputs  requests built to break the API (`HOSTILE_INPUTS`; extend the list): responses >= 500 counted
  worker_killed   the worker running chunk 0 SIGKILLed, main and pool process at once (the machine vanished):
                  the job succeeded; seconds until another worker ran the chunk, against the 10-minute target
  redis_full      Redis at maxmemory (noeviction) for 8 s mid-chunk: the job succeeded with the same numbers,
                  the workers stayed up; reads answered meanwhile, submits got 503 saying why
  aof_failing     the same with Redis unable to write its append-only file (tests/redis_faults.py)
  slow_webhook    a receiver trickling one byte a second: its delivery cut at HYDRA_CALLBACK_TIMEOUT_S, the
                  next job as fast as one alone
  huge_webhook    a receiver answering 600 MB: delivered, a few MiB sent by the receiver at most
  large_submits   ten 9.6 MB submits at once: /health and a status read stay fast (p50, p99), the submits
                  answered 202 or 503 with Retry-After
  serve_killed    a `hydra-ablate serve` of its own (embedded Redis, two API processes, a worker) SIGKILLed while
                  a job runs: seconds until every child and grandchild was gone and the port free; a second serve on
                  the same data folder while the first runs is refused; a new serve on the folder finds the
                  accepted job and runs it to the end
  quiet_held      a long poll (?wait=21) and an event stream on a job that does not change for 20 s (workers
                  paused): both held, keep-alives sent, then the change delivered and the stream ended
  streams_one_key 100 event streams from one key on a quiet job: those past HYDRA_MAX_STREAMS_PER_KEY refused
                  with 429 and Retry-After, the held ones open; another key's reads p99 before and meanwhile
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.core.chunk_book import ChunkBook
from service.core.embedded_redis import free_port
from service.core.leases import Leases
from service.core.settings import Settings
from service.core.store import JobStore
from tests.redis_faults import FaultyRedis

MODEL = "tiny-chaos"
API_KEY = "chaos-" + "k" * 32
TOLERANCE = 1e-5  # tests/numbers.py: chunked = unchunked up to 1e-5, relative to the value's size
TARGET_RECOVERY_S = 600.0  # issue 9: a vanished worker's chunk runs elsewhere within 10 minutes by default
OUTAGE_S = 8.0
PROMPTS = [f"Sentence number {i} is about the weather in the city of Paris, which is famous for" for i in range(9)]
JOB = {
    "model": MODEL,
    "prompts": PROMPTS,
    "components": ["attn", "mlp", "head.1.2", "head.2.3"],
    "ablation": "resample",
    "resample_samples": 8,
    "seed": 5,
}
TERMINAL = {"succeeded", "failed", "cancelled"}

# uvicorn serving the app; with DIE_BEFORE_PUBLISH set the process SIGKILLs itself when Celery is about to publish
# a task, i.e. after POST /v1/jobs stored the job and before it was queued.
SERVER = """
import os, signal, sys
if os.environ.get("DIE_BEFORE_PUBLISH"):
    from celery.signals import before_task_publish

    @before_task_publish.connect(weak=False)
    def _die(**_):
        os.kill(os.getpid(), signal.SIGKILL)

import uvicorn
uvicorn.run("service.api.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@dataclass
class Stack:
    folder: Path
    redis: FaultyRedis  # an EmbeddedRedis that can also be made to refuse writes (tests/redis_faults.py)
    env: dict[str, str]
    port: int
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api: subprocess.Popen[bytes] | None = None
    reference: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": API_KEY}

    def store(self) -> JobStore:
        return JobStore.from_settings(Settings(redis_url=self.redis.url, key_prefix=self.env["HYDRA_KEY_PREFIX"]))

    # processes
    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"chaos-{len(self.workers)}"
        command = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "prefork", "-c", "1",
            "-Q", self.env["HYDRA_QUEUE"], "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        log = (self.folder / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, env={**os.environ, **self.env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.workers.append(process)
        deadline = time.monotonic() + 180
        while " ready." not in (self.folder / f"{name}.log").read_text(errors="replace"):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"worker {name} did not start; see {self.folder / f'{name}.log'}")
            time.sleep(0.2)
        return process

    def start_api(self, die_before_publish: bool = False) -> None:
        self.stop_api()
        extra = {"DIE_BEFORE_PUBLISH": "1"} if die_before_publish else {}
        log = (self.folder / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(self.port)], env={**os.environ, **self.env, **extra},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            with suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline or self.api.poll() is not None:
                raise RuntimeError(f"the API did not start; see {self.folder / 'api.log'}")
            time.sleep(0.2)

    def stop_api(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            try:
                self.api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.api.kill()
                self.api.wait()
        self.api = None

    def close(self) -> None:
        self.stop_api()
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.redis.stop()

    # jobs
    def submit(self, body: dict[str, Any] | None = None) -> str:
        response = httpx.post(f"{self.url}/v1/jobs", json=body or JOB, headers=self.headers, timeout=60)
        response.raise_for_status()
        return str(response.json()["id"])

    def wait(self, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
        """Poll through the API as a client would (answers other than 200, e.g. while Redis is away, are retried)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with suppress(httpx.TransportError):
                response = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers, timeout=10)
                if response.status_code == 200 and response.json()["status"] in TERMINAL:
                    return dict(response.json())
            time.sleep(0.2)
        raise RuntimeError(f"job {job_id} did not finish within {timeout_s} s")

    def result(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/jobs/{job_id}/result", headers=self.headers, timeout=60)
        response.raise_for_status()
        return dict(response.json())

    def wait_mid_chunk(self, job_id: str, index: int) -> None:
        """Until chunk `index` has measured something and has more to do."""
        store = self.store()
        book = ChunkBook.for_store(store)
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline:
                if book.progress(job_id).get(index, 0) > 0 and not book.is_done(job_id, index):
                    return
                time.sleep(0.02)
        finally:
            store.close()
        raise RuntimeError(f"chunk {index} of job {job_id} never ran")


def numbers_differ(got: Any, want: Any, path: str = "") -> tuple[float, list[str]]:
    """(largest relative float difference, non-float mismatches) between two decoded results."""
    if isinstance(want, float) and isinstance(got, (float, int)):
        return abs(got - want) / (1 + abs(want)), []
    if isinstance(want, dict) and isinstance(got, dict):
        if got.keys() != want.keys():
            return 0.0, [f"{path}: keys differ"]
        pairs = [(got[k], want[k], f"{path}.{k}") for k in want]
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return 0.0, [f"{path}: lengths differ"]
        pairs = [(g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want, strict=True))]
    else:
        return 0.0, [] if got == want else [f"{path}: {got!r} != {want!r}"]
    worst = 0.0
    mismatches: list[str] = []
    for g, w, p in pairs:
        diff, bad = numbers_differ(g, w, p)
        worst, mismatches = max(worst, diff), mismatches + bad
    return worst, mismatches


def compare(stack: Stack, result: dict[str, Any]) -> dict[str, Any]:
    assert stack.reference is not None
    diff, mismatches = numbers_differ(
        {"prompts": result["prompts"], "summary": result["summary"]},
        {"prompts": stack.reference["prompts"], "summary": stack.reference["summary"]},
    )
    return {"max_relative_difference": diff, "mismatches": mismatches[:5], "same_numbers": diff <= TOLERANCE
            and not mismatches}  # fmt: skip


# --- scenarios ----------------------------------------------------------------------------------------------------


def baseline(stack: Stack) -> dict[str, Any]:
    started = time.monotonic()
    job_id = stack.submit()
    status = stack.wait(job_id)
    if status["status"] == "succeeded":
        stack.reference = stack.result(job_id)
    return {"ok": status["status"] == "succeeded", "status": status["status"], "seconds": time.monotonic() - started}


def redis_restart(stack: Stack) -> dict[str, Any]:
    started = time.monotonic()
    job_id = stack.submit()
    stack.wait_mid_chunk(job_id, 1)
    stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits, as `redis-cli shutdown` does
    time.sleep(OUTAGE_S)
    stack.redis.start()
    status = stack.wait(job_id)
    report: dict[str, Any] = {"status": status["status"], "error": status.get("error"), "outage_s": OUTAGE_S}
    if status["status"] == "succeeded":
        report.update(compare(stack, stack.result(job_id)))
    store = stack.store()
    report["deliveries"] = ChunkBook.for_store(store).deliveries(job_id)
    store.close()
    report["seconds"] = time.monotonic() - started
    report["ok"] = status["status"] == "succeeded" and report.get("same_numbers", False)
    return report


def api_killed(stack: Stack) -> dict[str, Any]:
    stack.start_api(die_before_publish=True)
    key = {"Idempotency-Key": f"chaos-{uuid.uuid4().hex}"}
    died = False
    try:
        httpx.post(f"{stack.url}/v1/jobs", json=JOB, headers={**stack.headers, **key}, timeout=60)
    except httpx.TransportError:
        died = True
    assert stack.api is not None
    stack.api.wait(timeout=30)
    store = stack.store()
    unplanned = store.unplanned()
    store.close()
    restarted = time.monotonic()
    stack.start_api()
    retried = httpx.post(f"{stack.url}/v1/jobs", json=JOB, headers={**stack.headers, **key}, timeout=60)
    job_id = retried.json().get("id") if retried.status_code == 202 else None
    status = stack.wait(job_id) if job_id else {"status": f"retry answered {retried.status_code}"}
    return {
        "ok": died and job_id in unplanned and status["status"] == "succeeded",
        "api_died_mid_request": died,
        "stored_but_unqueued": job_id in unplanned,
        "retry_replayed_same_job": retried.headers.get("Idempotent-Replayed") == "true",
        "status": status["status"],
        "seconds_from_restart_to_done": time.monotonic() - restarted,
    }


# (name, method, path, headers, body): requests built to break the API. Each must get a 4xx, never >= 500.
DEEP = 50_000
HOSTILE_INPUTS: list[tuple[str, str, str, dict[str, str], bytes | None]] = [
    ("OPTIONS /v1/jobs without a key", "OPTIONS", "/v1/jobs", {}, None),
    ("OPTIONS /v1/jobs/{id} without a key", "OPTIONS", "/v1/jobs/0123456789abcdef", {}, None),
    ("invalid UTF-8 inside a JSON string", "POST", "/v1/jobs", {"content-type": "application/json"},
     b'{"model": "tiny-chaos", "prompts": ["caf\xe9 \xff\xfe"]}'),
    ("raw non-UTF-8 body", "POST", "/v1/jobs", {"content-type": "application/json"}, b"\xff\xfe\xfd\x00\x81"),
    (f"{DEEP:,}-deep array nesting", "POST", "/v1/jobs", {"content-type": "application/json"},
     b"[" * DEEP + b"]" * DEEP),
    (f"{DEEP:,}-deep nesting inside a field", "POST", "/v1/jobs", {"content-type": "application/json"},
     b'{"model": "tiny-chaos", "prompts": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
]  # fmt: skip


def hostile_inputs(stack: Stack) -> dict[str, Any]:
    answers: dict[str, int | str] = {}
    for name, method, path, headers, body in HOSTILE_INPUTS:
        for keyed in (False, True):
            label = f"{name}{' (with key)' if keyed else ''}"
            sent = {**headers, **(stack.headers if keyed else {})}
            try:
                response = httpx.request(method, f"{stack.url}{path}", headers=sent, content=body, timeout=30)
                answers[label] = response.status_code
            except httpx.TransportError as error:
                answers[label] = f"transport error: {type(error).__name__}"
    failures = {k: v for k, v in answers.items() if not isinstance(v, int) or v >= 500}
    return {"ok": not failures, "responses_500_or_worse": len(failures), "answers": answers}


def worker_killed(stack: Stack) -> dict[str, Any]:
    job_id = stack.submit()
    stack.wait_mid_chunk(job_id, 0)
    store = stack.store()
    book, leases = ChunkBook.for_store(store), Leases.for_store(store)
    holder = leases.holder(job_id, 0) or ""
    pid = int(holder.split(":")[1])
    victim = next(w for w in stack.workers if any(c.pid == pid for c in psutil.Process(w.pid).children()))
    os.killpg(victim.pid, signal.SIGKILL)  # main and pool process at once: nothing is handed back
    victim.wait()
    killed = time.monotonic()
    recovered_s = None
    while time.monotonic() - killed < TARGET_RECOVERY_S + 60:
        if book.deliveries(job_id).get(0, 0) >= 2:
            recovered_s = time.monotonic() - killed
            break
        time.sleep(0.1)
    status = stack.wait(job_id)
    report: dict[str, Any] = {
        "status": status["status"],
        "seconds_until_chunk_ran_elsewhere": recovered_s,
        "seconds_until_job_done": time.monotonic() - killed,
        "target_s": TARGET_RECOVERY_S,
        "note": status.get("note"),
        "deliveries": book.deliveries(job_id),
    }
    store.close()
    if status["status"] == "succeeded":
        report.update(compare(stack, stack.result(job_id)))
    report["ok"] = (
        status["status"] == "succeeded" and recovered_s is not None and recovered_s < TARGET_RECOVERY_S
        and report.get("same_numbers", False)
    )  # fmt: skip
    return report


def _start_serve(stack: Stack, data_dir: Path, port: int, log_name: str) -> subprocess.Popen[bytes]:
    """`hydra-ablate serve` on `port` with `data_dir`, its embedded Redis (REDIS_URL unset) and the tiny model."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("HYDRA_")}
    env.update(
        HYDRA_DATA_DIR=str(data_dir), HYDRA_MODELS=stack.env["HYDRA_MODELS"], HYDRA_API_PROCESSES="2",
        HYDRA_CHUNK_PROMPTS="3", HYDRA_BATCH_TOKENS="1", HYDRA_CLEAN_CACHE_BYTES="0", PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200",
    )  # fmt: skip
    log = (stack.folder / log_name).open("ab")
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--ready-timeout", "300"]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _wait_serve_ready(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        with suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=3).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"serve on port {port} did not become ready (exit code {process.poll()})")


def serve_killed(stack: Stack) -> dict[str, Any]:
    data_dir, port = stack.folder / "serve-data", free_port()
    first = _start_serve(stack, data_dir, port, "serve-1.log")
    report: dict[str, Any] = {}
    children: list[psutil.Process] = []
    try:
        _wait_serve_ready(first, port)
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60)  # auth off: the local single-user stack
        report["submit_status"] = answer.status_code
        job_id = str(answer.json()["id"])
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the job never started running")
            time.sleep(0.1)
        other = _start_serve(stack, data_dir, free_port(), "serve-2.log")
        report["second_serve_on_the_folder_refused"] = other.wait(timeout=120) == 1 and (
            "in use by another" in (stack.folder / "serve-2.log").read_text(errors="replace")
        )
        children = psutil.Process(first.pid).children(recursive=True)
        report["children"] = len(children)
        first.kill()
        first.wait()
        killed = time.monotonic()
        alive = [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
        while alive and time.monotonic() - killed < 60:
            time.sleep(0.1)
            alive = [child for child in alive if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
        report["seconds_until_every_child_gone"] = time.monotonic() - killed if not alive else None
        report["left_running"] = [" ".join(child.cmdline())[:80] for child in alive]
        from service.api.serve import port_is_free

        report["port_free"] = port_is_free("127.0.0.1", port)
        again = _start_serve(stack, data_dir, port, "serve-3.log")
        try:
            _wait_serve_ready(again, port)
            report["restarted_after_s"] = time.monotonic() - killed
            deadline = time.monotonic() + 600
            status: dict[str, Any] = {}
            while time.monotonic() < deadline:
                status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
                if status.get("status") in TERMINAL:
                    break
                time.sleep(0.3)
            report["job_after_restart"] = status.get("status")
            report["seconds_until_job_done"] = time.monotonic() - killed
            report["note"] = status.get("note")
        finally:
            again.terminate()
            again.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
        for child in children:
            with suppress(psutil.Error):
                child.kill()
    report["ok"] = bool(
        report.get("second_serve_on_the_folder_refused") and report.get("seconds_until_every_child_gone") is not None
        and report.get("port_free") and report.get("job_after_restart") == "succeeded"
    )  # fmt: skip
    return report


# --- Redis refusing writes, webhooks that hold, large submits ------------------------------------------------

SMALL_JOB = {"model": MODEL, "prompts": PROMPTS[:2], "components": ["attn.0"], "ablation": "zero"}
REFUSAL_S = 8.0


def start_webhook_worker(stack: Stack) -> None:
    """The webhook queue's own worker, as `hydra-ablate serve` runs it (threads, no model)."""
    from service.core.queue import webhook_queue

    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "threads", "-c", "4",
        "-Q", webhook_queue(stack.env["HYDRA_QUEUE"]), "-n", "chaos-webhooks@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    log = (stack.folder / "webhooks.log").open("ab")
    process = subprocess.Popen(
        command, env={**os.environ, **stack.env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    stack.workers.append(process)


def _refused_writes(stack: Stack, kind: str) -> dict[str, Any]:
    started = time.monotonic()
    job_id = stack.submit()
    stack.wait_mid_chunk(job_id, 1)
    reads: list[int] = []
    submits: list[str] = []
    alive = [w for w in stack.workers if w.poll() is None]  # (worker_killed may have run before)
    with stack.redis.full() if kind == "full" else stack.redis.failing_aof() as error:
        until = time.monotonic() + REFUSAL_S
        while time.monotonic() < until:
            with suppress(httpx.TransportError):
                reads.append(httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.headers, timeout=10).status_code)
                if len(submits) < 2:
                    answer = httpx.post(f"{stack.url}/v1/jobs", json=SMALL_JOB, headers=stack.headers, timeout=10)
                    submits.append(f"{answer.status_code}: {answer.json().get('detail', '')[:160]}")
            time.sleep(0.25)
    status = stack.wait(job_id)
    report: dict[str, Any] = {
        "status": status["status"], "error": status.get("error"), "redis_said": error, "refused_s": REFUSAL_S,
        "reads_during": {str(code): reads.count(code) for code in sorted(set(reads))}, "submits_during": submits,
        "workers_alive": all(w.poll() is None for w in alive),
    }  # fmt: skip
    if status["status"] == "succeeded":
        report.update(compare(stack, stack.result(job_id)))
    store = stack.store()
    report["deliveries"] = ChunkBook.for_store(store).deliveries(job_id)
    store.close()
    report["seconds"] = time.monotonic() - started
    report["ok"] = (
        status["status"] == "succeeded" and report.get("same_numbers", False) and report["workers_alive"]
        and set(reads) == {200} and all(s.startswith("503") for s in submits)
    )  # fmt: skip
    return report


def redis_full(stack: Stack) -> dict[str, Any]:
    return _refused_writes(stack, "full")


def aof_failing(stack: Stack) -> dict[str, Any]:
    return _refused_writes(stack, "failing_aof")


def _timed_small_job(stack: Stack, callback: str | None = None) -> tuple[str, float]:
    started = time.monotonic()
    body = SMALL_JOB if callback is None else {**SMALL_JOB, "callback_url": callback}
    job_id = stack.submit(body)
    stack.wait(job_id)
    return job_id, time.monotonic() - started


def _callbacks(stack: Stack, job_id: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.headers, timeout=10).json()
        if status.get("callbacks"):
            return list(status["callbacks"])
        time.sleep(0.2)
    return []


def slow_webhook(stack: Stack) -> dict[str, Any]:
    from tests.test_webhook_isolation import Receivers

    receivers = Receivers()
    try:
        _, alone_s = _timed_small_job(stack)
        slow, _ = _timed_small_job(stack, f"http://127.0.0.1:{receivers.port}/slow")
        deadline = time.monotonic() + 30
        while "/slow" not in receivers.posts and time.monotonic() < deadline:
            time.sleep(0.05)
        _, next_s = _timed_small_job(stack)
        attempts = _callbacks(stack, slow)
    finally:
        receivers.close()
    first = attempts[0] if attempts else {}
    return {
        "ok": bool(first) and not first.get("delivered") and first.get("duration_ms", 1e9) < 11_500
        and next_s < alone_s + 5,
        "job_alone_s": round(alone_s, 2), "next_job_during_delivery_s": round(next_s, 2),
        "attempt": first,
    }  # fmt: skip


def huge_webhook(stack: Stack) -> dict[str, Any]:
    from tests.test_webhook_isolation import Receivers

    receivers = Receivers()
    try:
        job_id, _ = _timed_small_job(stack, f"http://127.0.0.1:{receivers.port}/huge")
        attempts = _callbacks(stack, job_id)
        time.sleep(1.0)
        sent = receivers.huge_sent
    finally:
        receivers.close()
    first = attempts[0] if attempts else {}
    return {
        "ok": bool(first.get("delivered")) and sent < 64 * 1024 * 1024,
        "attempt": first, "receiver_sent_mib": round(sent / (1 << 20), 1), "answer_mib": 600,
    }  # fmt: skip


def large_submits(stack: Stack) -> dict[str, Any]:
    from tests.test_large_submits import large_body, ten_large_submits

    body = large_body(MODEL)
    probe_job = stack.submit(SMALL_JOB)
    run = ten_large_submits(
        stack.url, body, stack.headers, {"health": ("/health", {}), "status": (f"/v1/jobs/{probe_job}", stack.headers)}
    )
    for response in run.answers:  # the accepted ones would keep the workers busy for long: cancel them
        if response.status_code == 202:
            httpx.delete(f"{stack.url}/v1/jobs/{response.json()['id']}", headers=stack.headers, timeout=30)
    summary = run.summary()
    return {
        "ok": set(run.codes) <= {202, 503} and 202 in run.codes and all(v["p99_s"] < 0.5 for v in summary.values())
        and all(set(codes) == {200} for codes in run.probe_codes.values()),
        "body_mb": round(len(body) / 1e6, 1), "answers": run.codes, "seconds": round(run.seconds, 1),
        "retry_after": sorted({r.headers.get("Retry-After") for r in run.answers if r.status_code == 503}),
        **summary,
    }  # fmt: skip


OTHER_KEY = "chaos-other-" + "k" * 26  # a second tenant, for streams_one_key
HELD_S = 20.0  # past every client library's default read timeout (redis-py's asyncio client: 5 s)


@contextmanager
def workers_paused(stack: Stack) -> Iterator[None]:
    """Every worker process (Celery main and pool) stopped: a job submitted meanwhile stays queued, quiet."""
    processes = [psutil.Process(w.pid) for w in stack.workers if w.poll() is None]
    processes += [child for p in list(processes) for child in p.children(recursive=True)]
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            with suppress(psutil.NoSuchProcess):
                process.resume()


def quiet_held(stack: Stack) -> dict[str, Any]:
    """A long poll (?wait=21) and an event stream on a job that does not change for 20 s: both held, the stream
    sending keep-alives, then the change delivered when the job runs."""
    answers: dict[str, Any] = {}
    lines: list[tuple[float, str]] = []

    def long_poll(job_id: str) -> None:
        started = time.monotonic()
        try:
            response = httpx.get(f"{stack.url}/v1/jobs/{job_id}", params={"wait": HELD_S + 1}, headers=stack.headers,
                                 timeout=90)  # fmt: skip
            answers["poll"] = (time.monotonic() - started, response.status_code, response.json().get("status"))
        except httpx.HTTPError as error:
            answers["poll"] = (time.monotonic() - started, type(error).__name__, str(error))

    def stream(job_id: str) -> None:
        started = time.monotonic()
        try:
            with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", headers=stack.headers,
                              timeout=90) as response:  # fmt: skip
                for line in response.iter_lines():
                    lines.append((time.monotonic() - started, line))
            answers["stream_end"] = "closed by the server after end"
        except httpx.HTTPError as error:
            answers["stream_end"] = f"{type(error).__name__}: {error}"

    with workers_paused(stack):
        job_id = stack.submit(SMALL_JOB)
        threads = [threading.Thread(target=f, args=(job_id,), daemon=True) for f in (long_poll, stream)]
        for thread in threads:
            thread.start()
        time.sleep(HELD_S + 2)
        held = "stream_end" not in answers
    for thread in threads:
        thread.join(timeout=90)
    poll_s, poll_code, poll_status = answers.get("poll", (None, None, None))
    keepalives = [at for at, line in lines if line == ": keep-alive"]
    ended = any(line == "event: end" for _, line in lines)
    return {
        "ok": held and poll_code == 200 and poll_status == "queued" and poll_s is not None and poll_s >= HELD_S
        and ended and answers.get("stream_end") == "closed by the server after end" and len(keepalives) >= 3,
        "long_poll": {"seconds": round(poll_s or 0, 1), "code": poll_code, "status": poll_status},
        "stream_open_for_s": round(HELD_S + 2, 1) if held else None, "keepalives_while_quiet": len(keepalives),
        "stream_end": answers.get("stream_end"), "stream_saw_end": ended,
    }  # fmt: skip


def streams_one_key(stack: Stack) -> dict[str, Any]:
    """100 event streams from one key on quiet jobs: past the per-key cap they are refused (429, Retry-After), and
    another key's status reads are as fast as before."""
    from tests.test_held_requests import RawStream

    def reads(seconds: float) -> tuple[list[float], list[int]]:
        times: list[float] = []
        codes: list[int] = []
        with httpx.Client(base_url=stack.url, headers={"X-API-Key": OTHER_KEY}, timeout=30) as client:
            first = client.post("/v1/jobs", json=SMALL_JOB)
            job_id = first.json()["id"] if first.status_code == 202 else "missing"
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                codes.append(client.get(f"/v1/jobs/{job_id}").status_code)
                codes.append(client.get("/v1/jobs?limit=20").status_code)
                times.append(time.perf_counter() - started)
                time.sleep(0.05)
        return times, codes

    def p99(samples: list[float]) -> float:
        return sorted(samples)[max(0, int(len(samples) * 0.99) - 1)] if samples else float("nan")

    held: list[RawStream] = []
    with workers_paused(stack):
        job_id = stack.submit(SMALL_JOB)
        reads(1.0)  # warm
        idle, idle_codes = reads(8.0)
        try:
            for _ in range(100):
                held.append(RawStream(stack.url, job_id, API_KEY))
            accepted = [s for s in held if s.status == 200]
            refused = [s for s in held if s.status == 429]
            retry_after = sorted({line.split(":", 1)[1].strip() for s in refused for line in s.headers.splitlines()
                                  if line.lower().startswith("retry-after:")})  # fmt: skip
            loaded, loaded_codes = reads(8.0)
            still_open = sum(s.is_open() for s in accepted)
        finally:
            for stream in held:
                stream.close()
    return {
        "ok": len(accepted) + len(refused) == 100 and bool(refused) and bool(retry_after)
        and still_open == len(accepted) and set(idle_codes) | set(loaded_codes) == {200}
        and p99(loaded) < max(0.1, 3 * p99(idle)),
        "accepted": len(accepted), "refused_429": len(refused), "retry_after": retry_after,
        "held_open_at_end": still_open,
        "other_key_p99_ms": {"before": round(1000 * p99(idle), 1), "with_100_streams": round(1000 * p99(loaded), 1)},
        "other_key_reads": len(idle) + len(loaded),
    }  # fmt: skip


SCENARIOS: list[Callable[[Stack], dict[str, Any]]] = [
    baseline,
    redis_restart,
    api_killed,
    hostile_inputs,
    worker_killed,
    redis_full,
    aof_failing,
    slow_webhook,
    huge_webhook,
    large_submits,
    serve_killed,
    quiet_held,
    streams_one_key,
]


def start_stack(folder: Path) -> Stack:
    from tests.tiny_models import build_tiny_model

    model_dir = build_tiny_model("llama", folder / MODEL)
    redis = FaultyRedis(folder / "redis")
    redis.start()
    env = {
        "REDIS_URL": redis.url,
        "HYDRA_KEY_PREFIX": "chaos:",
        "HYDRA_QUEUE": "hydra-chaos",
        "HYDRA_MODELS": f"{MODEL}={model_dir}",
        "HYDRA_API_KEYS": f"chaos:{API_KEY},other:{OTHER_KEY}",
        "HYDRA_CHUNK_PROMPTS": "3",
        "HYDRA_BATCH_TOKENS": "1",
        # Every chunk runs its own clean passes (none kept from an earlier job or chunk), or a chunk of prompts
        # seen before ends before the fault can be injected mid-chunk.
        "HYDRA_CLEAN_CACHE_BYTES": "0",
        "HYDRA_CALLBACK_ALLOW": "127.0.0.0/8",  # the webhook scenarios' receivers are on loopback
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    stack = Stack(folder=folder, redis=redis, env=env, port=free_port())
    stack.start_worker()
    stack.start_worker()
    start_webhook_worker(stack)
    stack.start_api()
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--only", nargs="*", help="scenario names to run (baseline always runs first)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped from outside: still stop the stack
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hydra-chaos-") as tmp:
        stack = start_stack(Path(tmp))
        try:
            for scenario in SCENARIOS:
                if args.only and scenario is not baseline and scenario.__name__ not in args.only:
                    continue
                started = time.monotonic()
                try:
                    outcome = scenario(stack)
                except Exception as error:  # noqa: BLE001 - a scenario that breaks is reported, the rest run
                    outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                outcome.setdefault("seconds", time.monotonic() - started)
                report[scenario.__name__] = outcome
                print(f"{scenario.__name__:15s} {'OK  ' if outcome['ok'] else 'FAIL'} "
                      f"{json.dumps({k: v for k, v in outcome.items() if k != 'ok'}, default=str)}", flush=True)
        finally:
            stack.close()
    report["all_ok"] = all(v["ok"] for v in report.values() if isinstance(v, dict))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    sys.exit(0 if report["all_ok"] else 1)


if __name__ == "__main__":
    main()
