"""The `estimates` figure: every (prompt, component) estimate of attribution patching against its exact value,
coloured by the component's compensatory effect (CE) in that prompt.

One panel per method: `atp` against the exact total effect, `atp_star` (a magnitude) against the exact |TE| (mean
over the ablated runs). `atp_qkfix` is left out: for ablation components (not queries or keys) it equals `atp`.
Points off the diagonal are what the first-order estimate misses; a colour trend along the misses is self-repair the
gradient does not see (the summary's error-on-CE fits put a number on it). Per-position jobs draw a point per
(prompt, measured position, component), from the prompts' position columns.

Patching jobs with estimates draw the same panels from their pairs: `atp` against the exact `effect` (patched − base
metric), `atp_star` against |effect|, a point per (pair, site, patched position), coloured by the site's kind (a
patching job has no CE). Flagged pairs are drawn too: the effect and the estimates are not divided by the pair's gap.
Nothing is clipped: the axes span every finite point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra_ablate_client.vocabulary import is_knockout_name, parse_patch_site
from hydra_ablate_client.wire import EstimateAgreement, JobResult, PatchingResult
from service.rendering.figure_style import MIN_FONT_PT, metric_unit

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DRAWN = ("atp", "atp_star")
LABELS = {"atp": "AtP", "atp_star": "AtP*"}
MAGNITUDE = "abs_total_effect"  # EstimateAgreement.compared_with of a magnitude (atp_star)
# A patching job's points are coloured by the site's kind, in this order in the legend.
SITE_KINDS = ("resid_pre", "attn", "mlp", "head", "head q", "head k", "head v", "head pattern")
SITE_COLOURS = dict(zip(SITE_KINDS, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                     "tab:brown", "tab:pink"), strict=True))


def has_estimates(result: JobResult) -> bool:
    """Whether the job was run with `estimates` (an ablation or a patching job): what this figure draws."""
    if result.patching is not None:
        return result.patching.attribution is not None and bool(result.patching.pairs) and all(
            p.estimates is not None for p in result.patching.pairs)
    return result.summary.attribution is not None and bool(result.prompts) and all(
        p.estimates is not None for p in result.prompts)


def site_kind(site: str) -> str:
    """The colour group of a patching site: its kind, or "head q" … "head pattern" for a head's part."""
    parts = parse_patch_site(site)
    return parts.kind if parts.part is None else f"head {parts.part}"


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

    if not has_estimates(result):
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, 'this job has no estimates: submit it with "estimates": ["atp", "atp_star"]\n'
                "(ablation and patching jobs; docs/concepts/attribution.md)", ha="center", va="center",
                fontsize=14, transform=ax.transAxes)
        return
    if result.patching is not None:
        _draw_patching(fig, result, result.patching)
        return
    block = result.summary.attribution
    assert block is not None  # has_estimates
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
        exact_name = "|total effect|" if magnitude else "total effect"
        _finish_panel(ax, x, y, agreement[method], "pair" if per_position else "prompt")
        ax.set_xlabel(f"exact {exact_name} ({unit})")
        ax.set_ylabel(f"{LABELS[method]} estimate ({unit})")
        ax.set_title(f"{LABELS[method]} against the exact {exact_name}")
        ax.legend(loc="lower right")
    if points is not None:
        fig.colorbar(points, ax=list(axes), label=f"compensatory effect CE ({unit})")
    spec = result.provenance.spec
    where = " × every measured position" if per_position else ""
    fig.suptitle(f"{result.model}: attribution patching against exact ablation ({spec.ablation} ablation, "
                 f"{len(result.prompts)} prompts{where} × {len(result.components)} components)")


def _finish_panel(ax: Axes, x: Any, y: Any, a: EstimateAgreement, unit_of_ranking: str) -> None:
    """The diagonal, equal limits over every finite point and 0 (nothing clipped), and the method's agreement."""
    import numpy as np

    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)], [0.0]])
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.35", linestyle="--", linewidth=1,
            label="estimate = exact")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)

    def number(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    lines = [
        f"Spearman ρ per {unit_of_ranking} (mean) {number(a.spearman_per_prompt_mean)}",
        f"pooled {number(a.spearman_pooled)}",
        f"recall of the exact top-{a.k} {number(a.recall_at_k_per_prompt_mean)}",
        f"mean |error| {a.mean_abs_error:.3g}",
    ]
    ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=MIN_FONT_PT + 2,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"})
    ax.grid(True, alpha=0.3)


def patch_points(patching: PatchingResult, method: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per site kind, the (exact, estimate) points of `method` over every (pair, site, patched position), flagged
    pairs included: `effect` for `atp`, |effect| for `atp_star`. Knockout sets of sites have no estimates."""
    magnitude = method == "atp_star"
    points: dict[str, tuple[list[float], list[float]]] = {}
    for pair in patching.pairs:
        estimates = pair.estimates
        assert estimates is not None  # has_estimates
        values = getattr(estimates, method)
        for s, site in enumerate(patching.sites):
            if is_knockout_name(site) or values is None or s >= len(values):
                continue
            xs, ys = points.setdefault(site_kind(site), ([], []))
            for exact, estimate in zip(estimates.effect[s], values[s], strict=True):
                xs.append(abs(exact) if magnitude else exact)
                ys.append(estimate)
    return {kind: points[kind] for kind in SITE_KINDS if kind in points}


def _draw_patching(fig: Figure, result: JobResult, patching: PatchingResult) -> None:
    import numpy as np

    block = patching.attribution
    assert block is not None  # has_estimates
    agreement = {a.method: a for a in block.agreement}
    methods = [m for m in DRAWN if m in block.methods]
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        by_kind = patch_points(patching, method)
        for kind, (xs, ys) in by_kind.items():
            ax.scatter(xs, ys, color=SITE_COLOURS[kind], label=kind, s=18, alpha=0.75, linewidths=0,
                       rasterized=len(xs) > 5000)
        x = np.array([v for xs, _ in by_kind.values() for v in xs], dtype=np.float64)
        y = np.array([v for _, ys in by_kind.values() for v in ys], dtype=np.float64)
        magnitude = agreement[method].compared_with == MAGNITUDE
        exact_name = "|effect|" if magnitude else "effect"
        _finish_panel(ax, x, y, agreement[method], "pair")
        ax.set_xlabel(f"exact {exact_name}: patched − base metric (logit difference)")
        ax.set_ylabel(f"{LABELS[method]} estimate (logit difference)")
        ax.set_title(f"{LABELS[method]} against the exact {exact_name}")
        ax.legend(loc="lower right", title="site kind")
    n_sites = sum(not is_knockout_name(site) for site in patching.sites)
    where = " × every position" if patching.positions == "all" else ""
    flagged = f"; {patching.n_flagged} flagged pairs drawn too" if patching.n_flagged else ""
    fig.suptitle(f"{result.model}: attribution patching against the exact patches ({patching.direction}, "
                 f"{len(patching.pairs)} pairs{where} × {n_sites} sites{flagged})\n"
                 "coloured by site kind: a patching job has no compensatory effect (CE)")
