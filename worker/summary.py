"""Per-job statistics over prompts: means, standard errors, the paper's regressions, the response matrix.

Every regression is labelled with what it regresses on what (`Regression.y` on `Regression.x`); the names are
PromptResult fields, `compensatory_effect.attn` / `.mlp` for CE's attention and MLP parts, and `response[d]` for one
downstream component's response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hydra_ablate_client.vocabulary import is_knockout_name
from hydra_ablate_client.wire import ComponentSummary, ErasureFit, Regression, Resampling, Selection, Summary
from worker.engine.types import SweepResult
from worker.fit_statistics import CI_LEVEL, N_BOOT, ols, pearson
from worker.paper_fits import draw_values, paper_fits


def regression(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, y_name: str, x_name: str
) -> Regression:
    """Least squares y ≈ slope·x + intercept, with R²; nulls when x has no spread."""
    line = ols(x, y)
    return Regression(y=y_name, x=x_name, slope=line.slope, intercept=line.intercept, r2=line.r2, n=line.n)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over prompts (axis 0)."""
    n = values.shape[0]
    mean = float(values.mean())
    se = float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return mean, se


def _field(prompts: Sequence[object], name: str) -> np.ndarray:
    return np.asarray([getattr(p, name) for p in prompts], dtype=np.float64)


# Ablation efficacy (docs/concepts/definitions.md, "Ablation efficacy"). An ablation is flagged weak where it removed
# less than half of the component's mean write onto the target; the share is left null where that mean write is too
# small for a ratio to mean anything: below EFFICACY_MIN_UNEMBED, or within EFFICACY_MIN_SE standard errors of 0.
EFFICACY_THRESHOLD = 0.5
EFFICACY_MIN_UNEMBED = 1e-3
EFFICACY_MIN_SE = 2.0


@dataclass(frozen=True)
class Efficacy:
    ablated_mean: float | None
    ablated_se: float | None
    removed_share: float | None
    weak: bool | None


def efficacy(ablated: np.ndarray | None, unembed_mean: float, unembed_se: float = 0.0) -> Efficacy:
    """Mean (and SE) of Δ̃unembed(k, k) over prompts, the share of mean Δunembed the ablation removed,
    1 − mean Δ̃unembed(k, k) / mean Δunembed, and whether it is below EFFICACY_THRESHOLD (share and flag null where
    mean Δunembed is not clearly away from 0)."""
    if ablated is None or ablated.size == 0 or not np.all(np.isfinite(ablated)):
        return Efficacy(None, None, None, None)
    n = ablated.size
    mean = float(ablated.mean())
    se = float(ablated.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    if abs(unembed_mean) < max(EFFICACY_MIN_UNEMBED, EFFICACY_MIN_SE * unembed_se):
        return Efficacy(mean, se, None, None)
    share = 1.0 - mean / unembed_mean
    return Efficacy(mean, se, share, share < EFFICACY_THRESHOLD)


def _optional_field(prompts: Sequence[object], name: str) -> np.ndarray | None:
    """A per-component field that results from before it existed lack (None there): None unless every prompt has it."""
    values = [getattr(p, name, None) for p in prompts]
    if any(v is None or len(v) == 0 for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def summarise(
    result: SweepResult,
    near_tie_gap: float,
    *,
    seed: int = 0,
    n_candidates: int | None = None,
    only_correct: bool = False,
    relations: Sequence[str] | None = None,
) -> Summary:
    """The job's summary. `relations`, one per measured prompt (in result order), makes the fits' bootstrap
    resample whole relations; without them prompts are resampled one by one."""
    prompts = result.prompts
    if not prompts:
        raise ValueError("no prompt to summarise: only_correct kept none of the job's prompts")
    total = _field(prompts, "total_effect")  # (P, C)
    direct = _field(prompts, "direct_effect")
    compensation = _field(prompts, "compensation")
    norm = _field(prompts, "norm_response")
    unembed = _field(prompts, "unembed_effect")
    ce = _field(prompts, "compensatory_effect")
    ablated_unembed = _optional_field(prompts, "ablated_unembed_effect")
    response = _field(prompts, "response")  # (P, C, R)
    clean_direct = _field(prompts, "clean_direct_effect")  # (P, R)
    is_attn = np.array([name.startswith(("attn.", "head.")) for name in result.response_basis])  # either basis
    ce_attn = response[:, :, is_attn].sum(axis=-1)
    ce_mlp = response[:, :, ~is_attn].sum(axis=-1)
    if relations is not None and len(relations) != len(prompts):
        raise ValueError(f"{len(relations)} relations for {len(prompts)} prompts")
    values = draw_values(prompts, unembed, direct, ce, ce_attn, ce_mlp)
    fits = paper_fits(values, relations, seed)
    n_draws = values["unembed_effect"].shape[0]
    seeds = [d.seed for d in prompts[0].draws] if n_draws > 1 and prompts[0].draws else None

    components = []
    for c, name in enumerate(result.components):
        de_mean, de_se = _mean_se(direct[:, c])
        te_mean, te_se = _mean_se(total[:, c])
        comp_mean, comp_se = _mean_se(compensation[:, c])
        un_mean, un_se = _mean_se(unembed[:, c])
        ce_mean, ce_se = _mean_se(ce[:, c])
        eff = efficacy(None if ablated_unembed is None else ablated_unembed[:, c], un_mean, un_se)
        components.append(
            ComponentSummary(
                component=name,
                direct_effect_mean=de_mean,
                direct_effect_se=de_se,
                total_effect_mean=te_mean,
                total_effect_se=te_se,
                compensation_mean=comp_mean,
                compensation_se=comp_se,
                compensation_attn_mean=float(ce_attn[:, c].mean()),
                compensation_mlp_mean=float(ce_mlp[:, c].mean()),
                norm_response_mean=float(norm[:, c].mean()),
                compensation_vs_direct=regression(
                    direct[:, c], compensation[:, c], y_name="compensation", x_name="direct_effect"
                ),
                unembed_effect_mean=un_mean,
                unembed_effect_se=un_se,
                compensatory_effect_mean=ce_mean,
                compensatory_effect_se=ce_se,
                ce_vs_unembed=fits[c]["ce_vs_unembed"],
                ce_vs_direct=fits[c]["ce_vs_direct"],
                ce_attn_vs_unembed=fits[c]["ce_attn_vs_unembed"],
                ce_mlp_vs_unembed=fits[c]["ce_mlp_vs_unembed"],
                ce_attn_vs_direct=fits[c]["ce_attn_vs_direct"],
                ce_mlp_vs_direct=fits[c]["ce_mlp_vs_direct"],
                unembed_drop_correlation=pearson(unembed[:, c], total[:, c]),
                unembed_exceeds_drop_share=float((unembed[:, c] > total[:, c]).mean()),
                ablated_unembed_effect_mean=eff.ablated_mean,
                ablated_unembed_effect_se=eff.ablated_se,
                unembed_removed_share=eff.removed_share,
                weak_ablation=eff.weak,
            )
        )
    return Summary(
        n_prompts=len(prompts),
        selection=Selection(
            only_correct=only_correct,
            n_candidates=len(prompts) if n_candidates is None else n_candidates,
            n_kept=len(prompts),
        ),
        components=components,
        response_matrix=response.mean(axis=0).tolist(),
        clean_direct_effect_mean=clean_direct.mean(axis=0).tolist(),
        total_vs_direct=_total_vs_direct(result.components, direct, total),
        near_ties=sum(1 for p in prompts if p.top2_gap < near_tie_gap),
        erasure=_erasure(result, unembed, response, clean_direct),
        resampling=Resampling(
            unit="prompt" if relations is None else "relation",
            n_units=fits[0]["ce_vs_unembed"].n_clusters if fits else len(prompts),
            n_boot=N_BOOT,
            ci_level=CI_LEVEL,
            seed=seed,
        ),
        source_seeds=seeds,
        efficacy_threshold=EFFICACY_THRESHOLD,
    )


def _total_vs_direct(names: list[str], direct: np.ndarray, total: np.ndarray) -> Regression:
    """Mean TE on mean DE across the single components: knockout sets ablate several at once, so their points
    belong to another population (they are the fit's only points when the job has nothing else)."""
    single = [c for c, name in enumerate(names) if not is_knockout_name(name)] or list(range(len(names)))
    return regression(
        direct.mean(axis=0)[single], total.mean(axis=0)[single], y_name="total_effect.mean",
        x_name="direct_effect.mean",
    )


def _erasure(
    result: SweepResult, unembed: np.ndarray, response: np.ndarray, clean_direct: np.ndarray
) -> list[ErasureFit]:
    """For every ablated attention layer, each MLP at or after its layer: that MLP's response on the layer's
    Δunembed across prompts (the paper's erasure: late MLPs erase less when a layer promoting the target is gone)."""
    fits = []
    for c, name in enumerate(result.components):
        if not name.startswith("attn.") or is_knockout_name(name):
            continue  # a knockout set has no one layer whose Δunembed the MLPs' erasure could be regressed on
        layer = int(name.split(".")[1])
        for d, other in enumerate(result.response_basis):
            if not other.startswith("mlp.") or int(other.split(".")[1]) < layer:
                continue
            fits.append(
                ErasureFit(
                    ablated=name,
                    mlp=other,
                    clean_direct_effect_mean=float(clean_direct[:, d].mean()),
                    response_mean=float(response[:, c, d].mean()),
                    fit=regression(unembed[:, c], response[:, c, d], y_name=f"response[{other}]",
                                   x_name="unembed_effect"),
                )
            )
    return fits
