"""A JobResult as Apache Parquet, written by pyarrow and streamed row group by row group.

The file is the long table of hydra_ablate_client/tables.py (one row per prompt × component), plus each row's
response vector (`response`, over the result's `response_basis`) and its prompt's `sources` and
`clean_direct_effect` lists, so nothing of the JSON result is left out: the rest of the result (id, model,
components, response_basis, summary, provenance) is the file's key-value metadata `hydra.result` (JSON, with an
empty `prompts`). Reading it back with pyarrow gives the same numbers as the JSON (float64 both ways).

Memory: the stored JSON is decoded once; the Parquet bytes are produced `PROMPTS_PER_ROW_GROUP` prompts at a
time and sent as they are written, so the export never holds a second full copy of the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from hydra_ablate_client.tables import iter_long, long_column_names
from service.schemas import JobResult

PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
METADATA_KEY = b"hydra.result"
PROMPTS_PER_ROW_GROUP = 256
PROMPT_LISTS = ("sources", "clean_direct_effect")

_TYPES: dict[str, pa.DataType] = {
    "prompt_index": pa.int64(),
    "prompt": pa.string(),
    "target_id": pa.int64(),
    "target_token": pa.string(),
    "near_tie": pa.bool_(),
    "relation": pa.string(),
    "subject": pa.string(),
    "answer": pa.string(),
    "dataset_index": pa.int64(),
    "component": pa.string(),
    "kind": pa.string(),
    "layer": pa.int64(),
    "head": pa.int64(),
    "response": pa.list_(pa.float64()),
    "sources": pa.list_(pa.int64()),
    "clean_direct_effect": pa.list_(pa.float64()),
}


def parquet_schema(result: JobResult) -> pa.Schema:
    names = [*long_column_names(result), "response", *PROMPT_LISTS]
    rest = msgspec.json.encode(msgspec.structs.replace(result, prompts=[]))
    return pa.schema([pa.field(name, _TYPES.get(name, pa.float64())) for name in names], metadata={METADATA_KEY: rest})


def _batch(result: JobResult, schema: pa.Schema, start: int, stop: int) -> pa.RecordBatch:
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    long_names = long_column_names(result)
    for row in iter_long(result, start, stop):
        for name, value in zip(long_names, row, strict=True):
            columns[name].append(value)
    for index in range(start, stop):
        prompt = result.prompts[index]
        for c in range(len(result.components)):
            columns["response"].append(prompt.response[c])
            for name in PROMPT_LISTS:
                columns[name].append(getattr(prompt, name))
    return pa.RecordBatch.from_pydict(columns, schema=schema)


class _Sink:
    """A write-only file for pyarrow that hands out what was written so far (the streamed chunks)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False
        self.position = 0

    def write(self, data: bytes) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def drain(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def iter_parquet(result: JobResult, prompts_per_group: int = PROMPTS_PER_ROW_GROUP) -> Iterator[bytes]:
    """The Parquet file of `result`, in pieces: one per row group, then the footer."""
    schema = parquet_schema(result)
    sink = _Sink()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    try:
        for start in range(0, len(result.prompts), prompts_per_group):
            stop = min(start + prompts_per_group, len(result.prompts))
            batch = _batch(result, schema, start, stop)
            writer.write_batch(batch, row_group_size=max(1, batch.num_rows))
            piece = sink.drain()
            if piece:
                yield piece
    finally:
        writer.close()
    yield sink.drain()


def to_parquet(result: JobResult) -> bytes:
    return b"".join(iter_parquet(result))


def from_parquet(table: pa.Table) -> JobResult:
    """The JobResult a Parquet export was written from (the inverse of iter_parquet; used by clients and tests)."""
    rest = msgspec.json.decode(table.schema.metadata[METADATA_KEY], type=JobResult)
    rows = table.to_pylist()
    n = len(rest.components)
    measures = _measure_columns(table.schema)
    prompts: list[Any] = []
    for start in range(0, len(rows), n or 1):
        group = rows[start : start + n]
        first = group[0]
        fields: dict[str, Any] = {
            "index": first["prompt_index"],
            "prompt": first["prompt"],
            **{name: first[name] for name in ("target_id", "target_token", "clean_metric", "top2_gap", "near_tie")},
            **{name: first[name] for name in PROMPT_LISTS},
            "response": [row["response"] for row in group],
            **{name: [row[name] for row in group] for name in measures},
        }
        prompts.append(fields)
    return msgspec.convert({**msgspec.to_builtins(rest), "prompts": prompts}, type=JobResult)


_NOT_MEASURES = frozenset(
    {"prompt_index", "prompt", "target_id", "target_token", "clean_metric", "top2_gap", "near_tie", "relation",
     "subject", "answer", "dataset_index", "component", "kind", "layer", "head", "response", *PROMPT_LISTS}
)


def _measure_columns(schema: pa.Schema) -> list[str]:
    """The per-component measures of a file (total_effect, …, and any a newer server wrote)."""
    return [name for name in schema.names if name not in _NOT_MEASURES]
