"""A patching job's result (JobResult.patching) as CSV and Parquet: the long rows of
hydra_ablate_client/patch_tables.py, one per pair × site × patched position.

CSV: UTF-8, CRLF rows, floats in Python's shortest round-trip repr, an empty cell for a flagged pair's score, site
names are ours (no formula characters). Parquet: the same columns, the result without its pairs' numbers in the
file's `hydra.result` metadata (as for ablation results, service/rendering/parquet.py): each pair keeps its texts,
ids, metrics and positions there, so `from_patch_parquet` rebuilds the JSON result from both.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from hydra_ablate_client.patch_tables import ESTIMATE_COLUMNS, LONG_COLUMNS, iter_patch_long, patch_table
from hydra_ablate_client.wire import JobResult, PairResult, PatchEstimates

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
    for pair, site, position, patched, score, clean, corrupted, flagged, *estimates in iter_patch_long(result):
        writer.writerow(
            (pair, site, position, repr(patched), "" if score is None else repr(score), repr(clean),
             repr(corrupted), "true" if flagged else "false", *("" if v is None else repr(v) for v in estimates))
        )
    return buffer.getvalue().encode("utf-8")


def _without_numbers(pair: PairResult) -> PairResult:
    return msgspec.structs.replace(pair, patched_metric=[], patching_score=[], estimates=None)


def patch_parquet_schema(result: JobResult) -> pa.Schema:
    assert result.patching is not None
    # The pairs keep their texts, ids, metrics and positions; their [site][position] numbers are the rows.
    pairs = [_without_numbers(pair) for pair in result.patching.pairs]
    rest = msgspec.json.encode(
        msgspec.structs.replace(result, patching=msgspec.structs.replace(result.patching, pairs=pairs))
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


def from_patch_parquet(table: pa.Table, rest: JobResult) -> JobResult:
    """The patching JobResult of a Parquet export: `hydra.result`'s pairs with their [site][position] numbers
    refilled from the long rows (pair-major, then site, then position: iter_patch_long's order)."""
    patching = rest.patching
    assert patching is not None
    patched = table.column("patched_metric").to_pylist()
    scores = table.column("patching_score").to_pylist()
    n_sites = len(patching.sites)
    expected = sum(n_sites * len(pair.positions) for pair in patching.pairs)
    if expected != len(patched):
        raise ValueError(
            f"the file has {len(patched)} rows and its metadata's pairs need {expected}: it is not a whole patching "
            "export (files from before the pairs were kept in the metadata cannot be read back)"
        )
    names = set(table.column_names)
    estimated = {name: table.column(name).to_pylist() for name in ESTIMATE_COLUMNS if name in names}
    pairs, row = [], 0
    for pair in patching.pairs:
        width = len(pair.positions)
        metric, score = [], []
        first = row
        for _ in range(n_sites):
            metric.append(patched[row : row + width])
            score.append(scores[row : row + width])
            row += width
        estimates = _estimates_of(estimated, first, n_sites, width)
        pairs.append(msgspec.structs.replace(pair, patched_metric=metric, patching_score=score, estimates=estimates))
    return msgspec.structs.replace(rest, patching=msgspec.structs.replace(patching, pairs=pairs))


def _estimates_of(columns: dict[str, list[object]], first: int, n_sites: int, width: int) -> PatchEstimates | None:
    """One pair's PatchEstimates from its rows first … (None when the job had none: its atp cells are empty)."""
    atp = columns.get("atp")
    if atp is None or n_sites * width == 0 or atp[first] is None:
        return None
    fields = {}
    for name, values in columns.items():
        grid = [values[first + s * width : first + (s + 1) * width] for s in range(n_sites)]
        # A method the job did not ask for is empty in every row; a flagged pair's scores are empty too.
        fields[name] = None if name in ("atp_qkfix", "atp_star") and grid[0][0] is None else grid
    for name in ("atp_qkfix_score", "atp_star_score"):
        if fields.get(name.removesuffix("_score")) is None:
            fields[name] = None
    return msgspec.convert(fields, PatchEstimates)
