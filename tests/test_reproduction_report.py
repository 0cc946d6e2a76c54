"""The reproduction pages say only what the stored summaries carry: every number and count in them is computed by
bench/reproduction_report.py, and its readings of an interval and of a layer's depth follow the paper's words."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import reproduction_report as report
from hydra_ablate_client.wire import Fit


def fit(low: float | None, high: float | None, slope: float = 0.5) -> Fit:
    return Fit(
        y="compensatory_effect", x="unembed_effect", slope=slope, intercept=0.0, r2=0.1, n=100,
        slope_ci_low=low, slope_ci_high=high, ci_level=0.95, n_boot=1000, excludes_zero=None, excludes_one=None,
    )


@pytest.mark.parametrize(
    ("low", "high", "reading"),
    [
        (0.2, 0.8, "in (0, 1)"),
        (-0.1, 0.8, "contains 0"),
        (0.2, 1.3, "contains 1"),
        (-0.5, 1.5, "contains 0 and 1"),
        (1.1, 1.4, "above 1"),
        (-0.4, -0.1, "below 0"),
        (None, None, "no fit"),
    ],
)
def test_interval_reading_is_the_papers_slope_below_one(low: float | None, high: float | None, reading: str) -> None:
    """"Below 1" is the whole interval in (0, 1): an interval reaching 0 (no repair) does not pass."""
    assert report.interval_reading(fit(low, high)) == reading
    assert report.unit_interval(fit(low, high)) == (reading == "in (0, 1)")


def test_paper_layers_are_placed_by_relative_depth() -> None:
    # The paper's 32 layers on Gemma's 18 and SmolLM2's 30: "past layer 13" is relative depth above 13/32.
    assert [layer for layer in range(18) if report.past_paper_13(layer, 18)] == list(range(8, 18))
    assert [layer for layer in range(30) if report.past_paper_13(layer, 30)] == list(range(13, 30))
    assert "R² 0.92" in report.paper_claim(13, 18) and "R² 0.92" in report.paper_claim(22, 30)
    assert report.paper_claim(0, 18) == "–"


def test_verdicts_name_partial_agreement() -> None:
    assert report.verdict(5, 5) == "agrees"
    assert report.verdict(0, 5) == "does not agree"
    assert report.verdict(3, 5) == "agrees at 3 of 5 layers only"


def test_overlap_of_two_intervals() -> None:
    assert report.overlap(fit(0.1, 0.5), fit(0.4, 0.9))
    assert not report.overlap(fit(0.1, 0.3), fit(0.4, 0.9))


def test_pages_are_written_from_the_stored_summaries() -> None:
    """A page edited by hand, or a summary replaced without rewriting the pages, fails here: run
    `python bench/reproduction_report.py`."""
    written = report.pages()
    expected = {
        Path("docs/results/hydra-gemma.md"), Path("docs/results/hydra-smollm2.md"),
        Path("docs/results/rushing-nanda-gemma.md"), Path("README.md"),
    }
    assert {path.relative_to(report.ROOT) for path in written} == expected
    for path, text in written.items():
        assert path.read_text() == text, f"{path.relative_to(report.ROOT)} differs from what the summaries give"
