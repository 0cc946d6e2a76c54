"""The IOI worked example's page says only what its stored result carries (bench/ioi_report.py)."""

from __future__ import annotations

import copy
import json

from bench import ioi_report


def test_the_page_is_what_the_stored_result_gives() -> None:
    report = json.loads(ioi_report.RESULT.read_text())
    assert ioi_report.PAGE.read_text() == ioi_report.page(report)


def test_the_compensated_share_and_the_responders_follow_the_result() -> None:
    report = json.loads(ioi_report.RESULT.read_text())
    knockout = report["knockout"]
    assert abs(ioi_report.compensated_share(knockout)
               - (knockout["direct_effect"]["mean"] - knockout["total_effect"]["mean"])
               / knockout["direct_effect"]["mean"]) < 1e-12
    quiet = copy.deepcopy(report)
    quiet["knockout"]["responses_above_zero"] = {}
    text = ioi_report.page(quiet)
    assert "No downstream component responds with an interval wholly above 0." in text
    assert "respond with an interval wholly above 0; the largest" not in text
    changed = copy.deepcopy(report)
    changed["knockout"]["total_effect"]["mean"] = 0.0
    assert "100% of the direct effect does not show" in ioi_report.page(changed)
