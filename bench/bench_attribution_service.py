"""Attribution patching against the exact fast engine through the service: jobs on a running stack, costs as the
results report them.

    python bench/bench_attribution_service.py [--model smollm2-135m] [--prompts 100] [--threads 1]
        [--samples 1] [--jobs all|estimates] [--verify 10,10] [--url http://127.0.0.1:8000]
        [--out bench/attribution-service-cpu.json]

`--out` keeps one entry per model and source count (`models`: the model's alias, with `@<n>-sources` when
`--samples` is above 1): a run on another model or count adds its own beside the others.

`--samples n`: n resample sources per prompt (`resample_samples`). The exact engine runs every head once per source;
AtP takes its gradient once per prompt, on the clean run, and needs one forward pass per source (its activations)
beside it: n + 2 model evaluations per prompt against the engine's n × components + n + 1, so the speed-up grows
with n (the runs kept in the JSON, one entry per model and source count, show by how much).
`--jobs estimates` runs the `estimates` job alone (its cost table is the same-run comparison; the check against a
separate exact job is then skipped).

Every head at the final position, resample ablation from the next prompt, the logit of the clean top token, the
first `--prompts` known_1000 prompts; the same request, seed and so resample sources in every job. Without --url it
starts a stack of its own (bench/reproduce_hydra.py's `start_stack`: embedded Redis, API, one worker serving
`--model`) in a temporary data folder that borrows the installed models (`models/` of HYDRA_DATA_DIR or
~/.cache/hydra-ablate). Three jobs, in this order:

- `verify`: `estimates: ["atp"]` with `verify: {top, random}`: the estimates of every head first, then the exact
  ablation of the verification set only; what a user waits for (its phases' seconds and model evaluations);
- `exact`: the plain job, every head ablated exactly: its compute time (the chunks' seconds, clean passes included);
- `estimates`: `estimates: ["atp"]`: every head ablated exactly *and* estimated, in the same chunks on the same
  clean runs; its summary's cost table (`summary.attribution.cost`) is the same-run comparison: per prompt, each
  method's model evaluations and seconds of its own work (the clean passes, shared, left out), and the exact
  engine's seconds over AtP's.

The first job pays the clean passes; the worker keeps clean runs for later jobs on the same prompts (the clean-run
cache), so the later `exact` job is, if anything, faster than it would be alone. A warm-up job (two prompts, one
component) runs before them, so that no job's time includes loading the model. Not a test: prints a table and
writes JSON. Checks that the `estimates` job's exact numbers and sources are the `exact` job's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reproduce_hydra import _interrupt, finish, start_stack, wait_for_model
from cli.stack import default_data_dir
from hydra_ablate_client.http import HydraClient
from hydra_ablate_client.wire import JobResult

# AtP's model evaluations per prompt and source, at most: with one source the clean run, the source's run and one
# backward pass; with n sources the clean run and the backward pass are shared, so n + 2 in all.
EVALUATIONS_BOUND = 3
SPEEDUP_BOUND = 50.0  # AtP's seconds at least this many times under the exact engine's, same components, same run


def base_request(model: str, prompts: int, samples: int = 1) -> dict[str, Any]:
    return {
        "model": model, "dataset": {"name": "known_1000", "limit": prompts}, "components": ["head"],
        "ablation": "resample", "resample_from": "next", "resample_samples": samples, "positions": "final",
        "metric": "logit", "seed": 0, "only_correct": False, "name": "attribution-bench",
    }  # fmt: skip


def private_data_dir(root: Path) -> Path:
    """A data folder of this run (its own Redis and lock), its `models/` the installed one."""
    installed = default_data_dir() / "models"
    folder = root / "data"
    folder.mkdir()
    if installed.is_dir():
        (folder / "models").symlink_to(installed.resolve(), target_is_directory=True)
    return folder


def same_exact_numbers(a: JobResult, b: JobResult) -> dict[str, Any]:
    """Whether two jobs of the same request measured the same prompts, sources and total effects."""
    same_sources = [p.sources for p in a.prompts] == [p.sources for p in b.prompts]
    largest = max(
        (abs(x - y) for p, q in zip(a.prompts, b.prompts, strict=True)
         for x, y in zip(p.total_effect, q.total_effect, strict=True)),
        default=0.0,
    )
    return {"same_prompts": [p.index for p in a.prompts] == [p.index for p in b.prompts],
            "same_sources": same_sources, "total_effect_max_abs_difference": largest}


def job_row(result: JobResult, elapsed: float) -> dict[str, Any]:
    return {"job": result.id, "wall_s": elapsed, "compute_s": result.provenance.elapsed_s,
            "compute_s_per_prompt": result.provenance.elapsed_s / max(result.summary.n_prompts, 1),
            "prompts": result.summary.n_prompts, "components": len(result.components)}


def meets_bounds(evaluations_per_prompt: float, sources: int, speedup: float) -> bool:
    """At most EVALUATIONS_BOUND model evaluations per prompt and source, and at least SPEEDUP_BOUND× the engine."""
    return evaluations_per_prompt / sources <= EVALUATIONS_BOUND and speedup >= SPEEDUP_BOUND


def report(
    args: argparse.Namespace, results: dict[str, tuple[JobResult, float]], requests: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    estimated, _ = results["estimates"]
    exact, _ = results.get("exact", results["estimates"])
    block = estimated.summary.attribution
    if block is None:
        raise SystemExit("the estimates job has no attribution summary")
    costs = {c.method: msgspec.to_builtins(c) for c in block.cost}
    atp, engine = costs["atp"], costs["exact"]
    agreement = next(msgspec.to_builtins(a) for a in block.agreement if a.method == "atp")
    agreement.pop("largest_misses", None)
    document: dict[str, Any] = {
        "model": args.model,
        "resample_samples": args.samples,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": exact.provenance.library_versions.get("torch"), "torch_threads": args.threads,
                    "device": exact.provenance.device, "load_average_after": os.getloadavg()},
        "prompts": exact.summary.n_prompts,
        "components": len(exact.components),
        "request": requests.get("exact", requests["estimates"]),
        "jobs": {name: job_row(result, elapsed) for name, (result, elapsed) in results.items()},
        "same_run": {
            "cost": list(costs.values()),
            "speedup": engine["seconds"] / atp["seconds"],
            "atp_model_evaluations_per_prompt": atp["model_evaluations"],
            "exact_model_evaluations_per_prompt": engine["model_evaluations"],
            "atp_model_evaluations_per_source": atp["model_evaluations"] / args.samples,
            "meets_bounds": meets_bounds(atp["model_evaluations"], args.samples, engine["seconds"] / atp["seconds"]),
            "bounds": {"model_evaluations_per_source_at_most": EVALUATIONS_BOUND, "speedup_at_least": SPEEDUP_BOUND},
        },
        "atp_agreement": agreement,
    }
    if "exact" in results:
        document["estimates_vs_exact_job"] = same_exact_numbers(estimated, exact)
    if "verify" in results:
        verified, _ = results["verify"]
        verification = verified.summary.attribution.verification if verified.summary.attribution else None
        if verification is None:
            raise SystemExit("the verify job has no verification block")
        phases = {p.phase: msgspec.to_builtins(p) for p in verification.phases}
        exact_compute = exact.provenance.elapsed_s
        document["verify_job"] = {
            "top": verification.top, "random": verification.random, "phases": list(phases.values()),
            "exact_all_model_evaluations_per_prompt": verification.exact_all_model_evaluations_per_prompt,
            # Whole jobs, clean passes included: the exact job's compute time over the estimates phase's, and over
            # the whole verify job's (both phases).
            "exact_job_over_estimates_phase": exact_compute / phases["estimates"]["seconds"],
            "exact_job_over_verify_job": exact_compute / verified.provenance.elapsed_s,
        }
    return document


def print_table(document: dict[str, Any]) -> None:
    same = document["same_run"]
    print(f"{document['model']}: {document['prompts']} prompts × {document['components']} heads, final position, "
          f"{document['resample_samples']} resample source(s) per prompt")
    print(f"{'method':<8}{'evals/prompt':>13}{'s/prompt':>11}{'×':>8}")
    for row in same["cost"]:
        speedup = row["speedup"] if row["speedup"] is not None else 1.0
        print(f"{row['method']:<8}{row['model_evaluations']:>13.1f}{row['seconds']:>11.4f}{speedup:>8.1f}")
    print(f"same run: AtP {same['speedup']:.1f}× the exact engine, {same['atp_model_evaluations_per_prompt']:.0f} "
          f"model evaluations per prompt, {same['atp_model_evaluations_per_source']:.2f} per source "
          f"(bounds met: {same['meets_bounds']})")
    for name, job in document["jobs"].items():
        print(f"job {name:<10} wall {job['wall_s']:7.1f} s, compute {job['compute_s']:7.1f} s")
    if "verify_job" in document:
        v = document["verify_job"]
        print(f"exact job / estimates phase {v['exact_job_over_estimates_phase']:.1f}×, "
              f"exact job / verify job {v['exact_job_over_verify_job']:.1f}×")
    if "estimates_vs_exact_job" in document:
        print(f"estimates job vs exact job: {document['estimates_vs_exact_job']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the stack's worker (OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--samples", type=int, default=1, help="resample sources per prompt (resample_samples)")
    parser.add_argument("--jobs", choices=("all", "estimates"), default="all",
                        help="all three jobs, or the estimates job alone")
    parser.add_argument("--verify", default="10,10", help="TOP,RANDOM of the verify job, or 'none' to skip it")
    parser.add_argument("--url", default=None, help="a running stack (default: start one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the job is cancelled and the stack stopped

    base = base_request(args.model, args.prompts, args.samples)
    requests: dict[str, dict[str, Any]] = {}
    if args.verify != "none" and args.jobs == "all":
        top, random = (int(part) for part in args.verify.split(","))
        requests["verify"] = {**base, "estimates": ["atp"], "verify": {"top": top, "random": random}}
    if args.jobs == "all":
        requests["exact"] = base
    requests["estimates"] = {**base, "estimates": ["atp"]}

    with tempfile.TemporaryDirectory(prefix="hydra-attribution-bench-") as scratch:
        stack = None
        url = args.url
        if url is None:
            os.environ["HYDRA_MODELS"] = args.model  # this model only: the worker loads nothing else
            # The workers keep this process's priority (under `nice -n 19`, 19) rather than the stack's default.
            os.environ["HYDRA_WORKER_NICE"] = str(max(os.nice(0), 0))
            if args.threads is not None:
                os.environ["OMP_NUM_THREADS"] = str(args.threads)
            data_dir = private_data_dir(Path(scratch))
            os.environ["HYDRA_DATA_DIR"] = str(data_dir)  # the worker finds the installed models there
            stack = start_stack(args.model, data_dir)
            url = stack.api_url
        try:
            with HydraClient(url, timeout=600) as client:
                wait_for_model(client, args.model)
                # One source: two prompts cannot give each other more (a prompt is never its own source).
                warm_up = {**base, "dataset": {"name": "known_1000", "limit": 2}, "components": ["attn.0"]}
                warm_up["resample_samples"] = 1
                finish(client, "warm-up", warm_up)  # loads the model on the worker
                results = {name: finish(client, name, request) for name, request in requests.items()}
        finally:
            if stack is not None:
                stack.stop()
    document = report(args, results, requests)
    print_table(document)
    if args.out is not None:
        write(args.out, document)
        print(f"wrote {args.out}")


def write(path: Path, document: dict[str, Any]) -> None:
    """`document` as the entry of its model in `path`'s `models`, the other models' entries kept."""
    models = json.loads(path.read_text())["models"] if path.exists() else {}
    samples = document["resample_samples"]
    key = document["model"] if samples == 1 else f"{document['model']}@{samples}-sources"
    models[key] = document
    path.write_text(json.dumps({"models": models}, indent=1) + "\n")


if __name__ == "__main__":
    main()
