"""Webhooks cannot hold a worker, for real: a `celery worker` that plans jobs and runs chunks, a webhook worker of its
own (`-Q <queue>-webhooks -P threads`), the session's Redis (a database of its own) and hostile receivers on loopback.

- A receiver that trickles one byte every second: its delivery ends within HYDRA_CALLBACK_TIMEOUT_S (3 s here) in
  all, recorded as not answered in time, and the next job runs at once (the delivery is not in its worker's way).
- A receiver answering 200 with a 600 MB body: the delivery counts as delivered and the receiver manages to send a
  few MiB at most before the connection closes (4 KiB are read; the rest fills socket buffers, then stops).
- DNS rebinding: the host resolves to an allowed address for the check and to another one afterwards; the POST
  reaches the checked address only.
- https to the checked address still names the host: SNI, the certificate check and the Host header.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hydra_ablate_client.wire import JobSpec, JobStatus
from service.core.callbacks import deliver
from service.core.labels import parse_allow_list
from service.core.queue import JobQueue, webhook_queue
from service.core.settings import Settings
from service.core.store import JobLabels, JobStore
from tests.test_faults import WorkerProcess

MODEL = "tiny-hooks"
TIMEOUT_S = 3.0
TRICKLE_S = 40  # how long the slow receiver would hold a connection that waits for it
HUGE_BYTES = 600 * 1024 * 1024
BLOCK = b"x" * (1 << 20)


class Receivers:
    """Three HTTP receivers on one threaded server: /ok answers 204, /slow trickles its status line one byte per
    second, /huge answers 200 with HUGE_BYTES of body; what each one got and sent is counted."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.posts: list[str] = []
        self.hosts: list[str | None] = []  # the Host header of each POST
        self.huge_sent = 0
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receivers.posts.append(self.path)
                receivers.hosts.append(self.headers.get("Host"))
                try:
                    if self.path == "/slow":
                        for byte in b"HTTP/1.1 200 OK\r\n"[: TRICKLE_S]:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(1.0)
                        return
                    if self.path == "/huge":
                        self.send_response(200)
                        self.send_header("Content-Length", str(HUGE_BYTES))
                        self.end_headers()
                        while receivers.huge_sent < HUGE_BYTES:
                            self.wfile.write(BLOCK)
                            receivers.huge_sent += len(BLOCK)
                        return
                    self.send_response(204)
                    self.end_headers()
                except OSError:
                    return  # the deliverer hung up

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook_worker(env: dict[str, str], log: Path) -> WorkerProcess:
    """`celery -A worker.celery_app worker -Q <queue>-webhooks -P threads -c 4`, as `hydra-ablate serve` runs it."""
    return WorkerProcess(env, log, queue=webhook_queue(env["HYDRA_QUEUE"]), pool=("threads", "4"))


@dataclass
class HookStack:
    store: JobStore
    queue: JobQueue
    receivers: Receivers
    worker: WorkerProcess
    hooks: WorkerProcess

    def submit(self, callback: str | None = None) -> str:
        spec = JobSpec(
            model=MODEL, prompts=["The capital of France is", "Rome is in"], answers=None, counterfactuals=None,
            components=["attn.0", "mlp.0"], ablation="zero", positions="final", metric="logit", norm_scale="clean",
            resample_samples=1, resample_from="random", mean_reference_prompts=None, seed=1,
        )  # fmt: skip
        url = None if callback is None else f"http://127.0.0.1:{self.receivers.port}{callback}"
        job_id = self.store.create(spec, 4, "local", labels=JobLabels(callback_url=url)).id
        self.queue.enqueue(job_id)
        return job_id

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            logs = f"{self.worker.tail()}\n{self.hooks.tail()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs}"
            time.sleep(0.05)

    def finished(self, job_id: str, timeout_s: float) -> JobStatus:
        def done() -> bool:
            status = self.store.status(job_id)
            return status is not None and status.status in ("succeeded", "failed", "cancelled")

        self.wait(done, timeout_s, f"job {job_id}")
        status = self.store.status(job_id)
        assert status is not None
        return status

    def attempts(self, job_id: str) -> list[Any]:
        status = self.store.status(job_id)
        return [] if status is None else list(status.callbacks)


@pytest.fixture(scope="module")
def hooks_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HookStack]:
    from tests.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("webhook-isolation")
    tag = uuid.uuid4().hex[:8]
    env = {
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/7",  # a database of its own: its own broker keys
        "HYDRA_KEY_PREFIX": f"test-hooks-{tag}:",
        "HYDRA_QUEUE": f"hydra-hooks-{tag}",
        "HYDRA_MODELS": f"{MODEL}={build_tiny_model('llama', root / 'model')}",
        "HYDRA_CALLBACK_ALLOW": "127.0.0.0/8",
        "HYDRA_CALLBACK_TIMEOUT_S": str(TIMEOUT_S),
        "HYDRA_CALLBACK_MAX_ATTEMPTS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    settings = Settings(redis_url=env["REDIS_URL"], key_prefix=env["HYDRA_KEY_PREFIX"], queue_name=env["HYDRA_QUEUE"])
    store, queue, receivers = JobStore.from_settings(settings), JobQueue(settings), Receivers()
    worker = WorkerProcess(env, root / "worker.log")
    hooks = webhook_worker(env, root / "hooks.log")
    try:
        worker.wait_ready()
        hooks.wait_ready()
        stack = HookStack(store, queue, receivers, worker, hooks)
        stack.finished(stack.submit(), 120)  # the model is loaded: later jobs take a second or so
        yield stack
    finally:
        worker.stop()
        hooks.stop()
        receivers.close()
        store.close()
        queue.close()


def test_a_slow_receiver_is_cut_at_the_timeout_and_never_delays_the_next_job(hooks_stack: HookStack) -> None:
    stack = hooks_stack
    started = time.monotonic()
    alone = stack.finished(stack.submit(), 60)
    alone_s = time.monotonic() - started
    assert alone.status == "succeeded"

    slow = stack.submit("/slow")
    assert stack.finished(slow, 60).status == "succeeded"
    stack.wait(lambda: "/slow" in stack.receivers.posts, 30, "the slow delivery to start")
    started = time.monotonic()
    after = stack.finished(stack.submit(), 60)
    after_s = time.monotonic() - started
    assert after.status == "succeeded"
    assert after_s < alone_s + 5, (alone_s, after_s)  # not behind the delivery (that would be TRICKLE_S)

    stack.wait(lambda: bool(stack.attempts(slow)), 30, "the slow delivery's record")
    attempt = stack.attempts(slow)[0]
    assert not attempt.delivered
    assert attempt.error == f"the receiver did not answer within {TIMEOUT_S:g} s", attempt
    assert attempt.duration_ms < (TIMEOUT_S + 1.5) * 1000, attempt


def test_a_huge_answer_is_not_read(hooks_stack: HookStack) -> None:
    stack = hooks_stack
    job_id = stack.submit("/huge")
    assert stack.finished(job_id, 60).status == "succeeded"
    stack.wait(lambda: bool(stack.attempts(job_id)), 60, "the huge delivery's record")
    attempt = stack.attempts(job_id)[0]
    assert attempt.delivered and attempt.status_code == 200, attempt
    time.sleep(1.0)  # the receiver writes until its socket refuses more
    assert stack.receivers.huge_sent < 64 * 1024 * 1024, stack.receivers.huge_sent


def test_the_post_goes_to_the_address_that_was_checked(
    hooks_stack: HookStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host answers 127.0.0.1 (allowed) to the first resolution and 127.0.0.2 (not allowed) to any later one."""
    allowed = Receivers("127.0.0.1")
    forbidden = Receivers("127.0.0.2", allowed.port)
    real = socket.getaddrinfo
    answers = ["127.0.0.1"]

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.invalid":
            return real(host, port, *args, **kwargs)
        address = answers[0] if answers else "127.0.0.2"
        if answers:
            answers.pop()
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0))]

    try:
        url = f"http://rebind.invalid:{allowed.port}/ok"
        store = hooks_stack.store
        spec = store.spec(hooks_stack.submit())
        assert spec is not None
        job_id = store.create(spec, 4, "local", labels=JobLabels(callback_url=url)).id
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        record = deliver(store, job_id, 1, parse_allow_list("127.0.0.1/32"), TIMEOUT_S)
        assert record is not None and record.delivered, record
        assert allowed.posts == ["/ok"]
        assert forbidden.posts == []
    finally:
        allowed.close()
        forbidden.close()


def test_https_names_the_host_while_connecting_to_the_checked_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS receiver on 127.0.0.1 with a certificate for `localhost` only: the POST to the checked address with the
    host `localhost` verifies (SNI and the certificate check use the host's name, the Host header names it), and
    the same address under another name is refused by the certificate check."""
    import ssl

    from service.core.webhook_http import WebhookTarget, post

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    receivers = Receivers()
    seen: list[tuple[str | None, str | None]] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, _: seen.append((name, None))  # type: ignore[assignment,misc]
    receivers.server.socket = context.wrap_socket(receivers.server.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the deliverer's default context trusts this certificate
    try:
        target = WebhookTarget("https", "localhost", receivers.port, "/ok", "127.0.0.1")
        assert post(target, b"{}", {"Content-Type": "application/json"}, TIMEOUT_S) == 204
        assert seen == [("localhost", None)]
        assert receivers.posts == ["/ok"]
        assert receivers.hosts == [f"localhost:{receivers.port}"]
        other = WebhookTarget("https", "other.invalid", receivers.port, "/ok", "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError):
            post(other, b"{}", {}, TIMEOUT_S)
    finally:
        receivers.close()
