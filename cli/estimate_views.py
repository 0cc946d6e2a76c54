"""The lines `hydra-ablate result` prints for a job with attribution-patching estimates (ablation and patching
jobs alike): per method its rank agreement with the exact values, its recall of the exact top-k and how much
faster than the exact engine it ran. Each line fits 80 columns."""

from __future__ import annotations

from hydra_ablate_client.wire import AttributionSummary


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def attribution_lines(block: AttributionSummary | None, unit: str = "prompt") -> list[str]:
    """`unit`: what the per-row agreement is taken within ("prompt", or "pair" for a patching job)."""
    if block is None:
        return []
    speed = {c.method: c.speedup for c in block.cost}
    lines = [f"estimates against exact (Spearman ρ per {unit}, pooled; top-k recall; speed):"]
    for a in block.agreement:
        times = speed.get(a.method)
        lines.append(f"  {a.method:<9} ρ {_num(a.spearman_per_prompt_mean, '+.2f')}, "
                     f"{_num(a.spearman_pooled, '+.2f')}; top-{a.k} {_num(a.recall_at_k_per_prompt_mean, '.2f')}; "
                     + ("—" if times is None else f"{times:.1f}× exact"))
    return lines
