"""A JobResult in the result endpoint's formats (JSON, MessagePack, CSV, Parquet).

JSON is what the worker stored and is served as is; MessagePack, CSV and Parquet are derived from the decoded result,
so all carry the same numbers. Choosing a format per request is HTTP: service/api/negotiation.py.
"""

from __future__ import annotations

import msgspec

from hydra_ablate_client.vocabulary import ExportFormat, PatchDirection, PatchMetric, PositionScope
from hydra_ablate_client.wire import AttributionSummary, JobResult, PatchJobSummary, PatchSummary, Summary
from service.rendering.result_csv import (
    CSV_COLUMNS,
    POSITION_CSV_COLUMNS,
    has_positions,
    position_csv_rows,
    to_csv,
)

__all__ = [
    "CSV_COLUMNS",
    "POSITION_CSV_COLUMNS",
    "ExportFormat",
    "export",
    "has_positions",
    "position_csv_rows",
    "summary_of",
    "to_csv",
    "to_msgpack",
]


class _SummaryOnly(msgspec.Struct):
    """Decodes a stored JobResult's summary and skips everything else (per-position arrays are never built)."""

    summary: Summary


class _PatchingWithoutPairs(msgspec.Struct):
    """A stored PatchingResult without its pairs (decoding skips them)."""

    direction: PatchDirection
    positions: PositionScope
    metric: PatchMetric
    epsilon: float
    sites: list[str]
    summary: list[PatchSummary]
    n_flagged: int
    clean_metric_mean: float
    corrupted_metric_mean: float
    ci_level: float
    n_boot: int
    attribution: AttributionSummary | None = None


class _SummaryAndPatching(msgspec.Struct):
    summary: Summary
    patching: _PatchingWithoutPairs | None = None


def summary_of(stored: bytes) -> Summary | PatchJobSummary:
    """What GET …/summary answers: the ablation Summary, or for a patching job its per-site summary (the ablation
    Summary of a patching job holds only its pair count)."""
    decoded = msgspec.json.decode(stored, type=_SummaryAndPatching)
    patching = decoded.patching
    if patching is None:
        return decoded.summary
    return PatchJobSummary(
        intervention="patch",
        n_pairs=decoded.summary.n_prompts,
        **{field: getattr(patching, field) for field in _PatchingWithoutPairs.__struct_fields__},
    )


def to_msgpack(result: JobResult) -> bytes:
    return msgspec.msgpack.encode(result)


def export(stored: bytes, fmt: ExportFormat) -> bytes:
    """The stored JSON result in `fmt`; JSON is returned untouched (no decode/encode of a possibly large body)."""
    if fmt == "json":
        return stored
    result = msgspec.json.decode(stored, type=JobResult)
    if fmt == "parquet":
        from service.rendering.parquet import to_parquet  # pyarrow is heavy: imported on first use

        return to_parquet(result)
    return to_msgpack(result) if fmt == "msgpack" else to_csv(result)
