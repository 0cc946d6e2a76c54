"""Draw the reproduction's figures and per-layer tables from the raw results of bench/reproduce_hydra.py.

    python bench/render_reproduction.py

Reads .bench-out/hydra_smollm2_{correct,all,samples}.json (whichever exist), writes docs/reproduction/: the paper's
figures as PNG (1200 × 800) from the correctly answered prompts, Fig. 7 also from all prompts, Fig. 1/3 from the
samples job, and layer_table_{run}.md with the paper's statistics per layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_ablate_client.vocabulary import FigureName
from hydra_ablate_client.wire import ComponentSummary, Fit, JobResult
from service.rendering.figures import render

RAW = ROOT / ".bench-out"
OUT = ROOT / "docs" / "reproduction"
FIGURES: dict[str, tuple[FigureName, ...]] = {
    "correct": ("fig2", "fig7", "fig8", "erasure", "response_heatmap", "layer_effects", "te_vs_de"),
    "all": ("fig2", "fig7", "fig8", "erasure"),
}


def load(name: str) -> JobResult | None:
    path = RAW / f"hydra_smollm2_{name}.json"
    return msgspec.json.decode(path.read_bytes(), type=JobResult) if path.exists() else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def slope_cell(fit: Fit | None) -> str:
    if fit is None or fit.slope is None:
        return "–"
    mark = " *" if fit.excludes_one and (fit.slope_ci_high or 0) < 1 else ""
    return f"{fit.slope:.2f} [{fmt(fit.slope_ci_low)}, {fmt(fit.slope_ci_high)}]{mark}"


def table(result: JobResult) -> str:
    """One row per layer, attention then MLP: the paper's statistics."""
    by_name: dict[str, ComponentSummary] = {c.component: c for c in result.summary.components}
    n_layers = len(result.response_basis) // 2
    header = (
        "| layer | Δunembed | drop (TE) | CE | norm | CE on Δunembed: slope [95% CI] | R² | CE on DE: slope | "
        "corr(Δunembed, drop) | share Δunembed > drop |"
    )
    lines = []
    for kind in ("attn", "mlp"):
        lines += [f"\n**{'attention' if kind == 'attn' else 'MLP'} layers ablated**\n", header,
                  "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for layer in range(n_layers):
            c = by_name.get(f"{kind}.{layer}")
            if c is None:
                continue
            lines.append(
                f"| {layer} | {fmt(c.unembed_effect_mean)} | {fmt(c.total_effect_mean)} | "
                f"{fmt(c.compensatory_effect_mean)} | {fmt(c.norm_response_mean)} | {slope_cell(c.ce_vs_unembed)} | "
                f"{fmt(c.ce_vs_unembed.r2 if c.ce_vs_unembed else None)} | "
                f"{fmt(c.ce_vs_direct.slope if c.ce_vs_direct else None)} | {fmt(c.unembed_drop_correlation)} | "
                f"{fmt(c.unembed_exceeds_drop_share)} |"
            )
    selection = result.summary.selection
    intro = (f"{selection.n_kept} of {selection.n_candidates} prompts (only_correct: {selection.only_correct}). "
             "Effects in centred logits, means over prompts. `*`: the slope's 95% bootstrap interval lies below 1.")
    return intro + "\n" + "\n".join(lines) + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for run, names in FIGURES.items():
        result = load(run)
        if result is None:
            print(f"no raw result for {run}; skipped")
            continue
        for name in names:
            (OUT / f"{name}_{run}.png").write_bytes(render(result, name, "png"))
        (OUT / f"layer_table_{run}.md").write_text(table(result))
        print(f"{run}: {len(names)} figures and the table written")
    samples = load("samples")
    if samples is not None:
        (OUT / "profile.png").write_bytes(render(samples, "profile", "png"))
        (OUT / "profile.svg").write_bytes(render(samples, "profile", "svg"))
        print("samples: profile written")


if __name__ == "__main__":
    main()
