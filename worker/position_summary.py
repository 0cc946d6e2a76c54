"""Per-job statistics of a per-position job: over (prompt, position) pairs, and self-repair over each component's
top pairs by direct effect (Rushing & Nanda 2024; docs/concepts/definitions.md, "Every position")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hydra_ablate_client.wire import (
    ComponentSummary,
    PositionColumns,
    PromptResult,
    Quantiles,
    Selection,
    SelfRepair,
    Summary,
)
from worker.summary import regression

TOP_FRACTION = 0.02  # the paper's top 2% of (position, token) pairs by direct effect


def column(columns: PositionColumns, name: str, rows: int) -> torch.Tensor:
    """One stored array as (rows, P) float64 (rows = components, basis entries, or 1)."""
    raw = getattr(columns, name)
    values = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    return torch.from_numpy(values).reshape(rows, -1)


def _pairs(prompts: Sequence[PromptResult], name: str, rows: int) -> torch.Tensor:
    """(rows, pairs): a column over every (prompt, position) pair, prompt-major."""
    return torch.cat([column(p.positions, name, rows) for p in prompts if p.positions is not None], dim=1)


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean())
    return mean, (float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0)


def _quantiles(values: torch.Tensor) -> Quantiles:
    q = torch.quantile(values, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=values.dtype)).tolist()
    return Quantiles(p05=q[0], p25=q[1], p50=q[2], p75=q[3], p95=q[4])


def self_repair(
    name: str, direct: torch.Tensor, total: torch.Tensor, heads: torch.Tensor, mlps: torch.Tensor, norm: torch.Tensor,
    top_fraction: float = TOP_FRACTION,
) -> SelfRepair:
    """Self-repair of one component over its top `top_fraction` pairs by DE (1-D tensors over pairs)."""
    k = max(1, math.ceil(top_fraction * direct.numel()))
    top = torch.topk(direct, k).indices
    repair = direct[top] - total[top]
    de_mean, repair_mean = float(direct[top].mean()), float(repair.mean())
    norm_mean = float(norm[top].mean())
    return SelfRepair(
        component=name,
        n_pairs=k,
        direct_effect_threshold=float(direct[top].min()),
        direct_effect_mean=de_mean,
        total_effect_mean=float(total[top].mean()),
        self_repair_mean=repair_mean,
        self_repair_se=_mean_se(repair)[1],
        heads_mean=float(heads[top].mean()),
        mlps_mean=float(mlps[top].mean()),
        norm_mean=norm_mean,
        norm_share=norm_mean / repair_mean if repair_mean != 0 else None,
        self_repair_fraction=repair_mean / de_mean if de_mean != 0 else None,
        self_repair_quantiles=_quantiles(repair),
    )


def summarise_positions(
    components: list[str], basis: list[str], prompts: Sequence[PromptResult], near_tie_gap: float
) -> Summary:
    c = len(components)
    total = _pairs(prompts, "total_effect", c)
    direct = _pairs(prompts, "direct_effect", c)
    compensation = _pairs(prompts, "compensation", c)
    unembed = _pairs(prompts, "unembed_effect", c)
    compensatory = _pairs(prompts, "compensatory_effect", c)
    heads = _pairs(prompts, "response_heads", c)
    mlps = _pairs(prompts, "response_mlps", c)
    norm = _pairs(prompts, "norm_response", c)
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
            )
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
        self_repair=[
            self_repair(name, direct[i], total[i], heads[i], mlps[i], norm[i]) for i, name in enumerate(components)
        ],
    )
