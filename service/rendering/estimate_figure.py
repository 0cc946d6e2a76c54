"""The `estimates` figure: every (prompt, component) estimate of attribution patching against its exact value,
coloured by the component's compensatory effect (CE) in that prompt.

One panel per method: `atp` against the exact total effect, `atp_star` (a magnitude) against the exact |TE| (mean
over the ablated runs). `atp_qkfix` is left out: for ablation components (not queries or keys) it equals `atp`.
Points off the diagonal are what the first-order estimate misses; a colour trend along the misses is self-repair the
gradient does not see (the summary's error-on-CE fits put a number on it). Per-position jobs draw a point per
(prompt, measured position, component), from the prompts' position columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra_ablate_client.wire import JobResult
from service.rendering.figure_style import MIN_FONT_PT, metric_unit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DRAWN = ("atp", "atp_star")
LABELS = {"atp": "AtP", "atp_star": "AtP*"}


def _position_values(result: JobResult, name: str) -> Any:
    """Per-position jobs: one (C, P) array of the prompts' position columns, every pair flattened."""
    import numpy as np

    parts = [np.frombuffer(getattr(p.positions, name) or b"", dtype="<f4").astype(np.float64)
             for p in result.prompts if p.positions is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def _per_position(result: JobResult) -> bool:
    return bool(result.prompts) and all(p.positions is not None and p.positions.atp is not None for p in result.prompts)


def draw(fig: Figure, result: JobResult) -> None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    block = result.summary.attribution
    if block is None or not result.prompts or any(p.estimates is None for p in result.prompts):
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, 'this job has no estimates: submit it with "estimates": ["atp", "atp_star"]\n'
                "(ablation jobs; docs/concepts/attribution.md)", ha="center", va="center",
                fontsize=14, transform=ax.transAxes)
        return
    methods = [m for m in DRAWN if m in block.methods]
    agreement = {a.method: a for a in block.agreement}
    per_position = _per_position(result)
    ce = (_position_values(result, "compensatory_effect") if per_position
          else np.array([p.compensatory_effect for p in result.prompts], dtype=np.float64).ravel())
    bound = float(np.quantile(np.abs(ce), 0.99)) if ce.size else 0.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-max(bound, 1e-9), vmax=max(bound, 1e-9))
    unit = metric_unit(result)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    points = None
    for ax, method in zip(axes, methods, strict=True):
        estimates = [p.estimates for p in result.prompts if p.estimates is not None]
        magnitude = agreement[method].compared_with == "abs_total_effect"
        if per_position:
            y = _position_values(result, method)
            x = _position_values(result, "abs_total_effect" if magnitude else "total_effect")
        else:
            y = np.array([getattr(e, method) for e in estimates], dtype=np.float64).ravel()
            x = (np.array([e.abs_total_effect for e in estimates]) if magnitude
                 else np.array([p.total_effect for p in result.prompts])).astype(np.float64).ravel()
        points = ax.scatter(x, y, c=ce, cmap="coolwarm", norm=norm, s=18, alpha=0.75, linewidths=0,
                            rasterized=x.size > 5000)
        finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)], [0.0]])
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.35", linestyle="--", linewidth=1,
                label="estimate = exact")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        a = agreement[method]

        def number(v: float | None) -> str:
            return "—" if v is None else f"{v:.3f}"

        lines = [
            f"Spearman ρ per {'pair' if per_position else 'prompt'} (mean) {number(a.spearman_per_prompt_mean)}",
            f"pooled {number(a.spearman_pooled)}",
            f"recall of the exact top-{a.k} {number(a.recall_at_k_per_prompt_mean)}",
            f"mean |error| {a.mean_abs_error:.3g}",
        ]
        ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=MIN_FONT_PT + 2,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"})
        exact_name = "|total effect|" if magnitude else "total effect"
        ax.set_xlabel(f"exact {exact_name} ({unit})")
        ax.set_ylabel(f"{LABELS[method]} estimate ({unit})")
        ax.set_title(f"{LABELS[method]} against the exact {exact_name}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    if points is not None:
        fig.colorbar(points, ax=list(axes), label=f"compensatory effect CE ({unit})")
    spec = result.provenance.spec
    where = " × every measured position" if per_position else ""
    fig.suptitle(f"{result.model}: attribution patching against exact ablation ({spec.ablation} ablation, "
                 f"{len(result.prompts)} prompts{where} × {len(result.components)} components)")
