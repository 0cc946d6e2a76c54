"""Load test of the API: many concurrent clients submitting small jobs and polling them. Not a test: prints a table
and JSON of submit and poll latencies (p50/p99), request counts, errors (5xx or transport failures) and 429s.

    python bench/load.py                                   # own local stack: embedded Redis, API, 1 worker, tiny model
    python bench/load.py --url http://127.0.0.1:8000 --api-key KEY     # a running server (loopback only)
    python bench/load.py --clients 50 --duration 60 --json bench/load.json

Without --url it starts the `hydra-ablate serve` stack (cli.stack.Stack) on a free port with REDIS_URL unset,
its data in a temporary folder, serving a tiny random Llama built offline (tests/tiny_models.py), so jobs finish in
well under a second and the numbers measure the API rather than the model. Each client has its own API key
(HYDRA_API_KEYS), so per-key limits apply per client, as they would for separate users. Bounded in time: the run
stops after --duration seconds plus at most one request timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_ablate_client.vocabulary import TERMINAL_STATES

TERMINAL = set(TERMINAL_STATES)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TINY_ALIAS = "tiny-bench"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "My favourite colour is"]


@dataclass
class Kind:
    """Latencies and outcomes of one kind of request (submit or poll)."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def record(self, started: float, outcome: str) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.statuses[outcome] += 1

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        errors = self.statuses["5xx"] + self.statuses["transport"]
        return {
            "requests": len(lat),
            "p50_ms": round(_quantile(lat, 0.50), 2),
            "p99_ms": round(_quantile(lat, 0.99), 2),
            "mean_ms": round(statistics.fmean(lat), 2) if lat else 0.0,
            "max_ms": round(lat[-1], 2) if lat else 0.0,
            "errors": errors,
            "rate_limited_429": self.statuses["429"],
            "statuses": dict(sorted(self.statuses.items())),
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


@dataclass(frozen=True)
class Reply:
    """What a client keeps of a response: its status, Retry-After and the JSON body (read in full)."""

    status: int
    retry_after: str | None
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One user's keep-alive HTTP/1.1 connection, with as little client-side work per request as possible.

    The load generator shares the machine's two cores with the API, Redis and the worker, and its requests queue
    in one event loop: its own CPU per request is added to every latency it measures, most visibly when fifty
    clients poll at the same moment. aiohttp on uvloop spent 0.25 ms of CPU per request (response objects,
    header multidicts, timers), enough to add ~12 ms to the last request of such a wave; this client writes the
    request in one call, reads the header block in one, then exactly Content-Length bytes (or the chunks of a
    chunked body). Connections open with each client's first request, so the opening burst (every client's
    first submit at once, to a fresh API, on new TCP connections) is measured.
    """

    def __init__(self, host: str, port: int, api_key: str) -> None:
        self.host, self.port = host, port
        key = f"X-API-Key: {api_key}\r\n" if api_key else ""
        self.head = f"Host: {host}:{port}\r\n{key}Accept: application/json\r\n"
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> Reply:
        reused = self.streams is not None
        try:
            return await self._exchange(method, path, body)
        except asyncio.IncompleteReadError as closed:
            if not reused or closed.partial:
                raise
        # The server closed the idle connection (uvicorn's keep-alive timeout: 5 s) before reading the request:
        # open a new one and send it again, as HTTP clients do.
        return await self._exchange(method, path, body)

    async def _exchange(self, method: str, path: str, body: bytes | None) -> Reply:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body is not None else ""
        writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{length}\r\n".encode() + (body or b""))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                content = await _read_chunks(reader)
            else:
                content = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            self.close()  # a half-read response leaves the connection unusable
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, headers.get("retry-after"), content)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _outcome(reply: Reply | None) -> str:
    if reply is None:
        return "transport"
    if reply.status >= 500:
        return "5xx"
    if reply.status == 429:
        return "429"
    return str(reply.status)


@dataclass
class Load:
    url: str
    keys: list[str]
    model: str
    duration_s: float
    poll_s: float
    timeout_s: float
    submit: Kind = field(default_factory=Kind)
    poll: Kind = field(default_factory=Kind)
    jobs: Counter[str] = field(default_factory=Counter)

    async def run(self) -> float:
        parts = urlsplit(self.url)
        connections = [Connection(parts.hostname or "127.0.0.1", parts.port or 80, key) for key in self.keys]
        deadline = time.monotonic() + self.duration_s
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self.client(connection, deadline) for connection in connections))
        finally:
            for connection in connections:
                connection.close()
        return time.perf_counter() - started

    async def client(self, http: Connection, deadline: float) -> None:
        body = json.dumps({"model": self.model, "prompts": PROMPTS, "components": ["attn.0", "mlp.0"]}).encode()
        while time.monotonic() < deadline:
            reply = await self._send(http, self.submit, "POST", "/v1/jobs", body)
            if reply is None or reply.status != 202:
                await asyncio.sleep(_backoff(reply, self.poll_s))
                continue
            self.jobs["submitted"] += 1
            await self.follow(http, reply.json()["id"], deadline)

    async def follow(self, http: Connection, job_id: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s)
            reply = await self._send(http, self.poll, "GET", f"/v1/jobs/{job_id}")
            if reply is not None and reply.status == 200:
                state = reply.json()["status"]
                if state in TERMINAL:
                    self.jobs[state] += 1
                    return
            elif reply is not None and reply.status == 429:
                await asyncio.sleep(_backoff(reply, self.poll_s))

    async def _send(
        self, http: Connection, kind: Kind, method: str, path: str, body: bytes | None = None
    ) -> Reply | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await http.request(method, path, body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            kind.record(started, "transport")
            return None
        kind.record(started, _outcome(reply))
        return reply


def _backoff(reply: Reply | None, poll_s: float) -> float:
    """Honour Retry-After (capped, so the run stays bounded); otherwise wait one poll interval."""
    if reply is not None and reply.status == 429:
        try:
            return min(5.0, float(reply.retry_after or poll_s))
        except ValueError:
            return poll_s
    return poll_s


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses (127.0.0.1) are allowed")
    return url.rstrip("/")


def start_stack(exits: ExitStack, clients: int, workers: int, env_overrides: dict[str, str]) -> tuple[str, list[str]]:
    """The local stack on a free port with a tiny model; returns its URL and one API key per client."""
    from cli.stack import Stack
    from service.core.embedded_redis import free_port
    from tests.tiny_models import build_tiny_model

    scratch = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="hydra-load-")))
    print("building a tiny model …", file=sys.stderr)
    model_dir = build_tiny_model("llama", scratch / "tiny-llama")
    keys = [f"bench-key-{i:03d}" for i in range(clients)]
    env = {
        "HYDRA_MODELS": f"{TINY_ALIAS}={model_dir}",
        "HYDRA_DATA_DIR": str(scratch / "data"),
        "HYDRA_AUTH": "on",
        "HYDRA_API_KEYS": ",".join(f"bench{i:03d}:{key}" for i, key in enumerate(keys)),
        **env_overrides,
    }
    saved = {name: os.environ.get(name) for name in [*env, "REDIS_URL"]}
    os.environ.pop("REDIS_URL", None)  # the stack's own embedded Redis
    os.environ.update(env)
    exits.callback(_restore, saved)
    stack = Stack(port=free_port(), workers=workers, data_dir=scratch / "data")
    exits.callback(stack.stop)
    stack.start()
    stack.wait_ready(timeout_s=300)
    return stack.api_url, keys


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def table(result: dict[str, Any]) -> str:
    columns = ("count", 7), ("p50 ms", 8), ("p99 ms", 8), ("mean ms", 8), ("max ms", 8), ("errors", 7), ("429", 6)
    header = f"{'request':<8} " + " ".join(f"{name:>{width}}" for name, width in columns)
    lines = [header, "-" * len(header)]
    for name in ("submit", "poll"):
        s = result[name]
        lines.append(
            f"{name:<8} {s['requests']:>7} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['mean_ms']:>8.1f} "
            f"{s['max_ms']:>8.1f} {s['errors']:>7} {s['rate_limited_429']:>6}"
        )
    lines.append(
        f"{result['clients']} clients, {result['elapsed_s']:.1f} s, {result['requests_per_s']:.0f} requests/s; jobs: "
        + ", ".join(f"{k} {v}" for k, v in result["jobs"].items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running API on 127.0.0.1 (default: start a local stack)")
    parser.add_argument("--api-key", default=os.environ.get("HYDRA_API_KEY", ""), help="key for --url")
    parser.add_argument("--model", help=f"model id to submit to (default: {TINY_ALIAS}, or the server's first)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between polls of a job")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    parser.add_argument("--workers", type=int, default=1, help="Celery workers of the local stack")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the local stack, e.g. HYDRA_RATE_LIMIT_WRITE=0 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    with ExitStack() as exits:
        if args.url:
            url, keys = check_loopback(args.url), [args.api_key] * args.clients
        else:
            overrides = dict(item.split("=", 1) for item in args.server_env)
            url, keys = start_stack(exits, args.clients, args.workers, overrides)
        model = args.model or _pick_model(url)
        load = Load(url, keys, model, args.duration, args.poll, args.timeout)
        print(f"{args.clients} clients for {args.duration:g} s against {url} (model {model}) …", file=sys.stderr)
        # This process built the tiny model (torch, transformers: millions of objects); a full collection of them
        # took 150-250 ms, a pause of every request in flight. Freeze them: collections see only the run's objects.
        gc.collect()
        gc.freeze()
        cpu_started = time.process_time()
        elapsed = uvloop.run(load.run())  # uvloop: less of the client's own CPU in what it measures
        client_cpu_s = time.process_time() - cpu_started
    total = len(load.submit.latencies_ms) + len(load.poll.latencies_ms)
    result = {
        "url": url,
        "model": model,
        "clients": args.clients,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(total / elapsed, 1) if elapsed else 0.0,
        "submit": load.submit.summary(),
        "poll": load.poll.summary(),
        "jobs": dict(load.jobs),
        # the load generator's own CPU per request (it shares the cores with what it measures)
        "client_cpu_ms_per_request": round(client_cpu_s / total * 1000, 4) if total else 0.0,
    }
    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 1 if result["submit"]["errors"] or result["poll"]["errors"] else 0


def _pick_model(url: str) -> str:
    served = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()]
    if not served:
        raise SystemExit("the server advertises no models")
    return TINY_ALIAS if TINY_ALIAS in served else served[0]


if __name__ == "__main__":
    raise SystemExit(main())
