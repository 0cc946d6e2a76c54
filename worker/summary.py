"""Per-job statistics over prompts: means, standard errors, regressions, the response matrix."""

from __future__ import annotations

import math

import torch

from service.schemas import ComponentSummary, Regression, Summary
from worker.engine.types import SweepResult


def regression(x: torch.Tensor, y: torch.Tensor) -> Regression:
    """Least squares y ≈ slope·x + intercept, with R²; nulls when x has no spread."""
    n = int(x.numel())
    x, y = x.double(), y.double()
    if n < 2:
        return Regression(slope=None, intercept=None, r2=None, n=n)
    dx, dy = x - x.mean(), y - y.mean()
    sxx = float((dx * dx).sum())
    if sxx <= 1e-18:
        return Regression(slope=None, intercept=None, r2=None, n=n)
    slope = float((dx * dy).sum()) / sxx
    intercept = float(y.mean()) - slope * float(x.mean())
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    total = float((dy * dy).sum())
    r2 = 1.0 - residual / total if total > 1e-18 else None
    return Regression(slope=slope, intercept=intercept, r2=r2, n=n)


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over prompts (dimension 0)."""
    n = values.shape[0]
    mean = float(values.mean())
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return mean, se


def summarise(result: SweepResult, near_tie_gap: float) -> Summary:
    prompts = result.prompts
    total = torch.tensor([p.total_effect for p in prompts], dtype=torch.float64)  # (P, C)
    direct = torch.tensor([p.direct_effect for p in prompts], dtype=torch.float64)
    compensation = torch.tensor([p.compensation for p in prompts], dtype=torch.float64)
    norm = torch.tensor([p.norm_response for p in prompts], dtype=torch.float64)
    response = torch.tensor([p.response for p in prompts], dtype=torch.float64)  # (P, C, R)
    clean_direct = torch.tensor([p.clean_direct_effect for p in prompts], dtype=torch.float64)  # (P, R)
    is_attn = torch.tensor([name.startswith("attn.") for name in result.response_basis])

    components = []
    for c, name in enumerate(result.components):
        de_mean, de_se = _mean_se(direct[:, c])
        te_mean, te_se = _mean_se(total[:, c])
        comp_mean, comp_se = _mean_se(compensation[:, c])
        components.append(
            ComponentSummary(
                component=name,
                direct_effect_mean=de_mean,
                direct_effect_se=de_se,
                total_effect_mean=te_mean,
                total_effect_se=te_se,
                compensation_mean=comp_mean,
                compensation_se=comp_se,
                compensation_attn_mean=float(response[:, c, is_attn].sum(dim=-1).mean()),
                compensation_mlp_mean=float(response[:, c, ~is_attn].sum(dim=-1).mean()),
                norm_response_mean=float(norm[:, c].mean()),
                compensation_vs_direct=regression(direct[:, c], compensation[:, c]),
            )
        )
    return Summary(
        n_prompts=len(prompts),
        components=components,
        response_matrix=response.mean(dim=0).tolist(),
        clean_direct_effect_mean=clean_direct.mean(dim=0).tolist(),
        total_vs_direct=regression(direct.mean(dim=0), total.mean(dim=0)),
        near_ties=sum(1 for p in prompts if p.top2_gap < near_tie_gap),
    )
