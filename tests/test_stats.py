"""The statistics helpers (worker/fit_statistics.py) and the summary's use of them (worker/paper_fits.py,
worker/summary.py), against references computed here without them: np.polyfit and np.corrcoef on explicitly built
resamples, every permutation of a tiny set enumerated, Holm's procedure worked by hand, np.percentile."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tests.checks import present
from worker.engine.types import DrawMeasures, PromptMeasures, SweepResult
from worker.fit_statistics import (
    bootstrap_fits,
    bootstrap_weights,
    cluster_ids,
    cluster_mean_interval,
    excludes,
    holm,
    inside,
    n_permutations,
    ols,
    pearson,
    percentile_interval,
    permutation_p,
    permutation_slopes,
    permutations,
)
from worker.summary import summarise


def _noisy_line(n: int = 200, slope: float = 0.7, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, slope * x + 0.25 + rng.normal(scale=0.3, size=n)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and R² of the OLS line, by numpy's own routines."""
    return float(np.polyfit(x, y, 1)[0]), float(np.corrcoef(x, y)[0, 1] ** 2)


def test_ols_exact_line() -> None:
    line = ols([0, 1, 2, 3], [1, 3, 5, 7])
    assert (line.slope, line.intercept, line.r2, line.n) == (2.0, 1.0, 1.0, 4)


def test_ols_matches_numpy_polyfit_and_corrcoef() -> None:
    x, y = _noisy_line()
    line = ols(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert line.slope == pytest.approx(slope, abs=1e-12)
    assert line.intercept == pytest.approx(intercept, abs=1e-12)
    assert line.r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=1e-12)  # simple regression: R² = r²


def test_undefined_statistics_are_none() -> None:
    assert ols([1.0], [2.0]).slope is None
    assert ols([1, 1, 1], [1, 2, 3]).slope is None  # no spread in x
    assert ols([1, 2, 3], [5, 5, 5]).r2 is None and ols([1, 2, 3], [5, 5, 5]).slope == 0.0
    assert pearson([1, 2], [3, 3]) is None and pearson([1], [1]) is None
    assert percentile_interval(np.empty(0)) is None and percentile_interval(np.array([np.nan])) is None
    assert excludes(None, 0.0) is None and inside(None, 0.0, 1.0) is None
    assert permutation_p(math.nan, np.zeros(3)) is None


def test_pearson_matches_numpy() -> None:
    x, y = _noisy_line()
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson(x, -y) == pytest.approx(-np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_the_unit_interval_criterion_needs_both_bounds() -> None:
    assert inside((0.2, 0.8), 0.0, 1.0) is True
    assert inside((-0.1, 0.8), 0.0, 1.0) is False  # a one-sided "below 1" would pass this: no repair is possible
    assert inside((0.2, 1.3), 0.0, 1.0) is False
    assert inside((0.0, 0.5), 0.0, 1.0) is False  # open interval: a bound on 0 is not inside


def test_prompt_bootstrap_matches_an_explicit_loop() -> None:
    """One cluster per prompt: the same seeded draws as indices, each resample refitted with np.polyfit."""
    x, y = _noisy_line(n=60)
    weights = bootstrap_weights(np.arange(x.size), 1, seed=11, n_boot=300)
    slopes, r2 = bootstrap_fits(weights, x[None, None], y[None, None])
    index = np.random.default_rng(11).integers(0, x.size, size=(300, x.size))
    expected = np.array([_fit(x[row], y[row]) for row in index])
    np.testing.assert_allclose(slopes[:, 0], expected[:, 0], atol=1e-10)
    np.testing.assert_allclose(r2[:, 0], expected[:, 1], atol=1e-10)
    low, high = present(percentile_interval(slopes[:, 0]))
    assert (low, high) == pytest.approx(tuple(np.percentile(expected[:, 0], [2.5, 97.5])), abs=1e-10)
    again = bootstrap_fits(bootstrap_weights(np.arange(x.size), 1, seed=11, n_boot=300), x[None, None], y[None, None])
    assert np.array_equal(again[0], slopes)  # seeded: reproducible


def test_relation_bootstrap_resamples_whole_clusters() -> None:
    """Clusters of unequal size: each resample is every prompt of G clusters drawn with replacement, refitted."""
    rng = np.random.default_rng(5)
    labels = [f"P{int(g)}" for g in rng.integers(0, 7, size=50)]
    x, y = _noisy_line(n=50, seed=6)
    ids = cluster_ids(labels)
    assert ids.max() == len(set(labels)) - 1 and labels.index(labels[10]) == list(ids).index(ids[10])
    slopes, r2 = bootstrap_fits(bootstrap_weights(ids, 1, seed=2, n_boot=200), x[None, None], y[None, None])
    members = [np.flatnonzero(ids == g) for g in range(ids.max() + 1)]
    picks = np.random.default_rng(2).integers(0, len(members), size=(200, len(members)))
    for b, row in enumerate(picks):
        chosen = np.concatenate([members[g] for g in row])
        slope, fit_r2 = _fit(x[chosen], y[chosen])
        assert slopes[b, 0] == pytest.approx(slope, abs=1e-10) and r2[b, 0] == pytest.approx(fit_r2, abs=1e-10)


def test_draws_are_redrawn_within_each_resampled_prompt() -> None:
    """With S draws, every occurrence of a prompt in a resample takes one draw: the counts over draws add up to
    the cluster counts, every draw is used about equally, and the weighted fit equals the fit of the resample
    written out point by point."""
    n, draws = 40, 4
    rng = np.random.default_rng(8)
    x = np.broadcast_to(rng.normal(size=n), (draws, n))  # Δunembed: the same in every draw
    y = 0.6 * x + rng.normal(scale=0.5, size=(draws, n))  # CE: each draw its own sources
    labels = np.repeat(np.arange(10), 4)
    weights = bootstrap_weights(labels, draws, seed=3, n_boot=400)
    assert weights.shape == (400, draws, n)
    picks = np.random.default_rng(3).integers(0, 10, size=(400, 10))
    cluster_counts = np.stack([np.bincount(row, minlength=10) for row in picks])
    np.testing.assert_array_equal(weights.sum(axis=1), cluster_counts[:, labels])
    shares = weights.sum(axis=(0, 2)) / weights.sum()
    assert np.all(np.abs(shares - 1 / draws) < 0.01)
    slopes, r2 = bootstrap_fits(weights, x[None], y[None])
    for b in range(0, 400, 37):
        repeat = weights[b].astype(int).ravel()
        slope, fit_r2 = _fit(np.repeat(x.ravel(), repeat), np.repeat(y.ravel(), repeat))
        assert slopes[b, 0] == pytest.approx(slope, abs=1e-10) and r2[b, 0] == pytest.approx(fit_r2, abs=1e-10)


def test_bootstrap_interval_covers_the_true_slope() -> None:
    x, y = _noisy_line(n=400, slope=0.7)
    slopes, _ = bootstrap_fits(bootstrap_weights(np.arange(x.size), 1, seed=0), x[None, None], y[None, None])
    interval = percentile_interval(slopes[:, 0])
    assert interval is not None and interval[0] < 0.7 < interval[1]
    assert excludes(interval, 0.0) is True and excludes(interval, 1.0) is True and inside(interval, 0, 1) is True
    assert excludes(interval, 0.7) is False


def test_permutation_null_by_exact_enumeration() -> None:
    """Six prompts, all 720 orderings: the null slopes are np.polyfit's on each reordering of x, and the p-value is
    the share of orderings (the identity included) at least as extreme, by a direct count."""
    x = np.array([0.3, -1.2, 0.8, 2.0, -0.4, 1.1])
    y = np.array([0.5, -0.7, 0.2, 1.6, 0.1, 0.4])
    everything = np.array(list(itertools.permutations(range(6))))
    observed, null = permutation_slopes(x[None], y[None, None], everything)
    expected = np.array([np.polyfit(x[order], y, 1)[0] for order in everything])
    np.testing.assert_allclose(null[:, 0], expected, atol=1e-12)
    assert observed[0] == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-12)
    exact = np.mean(np.abs(expected) >= abs(np.polyfit(x, y, 1)[0]) - 1e-12)  # the identity is one of them
    # The helper's (1 + count) / (N + 1) over the 719 other orderings is the exact p-value.
    others = everything[1:]
    _, null_others = permutation_slopes(x[None], y[None, None], others)
    assert permutation_p(float(observed[0]), null_others[:, 0]) == pytest.approx(exact, abs=1e-12)
    # Random orderings (seeded) estimate it within sampling error.
    _, sampled = permutation_slopes(x[None], y[None, None], permutations(6, 20_000, seed=1))
    estimate = present(permutation_p(float(observed[0]), sampled[:, 0]))
    assert abs(estimate - exact) < 4 * math.sqrt(exact * (1 - exact) / 20_000)


def test_permutation_statistic_with_several_draws_is_the_mean_of_the_draws_slopes() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 12))  # DE: differs between draws
    y = rng.normal(size=(2, 3, 12)) + 0.4 * x
    orders = permutations(12, 50, seed=9)
    observed, null = permutation_slopes(x, y, orders)
    for k in range(2):
        assert observed[k] == pytest.approx(np.mean([np.polyfit(x[s], y[k, s], 1)[0] for s in range(3)]), abs=1e-12)
        for p in (0, 17, 49):
            by_hand = np.mean([np.polyfit(x[s][orders[p]], y[k, s], 1)[0] for s in range(3)])
            assert null[p, k] == pytest.approx(by_hand, abs=1e-12)
    assert permutation_p(2.0, np.array([-3.0, 1.0, 2.0, -0.5])) == pytest.approx(3 / 5)  # |−3| and the tie 2


def test_holm_by_hand() -> None:
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max(0.06, 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.6]) == [1.0, None, 1.0]  # m counts defined p-values; capped at 1
    assert holm([None]) == [None] and holm([]) == []


def test_permutations_suffice_for_holm() -> None:
    assert n_permutations(1) == 1999 and n_permutations(36) == 1999
    for m in (60, 270):
        assert 1 / (n_permutations(m) + 1) <= 0.05 / m / 2  # the smallest p-value survives Holm's first step
    orders = permutations(30, 5, seed=0)
    assert all(sorted(row) == list(range(30)) for row in orders)
    assert np.array_equal(orders, permutations(30, 5, seed=0)) and not np.array_equal(orders, permutations(30, 5, 1))


def test_cluster_mean_interval_matches_an_explicit_loop() -> None:
    rng = np.random.default_rng(12)
    values = rng.normal(size=(2, 9))
    values[1, 7:] = np.nan  # the second set has 7 items
    clusters = rng.integers(0, 4, size=(2, 9))
    means, intervals = cluster_mean_interval(values, clusters, 4, seed=3, n_boot=100)
    picks = np.random.default_rng(3).integers(0, 4, size=(100, 4))
    for b, row in enumerate(picks):
        for k in range(2):
            items = [values[k, i] for g in row for i in range(9) if clusters[k, i] == g and not np.isnan(values[k, i])]
            assert (np.isnan(means[b, k]) and not items) or means[b, k] == pytest.approx(np.mean(items), abs=1e-12)
    assert intervals[0] == percentile_interval(means[:, 0])


def _prompt(te: float, de: float, un: float, response: list[float], index: int,
            draws: list[DrawMeasures] | None = None) -> PromptMeasures:
    ce = sum(response)
    return PromptMeasures(
        target_id=1, clean_metric=0.0, top2_gap=1.0, total_effect=[te], direct_effect=[de],
        compensation=[de - te], response=[response], norm_response=[de - te - ce],
        clean_direct_effect=[un, -0.5, 0.1, -0.2], unembed_effect=[un], compensatory_effect=[ce], index=index,
        draws=draws,
    )


BASIS = ["attn.0", "mlp.0", "attn.1", "mlp.1"]


def test_summary_fits_are_the_paper_regressions_on_the_right_axes() -> None:
    """CE on Δunembed, CE on DE and CE's parts, each labelled; Fig. 2 correlation and share; erasure fits."""
    rng = np.random.default_rng(1)
    n = 80
    un = rng.normal(1.0, 0.5, n)
    de = un + rng.normal(0, 0.4, n)  # DE differs from Δunembed (sources that also write onto the target)
    attn_part = 0.5 * un + rng.normal(0, 0.1, n)
    mlp_part = 0.2 * un + rng.normal(0, 0.1, n)
    te = de - attn_part - mlp_part
    prompts = [_prompt(te[i], de[i], un[i], [0.0, mlp_part[i], attn_part[i], 0.0], i) for i in range(n)]
    result = SweepResult(components=["attn.0"], response_basis=BASIS, prompts=prompts)
    summary = summarise(result, 1e-4, seed=4, n_candidates=100, only_correct=True)
    c = summary.components[0]
    ce = attn_part + mlp_part
    index = np.random.default_rng(4).integers(0, n, size=(1000, n))  # the prompt bootstrap's draws
    for fit, x, y, names in (
        (c.ce_vs_unembed, un, ce, ("compensatory_effect", "unembed_effect")),
        (c.ce_vs_direct, de, ce, ("compensatory_effect", "direct_effect")),
        (c.ce_attn_vs_unembed, un, attn_part, ("compensatory_effect.attn", "unembed_effect")),
        (c.ce_mlp_vs_unembed, un, mlp_part, ("compensatory_effect.mlp", "unembed_effect")),
    ):
        assert fit is not None
        assert (fit.y, fit.x) == names
        slope, intercept = np.polyfit(x, y, 1)
        assert fit.slope == pytest.approx(slope, abs=1e-9) and fit.intercept == pytest.approx(intercept, abs=1e-9)
        assert fit.r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=1e-9)
        boot = np.array([_fit(x[row], y[row]) for row in index])
        assert (fit.slope_ci_low, fit.slope_ci_high) == pytest.approx(np.percentile(boot[:, 0], [2.5, 97.5]), abs=1e-9)
        assert (fit.r2_ci_low, fit.r2_ci_high) == pytest.approx(np.percentile(boot[:, 1], [2.5, 97.5]), abs=1e-9)
        assert fit.n_boot == 1000 and fit.ci_level == 0.95 and fit.bootstrap_unit == "prompt" and fit.n_clusters == n
        assert fit.n_draws == 1 and fit.draw_slopes is None
        if fit.x == "direct_effect":  # the permutation null shuffles the paper's x only
            assert (fit.permutation_p, fit.permutation_p_holm, fit.n_permutations) == (None, None, 0)
            continue
        assert fit.n_permutations == 1999 and fit.permutation_seed == 4
        assert present(fit.permutation_p) == pytest.approx(1 / 2000)  # a strong relation: no permutation reaches it
        assert fit.permutation_p_holm == fit.permutation_p  # one component: Holm changes nothing
    fit = present(c.ce_vs_unembed)
    assert fit.excludes_zero and fit.excludes_one and fit.slope_in_unit_interval  # slope ≈ 0.7
    assert c.unembed_drop_correlation == pytest.approx(np.corrcoef(un, te)[0, 1], abs=1e-12)
    assert c.unembed_exceeds_drop_share == pytest.approx(float(np.mean(un > te)))
    assert (summary.selection.n_candidates, summary.selection.n_kept, summary.selection.only_correct) == (100, n, True)
    erasure = {(e.ablated, e.mlp): e for e in present(summary.erasure)}
    assert set(erasure) == {("attn.0", "mlp.0"), ("attn.0", "mlp.1")}
    assert erasure[("attn.0", "mlp.0")].fit.slope == pytest.approx(np.polyfit(un, mlp_part, 1)[0], abs=1e-9)
    assert erasure[("attn.0", "mlp.0")].clean_direct_effect_mean == -0.5
    assert c.compensation_vs_direct.y == "compensation" and c.compensation_vs_direct.x == "direct_effect"
    assert present(summary.resampling).unit == "prompt" and summary.source_seeds is None
    again = summarise(result, 1e-4, seed=4, n_candidates=100, only_correct=True)
    assert again.components[0].ce_vs_unembed == c.ce_vs_unembed  # the bootstrap is seeded


def test_holm_runs_across_the_jobs_components() -> None:
    """Three components: one with a real relation, two with none; the adjusted p-values are Holm's of the raw."""
    rng = np.random.default_rng(7)
    n = 40
    un = rng.normal(1.0, 0.5, (n, 3))
    ce = np.stack([0.6 * un[:, 0] + rng.normal(0, 0.1, n), rng.normal(0, 1, n), rng.normal(0, 1, n)], axis=1)
    prompts = [
        PromptMeasures(
            target_id=1, clean_metric=0.0, top2_gap=1.0, total_effect=[0.0] * 3, direct_effect=list(un[i]),
            compensation=list(ce[i]), response=[[0.0, 0.0, ce[i, c], 0.0] for c in range(3)],
            norm_response=[0.0] * 3, clean_direct_effect=[0.0] * 4, unembed_effect=list(un[i]),
            compensatory_effect=list(ce[i]), index=i,
        )
        for i in range(n)
    ]
    summary = summarise(SweepResult(["attn.0", "mlp.0", "attn.1"], BASIS, prompts), 1e-4, seed=0)
    fits = [present(c.ce_vs_unembed) for c in summary.components]
    raw = [f.permutation_p for f in fits]
    assert [f.permutation_p_holm for f in fits] == pytest.approx(holm(raw))
    assert present(raw[0]) < 0.001 and present(fits[0].permutation_p_holm) <= 0.05
    for c, f in enumerate(fits):  # each p-value counts, by np.polyfit, the permutations reaching the slope
        orders = permutations(n, f.n_permutations, seed=0)
        slopes = np.array([np.polyfit(un[order, c], ce[:, c], 1)[0] for order in orders])
        observed = abs(np.polyfit(un[:, c], ce[:, c], 1)[0])
        assert f.permutation_p == pytest.approx((1 + np.sum(np.abs(slopes) >= observed)) / (1 + len(orders)))


def test_several_draws_fit_per_draw_and_bootstrap_by_relation() -> None:
    """Prompts with three source draws in relations: slope and R² are the means of each draw's own fit, the
    intervals come from relation resamples that redraw the draws, and the main lists are not used by the fits."""
    rng = np.random.default_rng(2)
    n, n_draws = 36, 3
    un = rng.normal(1.0, 0.5, n)
    ce = 0.5 * un[None] + rng.normal(0, 0.2, (n_draws, n))
    de = un[None] + rng.normal(0, 0.3, (n_draws, n))
    relations = [f"P{i % 6}" for i in range(n)]
    prompts = []
    for i in range(n):
        draws = [
            DrawMeasures(seed=10 + s, sources=[(i + 1 + s) % n], total_effect=[de[s, i] - ce[s, i]],
                         direct_effect=[de[s, i]], compensatory_effect=[ce[s, i]], compensatory_effect_attn=[ce[s, i]],
                         compensatory_effect_mlp=[0.0], norm_response=[0.0])
            for s in range(n_draws)
        ]
        mean_ce = float(ce[:, i].mean())
        prompts.append(_prompt(float(de[:, i].mean()) - mean_ce, float(de[:, i].mean()), float(un[i]),
                               [0.0, 0.0, mean_ce, 0.0], i, draws))
    summary = summarise(SweepResult(["attn.0"], BASIS, prompts), 1e-4, seed=10, relations=relations)
    fit = present(summary.components[0].ce_vs_unembed)
    per_draw = [_fit(un, ce[s]) for s in range(n_draws)]
    assert fit.draw_slopes == pytest.approx([p[0] for p in per_draw], abs=1e-12)
    assert fit.draw_r2 == pytest.approx([p[1] for p in per_draw], abs=1e-12)
    assert fit.slope == pytest.approx(np.mean([p[0] for p in per_draw]), abs=1e-12)
    assert fit.r2 == pytest.approx(np.mean([p[1] for p in per_draw]), abs=1e-12)
    assert (fit.n_draws, fit.bootstrap_unit, fit.n_clusters) == (3, "relation", 6)
    direct = present(summary.components[0].ce_vs_direct)
    assert direct.slope == pytest.approx(np.mean([np.polyfit(de[s], ce[s], 1)[0] for s in range(n_draws)]))
    assert summary.source_seeds == [10, 11, 12] and present(summary.resampling).unit == "relation"
    # The interval is the bootstrap of one draw per resampled prompt, built here from the helper's weights.
    weights = bootstrap_weights(cluster_ids(relations), n_draws, seed=10)
    boot = [_fit(np.repeat(np.tile(un, n_draws), w.astype(int).ravel()), np.repeat(ce.ravel(), w.astype(int).ravel()))
            for w in weights]
    low, high = np.percentile([b[0] for b in boot], [2.5, 97.5])
    assert (fit.slope_ci_low, fit.slope_ci_high) == pytest.approx((low, high), abs=1e-9)
    assert present(fit.slope_ci_low) < present(fit.slope) < present(fit.slope_ci_high)
