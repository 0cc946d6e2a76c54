"""Reproduction of Rushing & Nanda 2024 (self-repair of single heads) on SmolLM2-135M with the rushing_nanda
preset on the built-in corpus: summary JSON, a per-head table and the self_repair figure into docs/reproduction/.

    python bench/reproduce_rushing_nanda.py [--documents 8] [--max-tokens 32]

The job is the preset exactly (every head, resample at every position, next-token target, clean norm scale, head
response basis), resolved by the service and run by the worker's own code path in one piece.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "reproduction"
RAW = ROOT / ".bench-out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=OUT, help="where the summary, table and figure go")
    args = parser.parse_args()
    out: Path = args.out

    import msgspec

    from hydra_ablate_client.wire import CorpusRef, JobRequest, ModelInfo
    from service.core.resolve import resolve
    from service.core.settings import Settings
    from service.rendering.figures import render
    from worker.chunk_execution import execute
    from worker.model_cache import load_model
    from worker.model_sources import builtin_smollm2

    loaded = load_model(builtin_smollm2())
    config = loaded.model.config
    info = ModelInfo(
        id="smollm2-135m", architecture="LlamaForCausalLM", n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads, d_model=config.hidden_size,
        vocab_size=config.vocab_size, parallel_blocks=False, source="builtin",
    )
    request = JobRequest(
        preset="rushing_nanda", corpus=CorpusRef(name="known_1000_text", limit=args.documents),
        max_tokens=args.max_tokens,
    )
    spec = resolve(request, {info.id: info}, Settings())
    started = time.perf_counter()
    result = execute("rushing-nanda-smollm2", spec, loaded)
    elapsed = time.perf_counter() - started
    summary = result.summary
    out.mkdir(parents=True, exist_ok=True)
    RAW.mkdir(parents=True, exist_ok=True)  # the whole result (large, not committed): figures can be redrawn from it
    (RAW / "rushing_nanda_result.json").write_bytes(msgspec.json.encode(result))
    (out / "rushing_nanda_smollm2_summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(summary)))
    (out / "self_repair.png").write_bytes(render(result, "self_repair", "png"))

    repair = summary.self_repair or []
    fractions = [r.self_repair_fraction for r in repair if r.self_repair_fraction is not None]
    total_repair = sum(r.self_repair_mean for r in repair)
    by_layer: dict[int, list[float]] = {}
    for r in repair:
        layer = int(r.component.split(".")[1])
        sums = by_layer.setdefault(layer, [0.0, 0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((r.direct_effect_mean, r.total_effect_mean, r.heads_mean, r.mlps_mean, r.norm_mean)):
            sums[i] += v / config.num_attention_heads
    lines = [
        (
            f"# Rushing & Nanda preset on SmolLM2-135M: {args.documents} documents of known_1000_text, "
            f"{args.max_tokens} tokens, {summary.n_pairs} (document, position) pairs, top "
            f"{100 * (summary.top_fraction or 0):.0f}% per head ({repair[0].n_pairs if repair else 0} pairs); "
            f"{elapsed:.0f} s on CPU"
        ),
        "",
        (
            "Per layer, means over its heads of the per-head means over each head's top pairs (logit of the next "
            "token, drops: clean − ablated; self-repair = DE − TE = their TE − DE)."
        ),
        "",
        "| layer | DE | TE | self-repair | heads | MLPs | norm | norm share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in sorted(by_layer):
        de, te, heads, mlps, norm = by_layer[layer]
        repair_mean = de - te
        share = f"{norm / repair_mean:.2f}" if abs(repair_mean) > 1e-9 else "–"
        lines.append(f"| {layer} | {de:.3f} | {te:.3f} | {repair_mean:.3f} | {heads:.3f} | {mlps:.3f} | "
                     f"{norm:.3f} | {share} |")
    lines += [
        "",
        (
            f"Heads: {len(repair)}; median self-repair fraction (self-repair / DE) "
            f"{statistics.median(fractions):.2f}; heads with fraction > 1 (over-correction): "
            f"{sum(f > 1 for f in fractions)}; with fraction < 0: {sum(f < 0 for f in fractions)}; norm share of the "
            f"summed self-repair over all heads: {sum(r.norm_mean for r in repair) / total_repair:.2f}."
        ),
    ]
    half = config.num_hidden_layers // 2
    late = [sums for layer, sums in by_layer.items() if layer >= half]
    late_repair = sum(de - te for de, te, *_ in late)
    late_de = sum(de for de, *_ in late)
    lines.append(
        f"Layers {half}–{config.num_hidden_layers - 1} together (means per layer, summed): self-repair / DE "
        f"{late_repair / late_de:.2f}; shares of the self-repair: heads {sum(s[2] for s in late) / late_repair:.2f}, "
        f"MLPs {sum(s[3] for s in late) / late_repair:.2f}, norm {sum(s[4] for s in late) / late_repair:.2f}."
    )
    (out / "rushing_nanda_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"elapsed_s": elapsed, "pairs": summary.n_pairs}))


if __name__ == "__main__":
    main()
