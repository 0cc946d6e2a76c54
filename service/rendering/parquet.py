"""A JobResult as Apache Parquet, written by pyarrow and streamed row group by row group.

The file is the long table of hydra_ablate_client.tables (one row per prompt × component), plus each row's
response vector (`response`, over the result's `response_basis`) and its prompt's `sources` and
`clean_direct_effect` lists, so nothing of the JSON result is left out: the rest of the result (id, model,
components, response_basis, summary, provenance) is the file's key-value metadata `hydra.result` (JSON, with an
empty `prompts`). Reading it back with pyarrow gives the same numbers as the JSON (float64 both ways).

Jobs with `verify` also carry each prompt's `all_estimates` (every component of the job, not only the verified
ones of the rows): list columns `all_estimates_atp`, `all_estimates_atp_qkfix`, `all_estimates_atp_star`, on the
prompt's first row only (null on its other rows and for a method the job did not ask for), in the order of
`summary.attribution.verification.components`. A list as long as the job's components, repeated on every row of
the prompt, would make the file (components × verified) per prompt; these columns are absent for other jobs.

Memory: the stored JSON is decoded once; the Parquet bytes are produced `PROMPTS_PER_ROW_GROUP` prompts at a
time and sent as they are written, so the export never holds a second full copy of the result.

Per-position results (prompts with `positions` columns) are written as the per-position long table instead: one row
per prompt × measured position × component (prompt-major, then position, then component: the CSV's order), with
the prompt's text, the position, its target, the position's clean metric and top-2 gap, every (component,
position) measure as float32 (the stored precision, so the numbers are exactly the JSON's), the capped TE of
soft-capped models and, with `position_responses: "full"`, the response vector over the basis. Row groups hold
whole prompts, about `POSITION_ROWS_PER_GROUP` rows each, built with numpy straight from the stored float32 arrays
(no Python list per number). `hydra.result` then holds the result with each prompt's per-component lists (the
last position) and, of its `positions`, the positions, targets and `clean_direct_effect` (R, P), which is per
basis entry, not per component; the other arrays are empty there and are the rows. `from_parquet` rebuilds the
JSON result from both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hydra_ablate_client.tables import ALL_ESTIMATE_METHODS, ESTIMATE_COLUMNS, iter_long, long_column_names
from hydra_ablate_client.vocabulary import component_columns
from hydra_ablate_client.wire import JobResult, PositionColumns
from service.rendering.patch_exports import from_patch_parquet, iter_patch_parquet
from service.rendering.result_csv import OPTIONAL_POSITION_MEASURES, POSITION_MEASURES, has_positions

PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
METADATA_KEY = b"hydra.result"
PROMPTS_PER_ROW_GROUP = 256
PROMPT_LISTS = ("sources", "clean_direct_effect")
POSITION_ROWS_PER_GROUP = 1 << 18  # ≈ 15 prompts of 64 positions × 270 heads
POSITION_PROMPT_MEASURES = ("clean_metric", "top2_gap")
# PromptResult.all_estimates (jobs with verify): column → its field, on each prompt's first row.
ALL_ESTIMATE_COLUMNS = {f"all_estimates_{name}": name for name in ALL_ESTIMATE_METHODS}

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
    **dict.fromkeys(ALL_ESTIMATE_COLUMNS, pa.list_(pa.float64())),
}


def has_all_estimates(result: JobResult) -> bool:
    return any(prompt.all_estimates is not None for prompt in result.prompts)


def parquet_schema(result: JobResult) -> pa.Schema:
    names = [*long_column_names(result), "response", *PROMPT_LISTS,
             *(ALL_ESTIMATE_COLUMNS if has_all_estimates(result) else ())]
    rest = msgspec.json.encode(msgspec.structs.replace(result, prompts=[]))
    return pa.schema([pa.field(name, _TYPES.get(name, pa.float64())) for name in names], metadata={METADATA_KEY: rest})


def _batch(result: JobResult, schema: pa.Schema, start: int, stop: int) -> pa.RecordBatch:
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    long_names = long_column_names(result)
    for row in iter_long(result, start, stop):
        for name, value in zip(long_names, row, strict=True):
            columns[name].append(value)
    every = [name for name in ALL_ESTIMATE_COLUMNS if name in columns]
    for index in range(start, stop):
        prompt = result.prompts[index]
        for c in range(len(result.components)):
            columns["response"].append(prompt.response[c])
            for name in PROMPT_LISTS:
                columns[name].append(getattr(prompt, name))
            for name in every:
                values = None if c or prompt.all_estimates is None else prompt.all_estimates
                columns[name].append(None if values is None else getattr(values, ALL_ESTIMATE_COLUMNS[name]))
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


_TEXT = pa.dictionary(pa.int32(), pa.string())


def position_schema(result: JobResult) -> pa.Schema:
    """The per-position long table's columns; `hydra.result` keeps what is not a row (see the module doc)."""
    stripped = [
        msgspec.structs.replace(
            prompt,
            positions=None
            if prompt.positions is None
            else PositionColumns(
                positions=prompt.positions.positions,
                target_ids=prompt.positions.target_ids,
                clean_direct_effect=prompt.positions.clean_direct_effect,
                **{name: b"" for name in (*POSITION_PROMPT_MEASURES, *POSITION_MEASURES)},
            ),
        )
        for prompt in result.prompts
    ]
    rest = msgspec.json.encode(msgspec.structs.replace(result, prompts=stripped))
    fields = [
        pa.field("prompt_index", pa.int64()),
        pa.field("prompt", _TEXT),  # dictionary-encoded: a prompt's text is held once, not once per row
        pa.field("position", pa.int64()),
        pa.field("target_id", pa.int64()),
        pa.field("component", _TEXT),
        pa.field("kind", _TEXT),
        pa.field("layer", pa.int64()),
        pa.field("head", pa.int64()),
        *(pa.field(name, pa.float32()) for name in (*POSITION_PROMPT_MEASURES, *POSITION_MEASURES)),
    ]
    for name in OPTIONAL_POSITION_MEASURES:
        if any(p.positions is not None and getattr(p.positions, name) is not None for p in result.prompts):
            fields.append(pa.field(name, pa.float32()))
    if any(p.positions is not None and p.positions.response is not None for p in result.prompts):
        fields.append(pa.field("response", pa.list_(pa.float32())))
    return pa.schema(fields, metadata={METADATA_KEY: rest})


def _float32(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4")


def _position_batch(result: JobResult, schema: pa.Schema, start: int, stop: int) -> pa.RecordBatch:
    """Rows of prompts start:stop: prompt × position × component, numbers straight from the float32 arrays."""
    n_components = len(result.components)
    parsed = [component_columns(name) for name in result.components]
    per_component = [
        pa.array(values).dictionary_encode() if name in ("component", "kind") else pa.array(values)
        for name, values in zip(
            ("component", "kind", "layer", "head"),
            [list(result.components), *([part[k] for part in parsed] for k in range(3))],
            strict=True,
        )
    ]
    n_basis = len(result.response_basis)
    parts: dict[str, list[Any]] = {name: [] for name in schema.names}
    for prompt in result.prompts[start:stop]:
        columns = prompt.positions
        if columns is None:
            continue
        n_positions = len(columns.positions)
        rows = n_positions * n_components
        parts["prompt_index"].append(pa.array(np.full(rows, prompt.index, dtype=np.int64)))
        parts["prompt"].append(
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([prompt.prompt]))
        )
        parts["position"].append(pa.array(np.repeat(np.asarray(columns.positions, dtype=np.int64), n_components)))
        parts["target_id"].append(pa.array(np.repeat(np.asarray(columns.target_ids, dtype=np.int64), n_components)))
        component_of_row = pa.array(np.tile(np.arange(n_components), n_positions))
        for name, values in zip(("component", "kind", "layer", "head"), per_component, strict=True):
            parts[name].append(values.take(component_of_row))
        for name in POSITION_PROMPT_MEASURES:
            parts[name].append(pa.array(np.repeat(_float32(getattr(columns, name)), n_components)))
        for name in POSITION_MEASURES:  # stored (C, P), rows are position-major: transpose
            parts[name].append(pa.array(_float32(getattr(columns, name)).reshape(n_components, n_positions).T.ravel()))
        for name in OPTIONAL_POSITION_MEASURES:
            if name in parts:
                stored = getattr(columns, name)
                parts[name].append(
                    pa.nulls(rows, type=pa.float32())
                    if stored is None
                    else pa.array(_float32(stored).reshape(n_components, n_positions).T.ravel())
                )
        if "response" in parts:
            if columns.response is None:
                parts["response"].append(pa.nulls(rows, type=pa.list_(pa.float32())))
            else:  # stored (C, R, P): each row's vector is over R
                vectors = _float32(columns.response).reshape(n_components, n_basis, n_positions).transpose(2, 0, 1)
                flat = pa.array(np.ascontiguousarray(vectors).ravel())
                offsets = pa.array(np.arange(0, rows * n_basis + 1, n_basis, dtype=np.int32))
                parts["response"].append(pa.ListArray.from_arrays(offsets, flat))
    arrays = [_concat(parts[name], schema.field(name).type) for name in schema.names]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _concat(pieces: list[Any], kind: pa.DataType) -> pa.Array:
    """One column of a batch from its per-prompt pieces (dictionary pieces get one shared dictionary)."""
    if not pieces:
        return pa.array([], type=kind)
    if pa.types.is_dictionary(kind):
        return pa.chunked_array(pieces, type=kind).unify_dictionaries().combine_chunks()
    return pa.concat_arrays([piece.cast(kind) for piece in pieces])


def _position_groups(result: JobResult, rows_per_group: int) -> list[tuple[int, int]]:
    """Consecutive prompt ranges of about `rows_per_group` rows each (a prompt is never split)."""
    groups, start, rows = [], 0, 0
    for index, prompt in enumerate(result.prompts):
        rows += len(prompt.positions.positions) * len(result.components) if prompt.positions is not None else 0
        if rows >= rows_per_group:
            groups.append((start, index + 1))
            start, rows = index + 1, 0
    if start < len(result.prompts):
        groups.append((start, len(result.prompts)))
    return groups


def iter_parquet(
    result: JobResult, prompts_per_group: int = PROMPTS_PER_ROW_GROUP, rows_per_group: int = POSITION_ROWS_PER_GROUP
) -> Iterator[bytes]:
    """The Parquet file of `result`, in pieces: one per row group, then the footer."""
    if result.patching is not None:  # a patching job: its long rows (service/rendering/patch_exports.py)
        yield from iter_patch_parquet(result)
        return
    per_position = has_positions(result)
    schema = position_schema(result) if per_position else parquet_schema(result)
    groups = (
        _position_groups(result, rows_per_group)
        if per_position
        else [(s, min(s + prompts_per_group, len(result.prompts))) for s in range(0, len(result.prompts),
                                                                                   prompts_per_group)]
    )
    sink = _Sink()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    try:
        for start, stop in groups:
            batch = (_position_batch if per_position else _batch)(result, schema, start, stop)
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
    if rest.patching is not None:  # a patching job's long rows (service/rendering/patch_exports.py)
        return from_patch_parquet(table, rest)
    if "position" in table.schema.names:
        return _from_position_table(table, rest)
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
        if first.get("atp") is not None:  # a job with estimates: the columns rebuild PromptResult.estimates
            fields["estimates"] = {
                name: None if first.get(name) is None else [row[name] for row in group] for name in ESTIMATE_COLUMNS
            }
        if any(first.get(name) is not None for name in ALL_ESTIMATE_COLUMNS):  # a job with verify
            fields["all_estimates"] = {field: first.get(name) for name, field in ALL_ESTIMATE_COLUMNS.items()}
        prompts.append(fields)
    return msgspec.convert({**msgspec.to_builtins(rest), "prompts": prompts}, type=JobResult)


_NOT_MEASURES = frozenset(
    {"prompt_index", "prompt", "target_id", "target_token", "clean_metric", "top2_gap", "near_tie", "relation",
     "subject", "answer", "dataset_index", "component", "kind", "layer", "head", "response", *PROMPT_LISTS,
     *ESTIMATE_COLUMNS, *ALL_ESTIMATE_COLUMNS}
)


def _measure_columns(schema: pa.Schema) -> list[str]:
    """The per-component measures of a file (total_effect, …, and any a newer server wrote)."""
    return [name for name in schema.names if name not in _NOT_MEASURES]


def _from_position_table(table: pa.Table, rest: JobResult) -> JobResult:
    """The per-position JobResult: `hydra.result`'s prompts with their position arrays refilled from the rows."""
    n_components = len(rest.components)
    columns = {name: table.column(name).to_numpy() for name in (*POSITION_PROMPT_MEASURES, *POSITION_MEASURES)}
    response = table.column("response") if "response" in table.schema.names else None
    optional = {name: table.column(name) for name in OPTIONAL_POSITION_MEASURES if name in table.schema.names}
    prompts, offset = [], 0
    for prompt in rest.prompts:
        if prompt.positions is None:
            prompts.append(prompt)
            continue
        n_positions = len(prompt.positions.positions)
        span = slice(offset, offset + n_positions * n_components)
        offset = span.stop

        filled = {
            name: np.ascontiguousarray(columns[name][span].reshape(n_positions, n_components).T).astype("<f4").tobytes()
            for name in POSITION_MEASURES
        }
        filled.update({name: columns[name][span][::n_components].astype("<f4").tobytes()
                       for name in POSITION_PROMPT_MEASURES})
        for name, stored in optional.items():
            if stored[span.start].is_valid:
                values = stored.slice(span.start, span.stop - span.start).to_numpy()
                filled[name] = np.ascontiguousarray(values.reshape(n_positions, n_components).T).astype(
                    "<f4"
                ).tobytes()
        vectors = None
        if response is not None and response[span.start].is_valid:
            flat = np.asarray(response.slice(span.start, span.stop - span.start).combine_chunks().flatten())
            vectors = flat.reshape(n_positions, n_components, -1).transpose(1, 2, 0).astype("<f4").tobytes()
        prompts.append(msgspec.structs.replace(
            prompt, positions=msgspec.structs.replace(prompt.positions, **filled, response=vectors)
        ))
    return msgspec.structs.replace(rest, prompts=prompts)
