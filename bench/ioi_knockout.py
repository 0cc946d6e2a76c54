"""Which heads carry the IOI answer, and what takes over when they are knocked out (a built-in model, IOI pairs).

1. Patch every head's output at the final position (denoise) over the pairs; rank the heads by the pooled score.
2. Knock the top `--top` heads out together (mean ablation over the pairs' clean prompts, metric logit_diff) and
   report TE, DE, CE and each layer component's response, each with a 95% bootstrap interval over the pairs.

An exploration on a small model, not a verdict: the layer basis says which attention layers respond, not which
heads. Usage: `python bench/ioi_knockout.py [--model gemma-3-270m] --pairs 16 --seed 1 --out
bench/ioi-knockout-smollm2.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from service.core.ioi_pairs import ioi_pairs
    from worker.engine.architecture import describe
    from worker.engine.patching import PatchPair, PatchSpec, run_patching
    from worker.engine.sweep import run_sweep
    from worker.engine.types import SweepInputs, SweepSpec
    from worker.model_cache import load_model
    from worker.model_sources import builtin_gemma, builtin_smollm2

    torch.set_num_threads(args.threads)
    loaded = load_model(builtin_gemma() if args.model == "gemma-3-270m" else builtin_smollm2())
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = describe(model)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    drawn = ioi_pairs(args.pairs, args.seed, encode)
    def prompt_ids(text: str) -> torch.Tensor:  # as the service tokenises a prompt: with the model's BOS (Gemma's)
        return torch.tensor(tokenizer(text).input_ids)

    pairs = [
        PatchPair(prompt_ids(p.clean), prompt_ids(p.corrupted), encode(p.answer)[0], encode(p.counterfactual)[0])
        for p in drawn
    ]
    heads = [f"head.{layer}.{h}" for layer in range(arch.n_layers) for h in range(arch.n_heads)]
    patched = run_patching(model, PatchSpec(sites=tuple(heads)), pairs)
    assert patched.pooled_score is not None
    pooled = torch.tensor([row[0] if row[0] is not None else float("nan") for row in patched.pooled_score])
    ranked = [int(i) for i in pooled.nan_to_num(float("-inf")).argsort(descending=True)]
    knocked = tuple(heads[i] for i in ranked[: args.top])
    rule = f"the top {args.top} heads by pooled score"
    if arch.attn_post_norm is not None:
        # A norm after attention mixes a layer's heads, so a set may not hold a head after an earlier member
        # (worker/engine/sweep.py): knock out the top heads of the best head's layer.
        layer = heads[ranked[0]].split(".")[1]
        knocked = tuple(h for h in (heads[i] for i in ranked[:10]) if h.split(".")[1] == layer)[: args.top]
        rule = (f"the best head's layer's heads among the 10 best (at most {args.top}; layer {layer}), since on this "
                "post-norm model a set cannot hold heads of two layers")

    spec = SweepSpec(components=knocked, knockouts=(knocked,), ablation="mean", metric="logit_diff")
    inputs = SweepInputs(
        token_ids=[p.clean_ids for p in pairs], target_ids=[p.answer_id for p in pairs],
        counterfactual_ids=[p.counterfactual_id for p in pairs],
    )
    swept = run_sweep(model, spec, inputs)
    generator = torch.Generator().manual_seed(0)
    n = len(swept.prompts)
    draws = torch.randint(0, n, (args.bootstrap, n), generator=generator)

    def interval(values: list[float]) -> dict[str, float]:
        v = torch.tensor(values, dtype=torch.float64)
        means = v[draws].mean(dim=1)
        return {"mean": float(v.mean()), "ci_low": float(means.quantile(0.025)),
                "ci_high": float(means.quantile(0.975))}

    def measures(k: int) -> dict[str, Any]:
        prompts = swept.prompts
        responses = {
            name: interval([p.response[k][j] for p in prompts]) for j, name in enumerate(swept.response_basis)
        }
        grown = {name: r for name, r in responses.items() if r["ci_low"] > 0}
        return {
            "total_effect": interval([p.total_effect[k] for p in prompts]),
            "direct_effect": interval([p.direct_effect[k] for p in prompts]),
            "compensatory_effect": interval([p.compensatory_effect[k] for p in prompts]),
            "norm_response": interval([p.norm_response[k] for p in prompts]),
            "responses_above_zero": dict(sorted(grown.items(), key=lambda item: -item[1]["mean"])),
        }

    report = {
        "model": args.model, "pairs": n, "seed": args.seed, "orders": [p.order for p in drawn],
        "clean_metric": interval([p.clean_metric for p in patched.pairs]),
        "corrupted_metric": interval([p.corrupted_metric for p in patched.pairs]),
        "top_heads_by_pooled_score": [{"head": heads[i], "pooled_score": float(pooled[i])} for i in ranked[:10]],
        "knocked_out": "+".join(knocked), "knockout_rule": rule,
        "knockout": measures(len(knocked)),
        "each_alone": {name: measures(k) for k, name in enumerate(knocked)},
        "ablation": "mean over the pairs' clean prompts", "bootstrap": args.bootstrap,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
