"""The statistics helpers (worker/fit_statistics.py) and the summary's use of them, against numpy's own routines
computed here on known data (np.polyfit, np.corrcoef, an explicit bootstrap loop, np.percentile)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checks import present
from worker.engine.types import PromptMeasures, SweepResult
from worker.fit_statistics import bootstrap_slopes, excludes, ols, pearson, percentile_interval
from worker.summary import summarise


def _noisy_line(n: int = 200, slope: float = 0.7, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, slope * x + 0.25 + rng.normal(scale=0.3, size=n)


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
    assert percentile_interval(np.empty(0)) is None and excludes(None, 0.0) is None


def test_pearson_matches_numpy() -> None:
    x, y = _noisy_line()
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson(x, -y) == pytest.approx(-np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_bootstrap_matches_an_explicit_loop() -> None:
    """Same seeded draws, slope refitted with np.polyfit on each resample, numpy's percentile of them."""
    x, y = _noisy_line(n=60)
    slopes = bootstrap_slopes(x, y, seed=11, n_boot=300)
    index = np.random.default_rng(11).integers(0, x.size, size=(300, x.size))
    expected = np.array([np.polyfit(x[row], y[row], 1)[0] for row in index])
    np.testing.assert_allclose(slopes, expected, atol=1e-10)
    low, high = present(percentile_interval(slopes))
    assert (low, high) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])), abs=1e-10)
    assert np.array_equal(bootstrap_slopes(x, y, seed=11, n_boot=300), slopes)  # seeded: reproducible


def test_bootstrap_interval_covers_the_true_slope() -> None:
    x, y = _noisy_line(n=400, slope=0.7)
    interval = percentile_interval(bootstrap_slopes(x, y, seed=0))
    assert interval is not None and interval[0] < 0.7 < interval[1]
    assert excludes(interval, 0.0) is True and excludes(interval, 1.0) is True
    assert excludes(interval, 0.7) is False


def _prompt(te: float, de: float, un: float, response: list[float], index: int) -> PromptMeasures:
    ce = sum(response)
    return PromptMeasures(
        target_id=1, clean_metric=0.0, top2_gap=1.0, total_effect=[te], direct_effect=[de],
        compensation=[de - te], response=[response], norm_response=[de - te - ce],
        clean_direct_effect=[un, -0.5, 0.1, -0.2], unembed_effect=[un], compensatory_effect=[ce], index=index,
    )


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
    result = SweepResult(components=["attn.0"], response_basis=["attn.0", "mlp.0", "attn.1", "mlp.1"], prompts=prompts)
    summary = summarise(result, 1e-4, seed=4, n_candidates=100, only_correct=True)
    c = summary.components[0]
    ce = attn_part + mlp_part
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
        assert present(fit.slope_ci_low) < present(fit.slope) < present(fit.slope_ci_high)
        assert fit.n_boot == 1000 and fit.ci_level == 0.95
    assert present(c.ce_vs_unembed).excludes_zero and present(c.ce_vs_unembed).excludes_one  # slope ≈ 0.7
    assert c.unembed_drop_correlation == pytest.approx(np.corrcoef(un, te)[0, 1], abs=1e-12)
    assert c.unembed_exceeds_drop_share == pytest.approx(float(np.mean(un > te)))
    assert (summary.selection.n_candidates, summary.selection.n_kept, summary.selection.only_correct) == (100, n, True)
    erasure = {(e.ablated, e.mlp): e for e in present(summary.erasure)}
    assert set(erasure) == {("attn.0", "mlp.0"), ("attn.0", "mlp.1")}
    assert erasure[("attn.0", "mlp.0")].fit.slope == pytest.approx(np.polyfit(un, mlp_part, 1)[0], abs=1e-9)
    assert erasure[("attn.0", "mlp.0")].clean_direct_effect_mean == -0.5
    assert c.compensation_vs_direct.y == "compensation" and c.compensation_vs_direct.x == "direct_effect"
    again = summarise(result, 1e-4, seed=4, n_candidates=100, only_correct=True)
    assert again.components[0].ce_vs_unembed == c.ce_vs_unembed  # the bootstrap is seeded
