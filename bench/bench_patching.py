"""Activation patching: the engine (worker/engine/patching.py) against two one-forward-per-patch peers in the same
run, on the built-in model and the built-in IOI pairs: a plain PyTorch hooks loop (tests/patch_oracle.py) and
nnsight (one `trace` per patch, the clean activations saved by one trace per pair, as its users write a sweep).

Two sweeps, both denoising:

- `resid_grid`: `resid_pre.L` for every layer at every position (the layer × position grid);
- `heads_final`: every head's output at the final position.

The engine patches every site; with `--peer-sites K` each peer patches K evenly spaced sites of the sweep (every
position of each), since a peer's patch costs one full forward pass wherever it is. Speed-ups are ratios of patches
per second; the largest |engine − peer| difference of the patched metric is over the peer's patches. Usage:
`python bench/bench_patching.py --pairs 4 --threads 1 --peer-sites 6 --out bench/patching-cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
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
    parser.add_argument("--peers", default="hooks,nnsight")
    parser.add_argument("--peer-sites", type=int, default=None, help="sites per sweep the peers patch (default all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from service.core.ioi_pairs import ioi_pairs
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
        patches = sum(len(sites) * len(got.positions) for got in result.pairs)
        step = max(1, len(sites) // args.peer_sites) if args.peer_sites else 1
        peer_sites = sites[::step][: args.peer_sites or len(sites)]
        rows = [sites.index(site) for site in peer_sites]
        entry: dict[str, Any] = {
            "sites": len(sites), "positions": positions, "patches": patches,
            "engine_seconds": engine[0], "engine_cpu_seconds": engine[1],
            "engine_patches_per_s": patches / engine[0],
            "flagged_pairs": sum(got.flagged for got in result.pairs),
            "peer_sites": peer_sites, "peers": {},
        }
        for peer in args.peers.split(","):
            run_peer = hooks_peer(model) if peer == "hooks" else nnsight_peer(model, tokenizer, arch.head_dim)
            started, started_cpu = time.perf_counter(), time.process_time()
            metrics = [run_peer(pair, peer_sites, positions) for pair in pairs]
            wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
            worst = max(
                abs(got.patched_metric[row][column] - value)
                for got, peer_rows in zip(result.pairs, metrics, strict=True)
                for row, peer_row in zip(rows, peer_rows, strict=True)
                for column, value in enumerate(peer_row)
            )
            peer_patches = sum(len(row) for pair_rows in metrics for row in pair_rows)
            entry["peers"][peer] = {
                "patches": peer_patches, "seconds": wall, "cpu_seconds": cpu, "patches_per_s": peer_patches / wall,
                "speedup_wall": (patches / engine[0]) / (peer_patches / wall),
                "speedup_cpu": (patches / engine[1]) / (peer_patches / cpu),
                "max_abs_difference": worst,
            }
        report["sweeps"][name] = entry
        print(name, json.dumps(entry), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


Peer = Callable[[Any, list[str], str], list[list[float]]]  # (pair, sites, positions) -> metric [site][position]


def hooks_peer(model: Any) -> Peer:
    """tests/patch_oracle.py: one full forward pass per patch with PyTorch hooks (clean activations captured once)."""
    from tests.patch_oracle import oracle_patching

    def run(pair: Any, sites: list[str], positions: str) -> list[list[float]]:
        return oracle_patching(model, pair.clean_ids, pair.corrupted_ids, pair.answer_id, pair.counterfactual_id,
                               sites, "denoise", positions)[2]

    return run


def nnsight_peer(model: Any, tokenizer: Any, head_dim: int) -> Peer:
    """nnsight as its users write a denoising sweep: one trace saving the clean run's activations, then one trace of
    the corrupted prompt per patch. Llama-style modules (model.layers[L], self_attn.o_proj), as SmolLM2 has."""
    import torch
    from nnsight import LanguageModel

    lm = LanguageModel(model, tokenizer=tokenizer)
    layers = lm.model.layers

    def module_input(site: str) -> Any:  # the tensor the site reads: a block's input, or a head's part of o_proj's
        layer = int(site.split(".")[1])
        return layers[layer].input if site.startswith("resid_pre.") else layers[layer].self_attn.o_proj.input

    def columns(site: str) -> slice:
        if site.startswith("head."):
            head = int(site.split(".")[2])
            return slice(head * head_dim, (head + 1) * head_dim)
        return slice(None)

    def run(pair: Any, sites: list[str], positions: str) -> list[list[float]]:
        length = int(pair.clean_ids.shape[0])
        columns_of = list(range(length)) if positions == "all" else [length - 1]
        clean: dict[str, Any] = {}  # filled inside the trace: names bound there do not outlive it unless saved
        with torch.no_grad(), lm.trace(pair.clean_ids.unsqueeze(0)):
            for site in sites:
                clean[site] = module_input(site).save()
        out = []
        for site in sites:
            row = []
            for p in columns_of:
                with torch.no_grad(), lm.trace(pair.corrupted_ids.unsqueeze(0)):
                    module_input(site)[0, p, columns(site)] = clean[site][0, p, columns(site)]
                    logits = lm.lm_head.output[0, -1].save()
                row.append(float(logits[pair.answer_id] - logits[pair.counterfactual_id]))
            out.append(row)
        return out

    return run


if __name__ == "__main__":
    main()
