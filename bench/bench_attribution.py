"""Attribution patching against the exact fast engine, on the same components in the same run.

    python bench/bench_attribution.py [--prompts 100] [--components heads|layers|all] [--metric logit]
        [--ablation resample|mean|zero] [--positions final|all] [--out bench/attribution-cpu.json]

SmolLM2-135M-Instruct (the built-in model), the first `--prompts` known_1000 prompts, every head (30 × 9 = 270) at
the final position by default, resample ablation from the next prompt. Not a test: prints a table and writes JSON.

One process, one model, one clean-run cache: the clean passes (the prompts' and their sources', which both methods
need) run first and are timed on their own; then the exact sweep (worker/engine/sweep.py, batched ablated runs from
each component's layer on), AtP, and AtP* (AtP + QK fix + GradDrop), each reading the cached clean runs. Speed-ups
are reported with and without the shared clean passes. Agreement: Spearman's ρ between estimate and exact total
effect (AtP* against |TE|), per prompt across components and pooled, and recall of the true top-10, from
worker/attribution_summary.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def component_names(kind: str, n_layers: int, n_heads: int) -> list[str]:
    heads = [f"head.{layer}.{h}" for layer in range(n_layers) for h in range(n_heads)]
    layers = [f"{k}.{layer}" for layer in range(n_layers) for k in ("attn", "mlp")]
    return {"heads": heads, "layers": layers, "all": layers + heads}[kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--components", choices=["heads", "layers", "all"], default="heads")
    parser.add_argument("--metric", default="logit")
    parser.add_argument("--ablation", choices=["resample", "mean", "zero"], default="resample")
    parser.add_argument("--positions", choices=["final", "all"], default="final")
    parser.add_argument("--repeats", type=int, default=2, help="time each method this many times, keep the fastest")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a shared machine 1 keeps a descheduled thread from "
                             "stalling the other")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from worker.attribution_summary import summarise_attribution
    from worker.engine.architecture import describe
    from worker.engine.attribution import run_attribution
    from worker.engine.clean import CleanRunCache
    from worker.engine.sweep import clean_run, job_sources, run_sweep
    from worker.engine.types import SweepInputs, SweepSpec
    from worker.model_cache import load_model
    from worker.model_sources import builtin_smollm2

    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model(builtin_smollm2())
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = describe(model)
    rows = json.loads((ROOT / "service" / "core" / "data" / "known_1000.json").read_text())[: args.prompts]
    ids = [torch.tensor(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rows]
    names = component_names(args.components, arch.n_layers, arch.n_heads)
    spec = SweepSpec(components=tuple(names), ablation=args.ablation, positions=args.positions, metric=args.metric,
                     resample_from="next")
    inputs = SweepInputs(token_ids=ids)
    with_heads = any(n.startswith("head.") for n in names)
    all_positions = args.positions == "all"

    cache = CleanRunCache(max_bytes=8 << 30)
    cpu: dict[str, float] = {}
    started, started_cpu = time.perf_counter(), time.process_time()
    needed = set(range(len(ids))) | {s for src in job_sources(spec, inputs) for s in src}
    for i in sorted(needed):
        clean_run(model, arch, ids[i], all_positions=all_positions, with_heads=with_heads, cache=cache)
    clean_seconds = time.perf_counter() - started
    cpu["clean"] = time.process_time() - started_cpu

    def timed(label: str, fn: Any) -> tuple[Any, float]:
        """The fastest of `--repeats` runs, wall clock; the process's CPU time of that run in `cpu`."""
        best, result = float("inf"), None
        for _ in range(max(1, args.repeats)):
            started, started_cpu = time.perf_counter(), time.process_time()
            result = fn()
            if time.perf_counter() - started < best:
                best, cpu[label] = time.perf_counter() - started, time.process_time() - started_cpu
        return result, best

    exact, exact_seconds = timed("exact", lambda: run_sweep(model, spec, inputs, batch_tokens=None, clean_cache=cache))
    atp, atp_seconds = timed("atp", lambda: run_attribution(model, spec, inputs, estimates=("atp",),
                                                             clean_cache=cache))
    star, star_seconds = timed("atp_star", lambda: run_attribution(model, spec, inputs, estimates=("atp", "atp_star"),
                                                                   clean_cache=cache))
    n = len(ids)
    noise = spec.resample_samples if args.ablation == "resample" else 0
    summary = summarise_attribution(exact, star, exact_seconds / n, runs_per_component=1, noise_runs=noise, k=10)
    agreement = {a.method: a for a in summary.agreement}
    methods = {
        "exact": {"seconds": exact_seconds, "model_evaluations_per_prompt": 1 + noise + len(names)},
        "atp": {"seconds": atp_seconds, "model_evaluations_per_prompt": atp.cost["atp"].model_evaluations},
        "atp_star": {"seconds": star_seconds,
                     "model_evaluations_per_prompt": star.cost["atp_star"].model_evaluations},
    }
    for name, row in methods.items():
        row["cpu_seconds"] = cpu[name]
        row["seconds_per_prompt"] = row["seconds"] / n
        row["speedup_vs_exact"] = exact_seconds / row["seconds"]
        row["cpu_speedup_vs_exact"] = cpu["exact"] / cpu[name]
        row["speedup_vs_exact_with_clean_passes"] = (clean_seconds + exact_seconds) / (clean_seconds + row["seconds"])
        if name != "exact":
            a = agreement[name]
            row.update(
                compared_with=a.compared_with,
                spearman_per_prompt_mean=a.spearman_per_prompt_mean,
                spearman_per_prompt_median=a.spearman_per_prompt_median,
                spearman_pooled=a.spearman_pooled,
                spearman_of_means=a.spearman_of_means,
                recall_at_10_per_prompt_mean=a.recall_at_k_per_prompt_mean,
                recall_at_10_of_means=a.recall_at_k_of_means,
                mean_abs_error=a.mean_abs_error,
                largest_misses=[vars(m) for m in a.largest_misses[:5]],
            )
    # How much of each estimate's miss goes with the compensatory effect: per component, the error regressed on CE
    # across prompts; here the median over components of slope and R², and the share whose slope interval excludes 0.
    hydra = {}
    for method, rows_ in summary.hydra.items():
        slopes = [r.error_vs_ce.slope for r in rows_ if r.error_vs_ce.slope is not None]
        r2s = [r.error_vs_ce.r2 for r in rows_ if r.error_vs_ce.r2 is not None]
        hydra[method] = {
            "components": len(rows_),
            "error_vs_ce_slope_median": float(np.median(slopes)) if slopes else None,
            "error_vs_ce_r2_median": float(np.median(r2s)) if r2s else None,
            "slope_interval_excludes_zero_share": float(np.mean([bool(r.error_vs_ce.excludes_zero) for r in rows_])),
            "largest_abs_error_components": [
                {"component": r.component, "abs_error_mean": r.abs_error_mean, "error_mean": r.error_mean,
                 "compensatory_effect_mean": r.compensatory_effect_mean, "norm_response_mean": r.norm_response_mean,
                 "error_vs_ce_slope": r.error_vs_ce.slope, "error_vs_ce_r2": r.error_vs_ce.r2}
                for r in sorted(rows_, key=lambda r: -r.abs_error_mean)[:5]
            ],
        }
    report = {
        "model": "SmolLM2-135M-Instruct",
        "machine": {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "prompts": n,
        "components": len(names),
        "spec": {"components": args.components, "ablation": args.ablation, "positions": args.positions,
                 "metric": args.metric, "resample_from": "next"},
        "clean_passes": len(needed),
        "clean_seconds": clean_seconds,
        "clean_cpu_seconds": cpu["clean"],
        "gradient_checks": star.gradient_checks,
        "methods": methods,
        "hydra_link": hydra,
    }
    print(f"{n} prompts × {len(names)} components ({args.components}, {args.positions}, {args.ablation}, "
          f"{args.metric}); clean passes {clean_seconds:.2f} s (shared)")
    print(f"{'method':<9}{'wall s':>8}{'×exact':>7}{'CPU ×':>7}{'+clean':>7}{'evals':>7}{'ρ/prompt':>9}"
          f"{'ρ pooled':>9}{'top-10':>7}")
    for name, row in methods.items():
        rho, pooled, recall = (row.get(k) for k in ("spearman_per_prompt_mean", "spearman_pooled",
                                                     "recall_at_10_per_prompt_mean"))
        print(f"{name:<9}{row['seconds']:>8.2f}{row['speedup_vs_exact']:>7.1f}{row['cpu_speedup_vs_exact']:>7.1f}"
              f"{row['speedup_vs_exact_with_clean_passes']:>7.1f}{row['model_evaluations_per_prompt']:>7.1f}"
              + "".join(f"{v:>9.3f}" if isinstance(v, float) else f"{'':>9}" for v in (rho, pooled))
              + (f"{recall:>7.2f}" if isinstance(recall, float) else ""))
    for method, row in hydra.items():
        print(f"{method}: error on CE across prompts, median over components: slope "
              f"{row['error_vs_ce_slope_median']:.2f}, R² {row['error_vs_ce_r2_median']:.2f}; slope interval "
              f"excludes 0 for {row['slope_interval_excludes_zero_share']:.0%} of components")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
