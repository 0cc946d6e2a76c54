"""Do unauthenticated probes starve authenticated requests? Not a test: prints the p50/p99 of an authenticated
status read, idle and while 20 clients without a key hammer /ready and /health, and their ratio.

    python bench/ready_load.py                       # own local stack (as bench/load.py: tiny model, auth on)
    python bench/ready_load.py --hammers 20 --duration 15 --json bench/ready-load.json

Target (issue 9, point 5): the loaded p99 stays under 2x the idle p99. The hammering clients run in a separate
process, so their own client-side work does not slow the measuring client's event loop; the measuring client
reads one finished job's status in a loop, one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import PROMPTS, _quantile, start_stack
from hydra_ablate_client.vocabulary import TERMINAL_STATES


def _hammer_process(url: str, clients: int, duration_s: float, counts: Any) -> None:
    async def one(path: str) -> None:
        deadline = time.monotonic() + duration_s
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    response = await http.get(path)
                    counts[response.status_code >= 500] += 1
                except httpx.HTTPError:
                    counts[1] += 1

    async def all_of_them() -> None:
        await asyncio.gather(*(one("/ready" if i % 2 == 0 else "/health") for i in range(clients)))

    asyncio.run(all_of_them())


async def _reads(url: str, key: str, job_id: str, duration_s: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=30) as http:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = await http.get(f"/v1/jobs/{job_id}")
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"status read answered {response.status_code}: {response.text}")
    return latencies


def _finished_job(url: str, key: str) -> str:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as http:
        served = [m["id"] for m in http.get("/v1/models").json()]
        body = {"model": served[0], "prompts": PROMPTS, "components": ["attn.0"]}
        job_id = str(http.post("/v1/jobs", json=body).json()["id"])
        for _ in range(600):
            if http.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL_STATES:
                return job_id
            time.sleep(0.1)
    raise SystemExit("the job did not finish")


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": round(_quantile(ordered, 0.5), 2),
        "p99_ms": round(_quantile(ordered, 0.99), 2),
        "max_ms": round(ordered[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hammers", type=int, default=20, help="clients without a key on /ready and /health")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase (idle, loaded)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    with ExitStack() as exits:
        url, keys = start_stack(exits, 1, 1, {})
        job_id = _finished_job(url, keys[0])
        idle = asyncio.run(_reads(url, keys[0], job_id, args.duration))
        counts = multiprocessing.Array("l", 2)
        hammer = multiprocessing.Process(
            target=_hammer_process, args=(url, args.hammers, args.duration + 3, counts), daemon=True
        )
        hammer.start()
        time.sleep(2.0)  # let the hammering reach full speed
        loaded = asyncio.run(_reads(url, keys[0], job_id, args.duration))
        hammer.join(timeout=args.duration + 60)
    result = {
        "hammers": args.hammers,
        "duration_s": args.duration,
        "idle": summary(idle),
        "loaded": summary(loaded),
        "probe_requests": counts[0] + counts[1],
        "probe_errors": counts[1],
        "cpu_count": multiprocessing.cpu_count(),
    }
    result["p99_ratio"] = round(result["loaded"]["p99_ms"] / max(result["idle"]["p99_ms"], 1e-9), 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(
        f"authenticated status read p99: idle {result['idle']['p99_ms']} ms, with {args.hammers} probing clients "
        f"{result['loaded']['p99_ms']} ms (x{result['p99_ratio']}; target < 2)",
        file=sys.stderr,
    )
    return 0 if result["p99_ratio"] < 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
