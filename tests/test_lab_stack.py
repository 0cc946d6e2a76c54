"""Issue 12 through the live stack (real app, Redis, Celery worker, engine): every phase on the event stream, and
signed webhooks at a real HTTP receiver on loopback, a failing receiver retried with backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from service.api.app import create_app
from service.core.callbacks import verify
from tests.test_lab_api import parse_sse
from tests.test_stack_e2e import wait_terminal

BODY = {
    "model": "tiny-llama",
    "prompts": ["The capital of France is", "Rome is in", "Blue"],
    "components": ["attn", "mlp"],
}


@pytest.fixture()
def api(celery_worker: object, stack_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(stack_settings)) as client:
        yield client


class Receiver:
    """A real HTTP server on loopback that answers 500 to the first `failures` POSTs, then 204."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[float, dict[str, str], bytes, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 500 if len(outer.received) < outer.failures else 204
                outer.received.append((time.monotonic(), dict(self.headers.items()), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_event_stream_sees_every_phase_of_a_real_job_and_ends(api: TestClient) -> None:
    job = api.post("/v1/jobs", json=BODY).json()
    with api.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        events = parse_sse("".join(response.iter_text()))
    statuses = [msgspec.json.decode(e["data"]) for e in events if e["event"] in ("status", "progress")]
    phases = list(dict.fromkeys(s["phase"] for s in statuses))
    assert phases == ["queued", "loading_model", "clean_passes", "ablating", "merging", "finished"]
    # Per-prompt progress: each of the three prompts shows up while ablating.
    assert [s["progress"]["prompts_done"] for s in statuses if s["phase"] == "ablating"][-3:] == [1, 2, 3]
    assert events[-1]["event"] == "end" and statuses[-1]["status"] == "succeeded"
    assert statuses[-1]["progress"]["done"] == statuses[-1]["progress"]["total"]


def test_a_signed_webhook_reaches_a_loopback_receiver_and_a_failing_one_is_retried(api: TestClient) -> None:
    secret = api.get("/v1/webhooks/secret").json()["secret"]
    with Receiver(failures=2) as receiver:
        job = api.post("/v1/jobs", json={**BODY, "callback_url": receiver.url}).json()
        assert wait_terminal(api, job["id"])["status"] == "succeeded"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(receiver.received) < 3:
            time.sleep(0.1)
    assert [code for *_, code in receiver.received] == [500, 500, 204]
    times = [at for at, *_ in receiver.received]
    assert times[1] - times[0] >= 0.15 and times[2] - times[1] >= 0.35  # 0.2 s, then 0.4 s: backoff doubles
    for _, headers, body, _ in receiver.received:
        assert verify(secret, headers, body)
        assert not verify(secret, headers, body + b" ")  # the signature covers the body
        sent = msgspec.json.decode(body)
        assert sent["id"] == job["id"] and sent["status"] == "succeeded"
    stale = {**receiver.received[0][1]}
    assert not verify(secret, stale, receiver.received[0][2], now=time.time() + 3600)  # replayed an hour later
    attempts = api.get(f"/v1/jobs/{job['id']}").json()["callbacks"]
    assert [(a["attempt"], a["status_code"], a["delivered"]) for a in attempts] == [
        (1, 500, False),
        (2, 500, False),
        (3, 204, True),
    ]
    assert "500" in attempts[0]["error"]


def test_a_cancelled_job_is_announced_too(api: TestClient) -> None:
    with Receiver(failures=0) as receiver:
        body = {**BODY, "prompts": [f"prompt number {i}" for i in range(40)], "callback_url": receiver.url}
        job = api.post("/v1/jobs", json=body).json()
        assert api.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not receiver.received:
            time.sleep(0.1)
    assert msgspec.json.decode(receiver.received[0][2])["status"] == "cancelled"
