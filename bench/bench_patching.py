"""Activation patching: the engine (worker/engine/patching.py) against a one-forward-per-patch hooks loop
(tests/patch_oracle.py) in the same run, on the built-in model and the built-in IOI pairs.

Two sweeps, both denoising:

- `resid_grid`: `resid_pre.L` for every layer at every position (the layer × position grid);
- `heads_final`: every head's output at the final position.

Reports seconds and CPU seconds of each method, the ratio, and the largest |engine − loop| difference of the
patched metric. Usage: `python bench/bench_patching.py --pairs 4 --threads 1 --out bench/patching-cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweeps", default="resid_grid,heads_final")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from service.core.ioi_pairs import ioi_pairs
    from tests.patch_oracle import oracle_patching
    from worker.engine.architecture import describe
    from worker.engine.patching import PatchPair, PatchSpec, run_patching
    from worker.model_cache import load_model
    from worker.model_sources import builtin_smollm2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model(builtin_smollm2())
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = describe(model)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    pairs = [
        PatchPair(
            torch.tensor(encode(p.clean)), torch.tensor(encode(p.corrupted)), encode(p.answer)[0],
            encode(p.counterfactual)[0],
        )
        for p in ioi_pairs(args.pairs, args.seed, encode)
    ]
    sweeps = {
        "resid_grid": ([f"resid_pre.{layer}" for layer in range(arch.n_layers)], "all"),
        "heads_final": (
            [f"head.{layer}.{h}" for layer in range(arch.n_layers) for h in range(arch.n_heads)], "final"
        ),
    }
    report: dict[str, Any] = {
        "model": "smollm2-135m", "pairs": len(pairs), "tokens_per_prompt": [int(p.clean_ids.shape[0]) for p in pairs],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "sweeps": {},
    }
    for name in args.sweeps.split(","):
        sites, positions = sweeps[name]
        spec = PatchSpec(sites=tuple(sites), positions=positions)  # type: ignore[arg-type]
        started, started_cpu = time.perf_counter(), time.process_time()
        result = run_patching(model, spec, pairs)
        engine = (time.perf_counter() - started, time.process_time() - started_cpu)
        started, started_cpu = time.perf_counter(), time.process_time()
        loop = [
            oracle_patching(model, p.clean_ids, p.corrupted_ids, p.answer_id, p.counterfactual_id, sites,
                            "denoise", positions)
            for p in pairs
        ]
        hooks = (time.perf_counter() - started, time.process_time() - started_cpu)
        worst = max(
            abs(a - b)
            for got, (_, _, expected) in zip(result.pairs, loop, strict=True)
            for row_a, row_b in zip(got.patched_metric, expected, strict=True)
            for a, b in zip(row_a, row_b, strict=True)
        )
        patches = sum(len(sites) * len(got.positions) for got in result.pairs)
        report["sweeps"][name] = {
            "sites": len(sites), "positions": positions, "patches": patches,
            "engine_seconds": engine[0], "engine_cpu_seconds": engine[1],
            "hooks_loop_seconds": hooks[0], "hooks_loop_cpu_seconds": hooks[1],
            "speedup_wall": hooks[0] / engine[0], "speedup_cpu": hooks[1] / engine[1],
            "max_abs_difference": worst,
            "flagged_pairs": sum(got.flagged for got in result.pairs),
        }
        print(name, json.dumps(report["sweeps"][name]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
