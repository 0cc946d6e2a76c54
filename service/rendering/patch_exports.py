"""A patching job's result (JobResult.patching) as CSV and Parquet: the long rows of
hydra_ablate_client/patch_tables.py, one per pair × site × patched position.

CSV: UTF-8, CRLF rows, floats in Python's shortest round-trip repr, an empty cell for a flagged pair's score, site
names are ours (no formula characters). Parquet: the same columns, the result without its pairs' numbers in the
file's `hydra.result` metadata (as for ablation results, service/rendering/parquet.py).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from hydra_ablate_client.patch_tables import LONG_COLUMNS, iter_patch_long, patch_table
from hydra_ablate_client.wire import JobResult

METADATA_KEY = b"hydra.result"
_TYPES: dict[str, pa.DataType] = {
    "pair_index": pa.int64(),
    "site": pa.string(),
    "position": pa.int64(),
    "flagged": pa.bool_(),
}


def patch_csv(result: JobResult) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(LONG_COLUMNS)
    for pair, site, position, patched, score, clean, corrupted, flagged in iter_patch_long(result):
        writer.writerow(
            (pair, site, position, repr(patched), "" if score is None else repr(score), repr(clean),
             repr(corrupted), "true" if flagged else "false")
        )
    return buffer.getvalue().encode("utf-8")


def patch_parquet_schema(result: JobResult) -> pa.Schema:
    assert result.patching is not None
    rest = msgspec.json.encode(
        msgspec.structs.replace(result, patching=msgspec.structs.replace(result.patching, pairs=[]))
    )
    return pa.schema(
        [pa.field(name, _TYPES.get(name, pa.float64())) for name in LONG_COLUMNS], metadata={METADATA_KEY: rest}
    )


def iter_patch_parquet(result: JobResult) -> Iterator[bytes]:
    """The Parquet file of a patching result, in one row group (pairs × sites × positions stay small)."""
    schema = patch_parquet_schema(result)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        writer.write_table(pa.Table.from_pydict(patch_table(result, "long"), schema=schema))
    yield sink.getvalue().to_pybytes()
