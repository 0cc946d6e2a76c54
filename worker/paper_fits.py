"""The Hydra paper's regressions across prompts (Fig. 7 and 8), with the statistics a reviewer asks for.

For every ablated component and every pair (y, x) of FITS: the least-squares line (with several source draws, the
mean over draws of each draw's line), bootstrap intervals of slope and R² that resample prompts (or whole dataset
relations) and redraw the sources, and, for the fits on the paper's x (Δunembed), a permutation p-value of the
slope with Δunembed shuffled across prompts and Holm's adjustment of those p-values over the job's components.
docs/definitions.md ("Per job") defines each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hydra_ablate_client.vocabulary import BootstrapUnit
from hydra_ablate_client.wire import Fit
from worker.fit_statistics import (
    CI_LEVEL,
    N_BOOT,
    bootstrap_fits,
    bootstrap_weights,
    cluster_ids,
    excludes,
    holm,
    inside,
    n_permutations,
    ols,
    percentile_interval,
    permutation_p,
    permutation_slopes,
    permutations,
)

# (ComponentSummary field, y, x); y and x name PromptResult fields, `.attn` / `.mlp` CE's parts.
FITS: tuple[tuple[str, str, str], ...] = (
    ("ce_vs_unembed", "compensatory_effect", "unembed_effect"),
    ("ce_vs_direct", "compensatory_effect", "direct_effect"),
    ("ce_attn_vs_unembed", "compensatory_effect.attn", "unembed_effect"),
    ("ce_mlp_vs_unembed", "compensatory_effect.mlp", "unembed_effect"),
    ("ce_attn_vs_direct", "compensatory_effect.attn", "direct_effect"),
    ("ce_mlp_vs_direct", "compensatory_effect.mlp", "direct_effect"),
)
# The permutation null shuffles the paper's x, Δunembed, which is the same in every source draw; DE changes with the
# draw, so the fits on DE get no permutation p-value.
PERMUTED_X = "unembed_effect"


def draw_values(
    prompts: Sequence[object], unembed: np.ndarray, direct: np.ndarray, ce: np.ndarray, ce_attn: np.ndarray,
    ce_mlp: np.ndarray,
) -> dict[str, np.ndarray]:
    """(S, n, C) per regressed quantity: each source draw's values (PromptResult.draws), or the prompts' own values
    as the one draw when there are no separate draws. Δunembed is the clean write: the same in every draw."""
    draws = [getattr(p, "draws", None) for p in prompts]
    if any(d is None for d in draws):
        values = {"direct_effect": direct, "compensatory_effect": ce, "compensatory_effect.attn": ce_attn,
                  "compensatory_effect.mlp": ce_mlp}
        stacked = {name: v[None] for name, v in values.items()}
    else:
        fields = {"direct_effect": "direct_effect", "compensatory_effect": "compensatory_effect",
                  "compensatory_effect.attn": "compensatory_effect_attn",
                  "compensatory_effect.mlp": "compensatory_effect_mlp"}
        stacked = {
            name: np.asarray([[getattr(d, f) for d in prompt_draws] for prompt_draws in draws],  # type: ignore[union-attr]
                             dtype=np.float64).transpose(1, 0, 2)
            for name, f in fields.items()
        }
    n_draws = stacked["direct_effect"].shape[0]
    stacked["unembed_effect"] = np.broadcast_to(unembed[None], (n_draws, *unembed.shape))
    return stacked


def paper_fits(
    values: dict[str, np.ndarray], relations: Sequence[str] | None, seed: int, n_boot: int = N_BOOT
) -> list[dict[str, Fit]]:
    """Per component (in order), its Fit for every entry of FITS. `values` from draw_values; `relations` one label
    per prompt (the bootstrap then resamples whole relations) or None (prompts resampled one by one)."""
    n_draws, n, n_components = values["unembed_effect"].shape
    unit: BootstrapUnit = "prompt" if relations is None else "relation"
    clusters = np.arange(n) if relations is None else cluster_ids(relations)
    n_clusters = int(clusters.max()) + 1 if n else 0

    def pick(name: str, c: int) -> np.ndarray:
        return np.asarray(values[name][:, :, c], dtype=np.float64)  # (S, n)

    order = [(f, c) for f in range(len(FITS)) for c in range(n_components)]
    xs = np.stack([pick(FITS[f][2], c) for f, c in order])
    ys = np.stack([pick(FITS[f][1], c) for f, c in order])
    boot_slope, boot_r2 = bootstrap_fits(bootstrap_weights(clusters, n_draws, seed, n_boot), xs, ys)

    n_perm = n_permutations(n_components)
    orders = permutations(n, n_perm, seed)
    p_values: dict[tuple[int, int], float | None] = {}
    permuted = [f for f, (_, _, x) in enumerate(FITS) if x == PERMUTED_X]
    for c in range(n_components):
        observed, null = permutation_slopes(pick(PERMUTED_X, c), np.stack([pick(FITS[f][1], c) for f in permuted]),
                                            orders)
        for k, f in enumerate(permuted):
            p_values[(f, c)] = permutation_p(float(observed[k]), null[:, k])
    adjusted: dict[tuple[int, int], float | None] = {}
    for f in permuted:
        family = holm([p_values[(f, c)] for c in range(n_components)])
        adjusted.update({(f, c): family[c] for c in range(n_components)})

    out: list[dict[str, Fit]] = [{} for _ in range(n_components)]
    for column, (f, c) in enumerate(order):
        name, y_name, x_name = FITS[f]
        lines = [ols(xs[column, s], ys[column, s]) for s in range(n_draws)]
        slope = _mean([line.slope for line in lines])
        r2 = _mean([line.r2 for line in lines])
        slope_ci = percentile_interval(boot_slope[:, column]) if slope is not None else None
        r2_ci = percentile_interval(boot_r2[:, column]) if r2 is not None else None
        out[c][name] = Fit(
            y=y_name,
            x=x_name,
            slope=slope,
            intercept=_mean([line.intercept for line in lines]),
            r2=r2,
            n=n,
            slope_ci_low=None if slope_ci is None else slope_ci[0],
            slope_ci_high=None if slope_ci is None else slope_ci[1],
            ci_level=CI_LEVEL,
            n_boot=n_boot,
            excludes_zero=excludes(slope_ci, 0.0),
            excludes_one=excludes(slope_ci, 1.0),
            slope_in_unit_interval=inside(slope_ci, 0.0, 1.0),
            r2_ci_low=None if r2_ci is None else r2_ci[0],
            r2_ci_high=None if r2_ci is None else r2_ci[1],
            bootstrap_unit=unit,
            n_clusters=n_clusters,
            n_draws=n_draws,
            draw_slopes=[line.slope for line in lines] if n_draws > 1 else None,
            draw_r2=[line.r2 for line in lines] if n_draws > 1 else None,
            permutation_p=p_values.get((f, c)),
            permutation_p_holm=adjusted.get((f, c)),
            n_permutations=n_perm if f in permuted else 0,
            permutation_seed=seed if f in permuted else None,
        )
    return out


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None if any value is undefined."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(np.asarray(values, dtype=np.float64)))
