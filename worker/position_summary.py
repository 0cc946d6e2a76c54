"""Per-job statistics of a per-position job: over (prompt, position) pairs, and self-repair over each component's
top pairs by its direct effect as Rushing & Nanda 2024 define it (docs/concepts/definitions.md, "Every
position").

Their protocol, read in their code (starship006/backup_research, FINAL_figure_files/GOOD_breakdown_self_repair.py):
a head's direct effect is its clean output through the final LayerNorm with the clean scale onto the (centred)
unembedding of the next token, our `unembed_effect`; the kept pairs are its top int(2% × pairs); self-repair is
Δlogit − Δ(direct effect), our DE − TE; the LayerNorm part is what the heads and MLPs leave; and its share is
clip(LayerNorm part / direct effect, 0, 1) per pair, averaged over the kept pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from msgspec.structs import replace

from hydra_ablate_client.vocabulary import ComponentKind
from hydra_ablate_client.wire import (
    ComponentSummary,
    PositionColumns,
    PromptResult,
    Quantiles,
    Resampling,
    Selection,
    SelfRepair,
    SelfRepairLayer,
    Summary,
)
from worker.fit_statistics import CI_LEVEL, N_BOOT, cluster_mean_interval, percentile_interval
from worker.summary import EFFICACY_THRESHOLD, efficacy, regression

TOP_FRACTION = 0.02  # Rushing & Nanda's top 2% of (position, token) pairs by the head's direct effect


def column(columns: PositionColumns, name: str, rows: int) -> torch.Tensor:
    """One stored array as (rows, P) float64 (rows = components, basis entries, or 1)."""
    raw = getattr(columns, name)
    values = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    return torch.from_numpy(values).reshape(rows, -1)


def _pairs(prompts: Sequence[PromptResult], name: str, rows: int) -> torch.Tensor:
    """(rows, pairs): a column over every (prompt, position) pair, prompt-major."""
    return torch.cat([column(p.positions, name, rows) for p in prompts if p.positions is not None], dim=1)


def _documents(prompts: Sequence[PromptResult]) -> np.ndarray:
    """(pairs,): each pair's document (its prompt's place in `prompts`), in the order of _pairs."""
    return np.concatenate(
        [np.full(len(p.positions.positions), i) for i, p in enumerate(prompts) if p.positions is not None]
    ).astype(np.int64)


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean())
    return mean, (float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0)


def _quantiles(values: np.ndarray) -> Quantiles:
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()
    return Quantiles(p05=q[0], p25=q[1], p50=q[2], p75=q[3], p95=q[4])


def top_count(n_pairs: int, top_fraction: float = TOP_FRACTION) -> int:
    """How many pairs R&N keep: int(fraction × pairs), their rounding down (GOOD_breakdown_self_repair.py), but at
    least one."""
    return max(1, int(top_fraction * n_pairs))


def top_pairs(unembed: np.ndarray, top_fraction: float = TOP_FRACTION) -> np.ndarray:
    """Indices of the pairs with the largest clean write onto the target (R&N's direct effect of the head, read
    with the clean final-norm scale), largest first; ties keep the earlier pair."""
    return np.argsort(-unembed, kind="stable")[: top_count(unembed.size, top_fraction)]


def share_of_direct(part: np.ndarray, unembed: np.ndarray) -> np.ndarray:
    """R&N's per-pair share of the direct effect: clip(part / direct effect, 0, 1), NaN only for 0 / 0 (a nonzero
    part over a zero direct effect is ±inf, clipped to 1 or 0, as numpy's clip does in their code)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(part / unembed, 0.0, 1.0)


def _nanmean(values: np.ndarray) -> float | None:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator != 0 else None


def _kind_layer(name: str) -> tuple[ComponentKind, int]:
    kind, layer = name.split(".")[:2]
    return cast(ComponentKind, kind), int(layer)


def self_repair(
    name: str,
    unembed: np.ndarray,
    direct: np.ndarray,
    total: np.ndarray,
    heads: np.ndarray,
    mlps: np.ndarray,
    norm: np.ndarray,
    top_fraction: float = TOP_FRACTION,
) -> tuple[SelfRepair, np.ndarray]:
    """One component's self-repair over its top pairs by R&N's direct effect (1-D arrays over pairs), without the
    intervals (summarise_positions adds them); and the kept pairs' indices."""
    top = top_pairs(unembed, top_fraction)
    repair = direct[top] - total[top]
    kind, layer = _kind_layer(name)
    un_mean, repair_mean, norm_mean = float(unembed[top].mean()), float(repair.mean()), float(norm[top].mean())
    summary = SelfRepair(
        component=name,
        kind=kind,
        layer=layer,
        n_pairs=int(top.size),
        unembed_effect_threshold=float(unembed[top].min()),
        unembed_effect_mean=un_mean,
        direct_effect_mean=float(direct[top].mean()),
        total_effect_mean=float(total[top].mean()),
        self_repair_mean=repair_mean,
        self_repair_se=float(repair.std(ddof=1)) / math.sqrt(top.size) if top.size > 1 else 0.0,
        heads_mean=float(heads[top].mean()),
        mlps_mean=float(mlps[top].mean()),
        norm_mean=norm_mean,
        norm_share=_nanmean(share_of_direct(norm[top], unembed[top])),
        heads_share=_nanmean(share_of_direct(heads[top], unembed[top])),
        mlps_share=_nanmean(share_of_direct(mlps[top], unembed[top])),
        self_repair_share=_nanmean(share_of_direct(repair, unembed[top])),
        norm_of_direct=_ratio(norm_mean, un_mean),
        self_repair_fraction=_ratio(repair_mean, un_mean),
        self_repair_quantiles=_quantiles(repair),
    )
    return summary, top


def with_intervals(
    repairs: list[SelfRepair],
    tops: list[np.ndarray],
    columns: dict[str, np.ndarray],
    documents: np.ndarray,
    n_documents: int,
    seed: int,
) -> tuple[list[SelfRepair], list[SelfRepairLayer]]:
    """Bootstrap intervals, resampling whole documents (a document's pairs share its context, so they are not
    independent): each component's kept pairs stay fixed (the selection reads the clean run only) and a resample
    takes every kept pair of every drawn document. The same resamples give the per-layer trend's intervals, and the
    repaired fraction's (a ratio of the resample's means)."""
    k = len(repairs)
    repair_rows = [columns["direct"][c, top] - columns["total"][c, top] for c, top in enumerate(tops)]
    unembed_rows = [columns["unembed"][c, top] for c, top in enumerate(tops)]
    blocks = [
        repair_rows,
        [share_of_direct(columns["norm"][c, top], unembed_rows[c]) for c, top in enumerate(tops)],
        unembed_rows,
        [(repair > unembed).astype(np.float64) for repair, unembed in zip(repair_rows, unembed_rows, strict=True)],
    ]
    width = max(top.size for top in tops)

    def padded(rows: list[np.ndarray]) -> np.ndarray:
        out = np.full((len(rows), width), np.nan)
        for i, row in enumerate(rows):
            out[i, : row.size] = row
        return out

    clusters = np.zeros((len(blocks) * k, width), dtype=np.int64)
    for b in range(len(blocks)):
        for c, top in enumerate(tops):
            clusters[b * k + c, : top.size] = documents[top]
    means, intervals = cluster_mean_interval(
        np.vstack([padded(block) for block in blocks]), clusters, n_documents, seed
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(means[:, 2 * k : 3 * k] != 0, means[:, :k] / means[:, 2 * k : 3 * k], np.nan)
    fraction_intervals = [percentile_interval(fraction[:, c]) for c in range(k)]
    low = [None if interval is None else interval[0] for interval in intervals + fraction_intervals]
    high = [None if interval is None else interval[1] for interval in intervals + fraction_intervals]
    out = [
        replace(
            r,
            self_repair_ci_low=low[c],
            self_repair_ci_high=high[c],
            norm_share_ci_low=low[k + c],
            norm_share_ci_high=high[k + c],
            over_correction_share=float(blocks[3][c].mean()),
            over_correction_ci_low=low[3 * k + c],
            over_correction_ci_high=high[3 * k + c],
            self_repair_fraction_ci_low=low[4 * k + c],
            self_repair_fraction_ci_high=high[4 * k + c],
        )
        for c, r in enumerate(repairs)
    ]
    groups: dict[tuple[ComponentKind, int], list[int]] = {}
    for c, r in enumerate(repairs):
        groups.setdefault((r.kind, r.layer), []).append(c)
    layers = []
    for (kind, layer), members in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        interval = percentile_interval(means[:, members].mean(axis=1))
        layers.append(
            SelfRepairLayer(
                kind=kind,
                layer=layer,
                n_components=len(members),
                self_repair_mean=float(np.mean([repairs[c].self_repair_mean for c in members])),
                ci_low=None if interval is None else interval[0],
                ci_high=None if interval is None else interval[1],
            )
        )
    return out, layers


def summarise_positions(
    components: list[str], basis: list[str], prompts: Sequence[PromptResult], near_tie_gap: float, *, seed: int = 0
) -> Summary:
    """The per-position job's summary; `seed` seeds the bootstrap over documents."""
    c = len(components)
    total = _pairs(prompts, "total_effect", c)
    direct = _pairs(prompts, "direct_effect", c)
    compensation = _pairs(prompts, "compensation", c)
    unembed = _pairs(prompts, "unembed_effect", c)
    compensatory = _pairs(prompts, "compensatory_effect", c)
    heads = _pairs(prompts, "response_heads", c)
    mlps = _pairs(prompts, "response_mlps", c)
    norm = _pairs(prompts, "norm_response", c)
    has_ablated = all(p.positions is not None and p.positions.ablated_unembed_effect is not None for p in prompts)
    ablated_unembed = _pairs(prompts, "ablated_unembed_effect", c) if has_ablated else None
    clean_direct = _pairs(prompts, "clean_direct_effect", len(basis))
    gaps = _pairs(prompts, "top2_gap", 1)[0]
    full = all(p.positions is not None and p.positions.response is not None for p in prompts)
    response_matrix: list[list[float]] = []
    if full:
        response = torch.cat(
            [column(p.positions, "response", c * len(basis)) for p in prompts if p.positions is not None], dim=1
        )
        response_matrix = response.mean(dim=1).reshape(c, len(basis)).tolist()

    summaries = []
    for i, name in enumerate(components):
        de_mean, de_se = _mean_se(direct[i])
        te_mean, te_se = _mean_se(total[i])
        comp_mean, comp_se = _mean_se(compensation[i])
        un_mean, un_se = _mean_se(unembed[i])
        ce_mean, ce_se = _mean_se(compensatory[i])
        eff = efficacy(None if ablated_unembed is None else ablated_unembed[i].numpy(), un_mean, un_se)
        summaries.append(
            ComponentSummary(
                component=name,
                direct_effect_mean=de_mean,
                direct_effect_se=de_se,
                total_effect_mean=te_mean,
                total_effect_se=te_se,
                compensation_mean=comp_mean,
                compensation_se=comp_se,
                compensation_attn_mean=float(heads[i].mean()),
                compensation_mlp_mean=float(mlps[i].mean()),
                norm_response_mean=float(norm[i].mean()),
                compensation_vs_direct=regression(
                    direct[i].numpy(), compensation[i].numpy(), y_name="compensation", x_name="direct_effect"
                ),
                # Means over pairs like every other field here; the paper's fits (across prompts at the final
                # position) stay null for per-position jobs.
                unembed_effect_mean=un_mean,
                unembed_effect_se=un_se,
                compensatory_effect_mean=ce_mean,
                compensatory_effect_se=ce_se,
                ablated_unembed_effect_mean=eff.ablated_mean,
                ablated_unembed_effect_se=eff.ablated_se,
                unembed_removed_share=eff.removed_share,
                weak_ablation=eff.weak,
            )
        )
    arrays = {name: values.numpy() for name, values in
              (("unembed", unembed), ("direct", direct), ("total", total), ("norm", norm))}
    pieces = [
        self_repair(name, arrays["unembed"][i], arrays["direct"][i], arrays["total"][i], heads[i].numpy(),
                    mlps[i].numpy(), arrays["norm"][i])
        for i, name in enumerate(components)
    ]
    repairs, layers = with_intervals(
        [r for r, _ in pieces], [top for _, top in pieces], arrays, _documents(prompts), len(prompts), seed
    )
    return Summary(
        n_prompts=len(prompts),
        selection=Selection(only_correct=False, n_candidates=len(prompts), n_kept=len(prompts)),
        components=summaries,
        response_matrix=response_matrix,
        clean_direct_effect_mean=clean_direct.mean(dim=1).tolist(),
        total_vs_direct=regression(
            direct.mean(dim=1).numpy(), total.mean(dim=1).numpy(), y_name="total_effect.mean",
            x_name="direct_effect.mean",
        ),
        near_ties=int((gaps < near_tie_gap).sum()),
        n_pairs=int(direct.shape[1]),
        top_fraction=TOP_FRACTION,
        self_repair=repairs,
        self_repair_layers=layers,
        resampling=Resampling(unit="document", n_units=len(prompts), n_boot=N_BOOT, ci_level=CI_LEVEL, seed=seed),
        efficacy_threshold=EFFICACY_THRESHOLD,
    )
