"""A patching job's result (JobResult.patching) as tables: plain columns (dict of lists). No torch, no HTTP.

Written against the result's attributes only, so the server's CSV and Parquet exports and the client's
`to_pandas` share it (hydra_ablate_client/tables.py dispatches here for patching results).

Tables
  long      one row per pair × site × patched position: pair_index, site, position (the token index),
            patched_metric, patching_score (empty for a flagged pair), clean_metric, corrupted_metric, flagged,
            and the attribution-patching estimates (ESTIMATE_COLUMNS: effect, atp, atp_qkfix, atp_star and the
            estimated scores; empty for jobs without estimates)
  summary   one row per site (and position, with positions "all"): PatchSummary's fields
  prompts   one row per pair: its texts, answer ids, both metrics and whether it is flagged
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Columns = dict[str, list[Any]]

PAIR_SITE_COLUMNS = (
    "pair_index",
    "site",
    "position",
    "patched_metric",
    "patching_score",
    "clean_metric",
    "corrupted_metric",
    "flagged",
)
# PatchEstimates' fields, in its order: the exact change beside each method's estimate and estimated score.
ESTIMATE_COLUMNS = (
    "effect",
    "atp",
    "atp_qkfix",
    "atp_star",
    "atp_score",
    "atp_qkfix_score",
    "atp_star_score",
)
LONG_COLUMNS = (*PAIR_SITE_COLUMNS, *ESTIMATE_COLUMNS)
SUMMARY_COLUMNS = (
    "site",
    "position",
    "n_pairs",
    "n_scored",
    "patched_metric_mean",
    "score_mean",
    "score_ci_low",
    "score_ci_high",
    "pooled_score",
)
PAIR_COLUMNS = (
    "pair_index",
    "clean",
    "corrupted",
    "answer",
    "counterfactual",
    "answer_id",
    "counterfactual_id",
    "clean_metric",
    "corrupted_metric",
    "flagged",
)
PATCH_TABLES = ("long", "summary", "prompts")


def is_patching(result: Any) -> bool:
    return getattr(result, "patching", None) is not None


def _estimate_cells(estimates: Any, s: int, c: int) -> tuple[Any, ...]:
    """A row's ESTIMATE_COLUMNS: each field's [site][position] value, None where the job has none."""
    if estimates is None:
        return (None,) * len(ESTIMATE_COLUMNS)
    values = (getattr(estimates, name) for name in ESTIMATE_COLUMNS)
    return tuple(None if v is None else v[s][c] for v in values)


def iter_patch_long(result: Any) -> Iterator[tuple[Any, ...]]:
    """Rows of the long table in LONG_COLUMNS order: pair-major, then site, then position."""
    patching = result.patching
    for pair in patching.pairs:
        estimates = getattr(pair, "estimates", None)
        for s, site in enumerate(patching.sites):
            for c, position in enumerate(pair.positions):
                yield (
                    pair.index,
                    site,
                    position,
                    pair.patched_metric[s][c],
                    pair.patching_score[s][c],
                    pair.clean_metric,
                    pair.corrupted_metric,
                    pair.flagged,
                    *_estimate_cells(estimates, s, c),
                )


def _columns(names: tuple[str, ...], rows: Iterator[tuple[Any, ...]]) -> Columns:
    columns: Columns = {name: [] for name in names}
    for row in rows:
        for name, value in zip(names, row, strict=True):
            columns[name].append(value)
    return columns


def patch_table(result: Any, name: str = "long") -> Columns:
    """One of PATCH_TABLES of a patching result; ValueError for the ablation-only tables."""
    patching = result.patching
    if name == "long":
        return _columns(LONG_COLUMNS, iter_patch_long(result))
    if name == "summary":
        return _columns(
            SUMMARY_COLUMNS, (tuple(getattr(item, field) for field in SUMMARY_COLUMNS) for item in patching.summary)
        )
    if name == "prompts":
        return _columns(
            PAIR_COLUMNS,
            (
                (p.index, p.clean, p.corrupted, p.answer, p.counterfactual, p.answer_id, p.counterfactual_id,
                 p.clean_metric, p.corrupted_metric, p.flagged)
                for p in patching.pairs
            ),
        )
    raise ValueError(f"a patching result has no {name!r} table; its tables are {', '.join(PATCH_TABLES)}")
