"""Reproduce the paper's setup (the `hydra` preset) through the service itself, on SmolLM2-135M or, with --model,
Gemma-3-270M: all 1,209 known_1000 prompts at their clean top token (`all_seeds`: the paper's 15 patches as 5 seeded
draws of 3; `all`: one draw of 15), sources with another top token (`different_target`), the correctly answered
prompts alone (`correct`), and one small job with per-patch samples for Fig. 1/3 (`samples`). Writes the summaries
(JSON, small) to docs/results/reproduction/ and the raw results (large, not committed) to .bench-out/;
bench/render_reproduction.py then draws the figures and writes the pages.

    python bench/reproduce_hydra.py [--url http://127.0.0.1:8000] [--model gemma-3-270m] [--limit N]
        [--runs all_seeds,different_target,correct,samples,all]

Without --url it starts its own stack (embedded Redis, API, one worker) on a free port, serving the --model too.
Files are named hydra_<model>_<run>, <model> being the alias up to its first "-" (smollm2, gemma).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.stack import Stack
from hydra_ablate_client.http import HydraClient
from hydra_ablate_client.wire import JobResult, JobStatus
from service.core.embedded_redis import free_port

OUT = ROOT / "docs" / "results" / "reproduction"
RAW = ROOT / ".bench-out"

# name -> the request (on top of the hydra preset: every prompt measured at its clean top token, as the paper).
RUNS: dict[str, dict[str, object]] = {
    "correct": {"preset": "hydra", "only_correct": True},
    # Fig. 1/3: per-patch profiles for the correctly answered prompts among the first 60.
    "samples": {
        "preset": "hydra", "dataset": {"name": "known_1000", "limit": 60}, "keep_samples": True, "only_correct": True
    },
    "all": {"preset": "hydra", "only_correct": False},
    # The paper's 15 patches per prompt drawn as 5 independent seeded draws of 3 sources, so that the bootstrap can
    # redraw sources (docs/concepts/definitions.md, "Statistics"); the same cost as "all".
    "all_seeds": {"preset": "hydra", "only_correct": False, "resample_samples": 3, "source_seeds": 5},
    "different_target": {
        "preset": "hydra",
        "only_correct": False,
        "resample_samples": 3,
        "source_seeds": 5,
        "resample_sources": "different_target",
    },
}


def summary_document(result: JobResult, elapsed: float, request: dict[str, object]) -> dict[str, object]:
    """Everything but the per-prompt data: the spec (without its prompt lists), provenance and the summary."""
    spec = msgspec.to_builtins(result.provenance.spec)
    for key in ("prompts", "answers", "resample_groups"):
        spec.pop(key, None)
    return {
        "job": result.id,
        "request": request,
        "elapsed_s": elapsed,
        "n_prompts": result.summary.n_prompts,
        "spec": spec,
        "provenance": {k: v for k, v in msgspec.to_builtins(result.provenance).items() if k != "spec"},
        "summary": msgspec.to_builtins(result.summary),
        "components": result.components,
        "response_basis": result.response_basis,
    }


def _parse(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def finish(
    client: HydraClient, name: str, request: dict[str, object], adopt: str | None = None
) -> tuple[JobResult, float]:
    """Submit the request (or follow the already submitted job `adopt`) and wait: its result and its running time
    (started → finished). Stopped meanwhile (Ctrl-C, SIGTERM), a job it submitted is cancelled."""
    started = time.perf_counter()
    job = client.status(adopt) if adopt else client.submit(request)
    logging.info("%s: job %s %s: %s", name, job.id, "adopted" if adopt else "submitted", request)
    last = {"t": 0.0}

    def report(status: JobStatus) -> None:
        if time.monotonic() - last["t"] > 60:
            last["t"] = time.monotonic()
            logging.info("%s: progress %s/%s", name, status.progress.done, status.progress.total)

    try:
        final = client.wait(job.id, poll_s=2.0, on_progress=report)
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM): a job left queued would run first in the next stack on the same data folder.
        if not adopt:
            client.cancel(job.id)
            logging.info("%s: job %s cancelled", name, job.id)
        raise
    if final.status != "succeeded":
        raise SystemExit(f"{name}: job ended {final.status}: {final.error}")
    # The job's own running time (started → finished), whether this script submitted it or adopted it.
    elapsed = (
        (_parse(final.finished_at) - _parse(final.started_at))
        if final.started_at and final.finished_at
        else (time.perf_counter() - started)
    )
    return client.result(job.id), elapsed


def run(
    client: HydraClient, name: str, request: dict[str, object], adopt: str | None = None, slug: str = "smollm2"
) -> None:
    """Submit the run (or follow the already submitted job `adopt`), wait, and write its files."""
    result, elapsed = finish(client, name, request, adopt)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / f"hydra_{slug}_{name}.json").write_bytes(msgspec.json.encode(result))
    OUT.mkdir(parents=True, exist_ok=True)
    if name != "samples":
        document = summary_document(result, elapsed, request)
        (OUT / f"hydra_{slug}_{name}_summary.json").write_text(json.dumps(document, indent=1))
    selection = result.summary.selection
    logging.info("%s: done in %.0f s: %d of %d prompts kept", name, elapsed, selection.n_kept, selection.n_candidates)


def wait_for_model(client: HydraClient, alias: str, timeout_s: float = 900) -> None:
    """Until a worker advertises `alias`: a stack is ready once any model is, and workers load theirs in turn."""
    deadline = time.monotonic() + timeout_s
    while True:
        served = [model.id for model in client.models()]
        if alias in served:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"no worker serves {alias!r} after {timeout_s:.0f} s (served: {', '.join(served)})")
        time.sleep(2.0)


def start_stack(model: str | None, data_dir: Path | None = None) -> Stack:
    """A stack of its own on a free port (embedded Redis, API, one worker), its workers serving `model` too; ready
    when it returns (the model itself may still be loading: `wait_for_model`)."""
    if model:
        served = os.environ.get("HYDRA_MODELS", "smollm2-135m").split(",")
        os.environ["HYDRA_MODELS"] = ",".join(dict.fromkeys([*served, model]))
    stack = Stack(port=free_port()) if data_dir is None else Stack(port=free_port(), data_dir=data_dir)
    stack.start()
    try:
        stack.wait_ready()
    except BaseException:
        stack.stop()
        raise
    return stack


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only (default: all 1,209)")
    parser.add_argument("--runs", default="all_seeds,samples", help="which runs, comma-separated")
    parser.add_argument("--model", default=None, help="a built-in model alias (default: the preset's, SmolLM2)")
    parser.add_argument("--adopt", action="append", default=[], help="NAME=JOB_ID: follow a job already submitted")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the job is cancelled and the stack stopped

    stack = None
    url = args.url
    if url is None:
        stack = start_stack(args.model)
        url = stack.api_url
    try:
        with HydraClient(url, timeout=600) as client:
            if args.model:
                wait_for_model(client, args.model)
            adopted = dict(item.split("=", 1) for item in args.adopt)
            for name in args.runs.split(","):
                request = dict(RUNS[name])
                if args.model:
                    request["model"] = args.model
                if args.limit and "dataset" not in request:
                    request["dataset"] = {"name": "known_1000", "limit": args.limit}
                run(client, name, request, adopted.get(name), (args.model or "smollm2-135m").split("-")[0])
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
