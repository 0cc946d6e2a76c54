"""The one CSV format of a JobResult, written by the API (`GET …/result?format=csv`) and the CLI
(`hydra-ablate result --format csv`) alike: same columns, UTF-8, CRLF rows (RFC 4180).

One row per prompt × component (prompt-major, components in the result's order); for per-position results
(prompts with `positions` columns) one row per prompt × measured position × component instead
(`position_csv_rows`, written one prompt at a time). Floats are written with Python's
shortest round-trip repr, so reading them back gives the same numbers.

Formula injection (OWASP, "CSV Injection"): a spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` (and,
in some, tab or carriage return) as a formula. Prompts, answers' tokens and component names are user text, so
such cells get a leading `'`, which spreadsheets show as text. Numbers are written by us and left as they are (a
negative effect starts with `-` and must stay a number).

No web framework here: the CLI imports it too.
"""

from __future__ import annotations

import csv
import io
import sys
from array import array
from collections.abc import Iterator

from hydra_ablate_client.tables import ESTIMATE_COLUMNS, estimate_lists
from hydra_ablate_client.wire import JobResult

CSV_COLUMNS = (
    "prompt_index",
    "prompt",
    "target_id",
    "target_token",
    "component",
    "total_effect",
    "direct_effect",
    "compensation",
    "norm_response",
    "clean_metric",
    "near_tie",
    "unembed_effect",  # the paper's Δunembed of the ablated component
    "compensatory_effect",  # the paper's CE
    "ablated_unembed_effect",  # Δ̃unembed(k, k): its own write left after ablation (empty in older results)
    *ESTIMATE_COLUMNS,  # attribution-patching estimates (empty for jobs without them)
)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
assert sys.byteorder == "little", "per-position arrays are little-endian float32"

# Per-position jobs (results with `positions` columns): one row per prompt × measured position × component.
# The per (component, position) arrays of PositionColumns, in column order (the CSV's and the Parquet file's).
POSITION_MEASURES = (
    "total_effect",
    "direct_effect",
    "unembed_effect",
    "compensation",
    "compensatory_effect",
    "response_heads",
    "response_mlps",
    "norm_response",
)
# (C, P) arrays that a result may lack: TE on the capped logits (soft-capped models, Gemma 2, only), the
# ablation's efficacy Δ̃unembed(k, k) (results computed before it existed) and the attribution-patching estimates
# (jobs with `estimates`). Empty cells / null columns where absent.
OPTIONAL_POSITION_MEASURES = ("capped_total_effect", "ablated_unembed_effect", *ESTIMATE_COLUMNS)
POSITION_CSV_COLUMNS = (
    "prompt_index",
    "prompt",
    "position",
    "target_id",
    "component",
    *POSITION_MEASURES,
    "clean_metric",
    "top2_gap",
    *OPTIONAL_POSITION_MEASURES,
)


def neutralise(text: str) -> str:
    """A text cell a spreadsheet will not evaluate: `'` before a leading formula character."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def to_csv(result: JobResult) -> bytes:
    """The result as CSV bytes (see the module doc)."""
    if result.patching is not None:  # a patching job: pairs × sites × positions (service/rendering/patch_exports.py)
        from service.rendering.patch_exports import patch_csv  # pyarrow is heavy: imported only for these

        return patch_csv(result)
    if has_positions(result):
        return b"".join(position_csv_rows(result))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for prompt in result.prompts:
        index = prompt.index  # its place in the job: only_correct jobs leave prompts out
        text, token = neutralise(prompt.prompt), neutralise(prompt.target_token)
        estimates = estimate_lists(prompt)
        for c, component in enumerate(result.components):
            writer.writerow(
                (
                    index,
                    text,
                    prompt.target_id,
                    token,
                    neutralise(component),
                    repr(prompt.total_effect[c]),
                    repr(prompt.direct_effect[c]),
                    repr(prompt.compensation[c]),
                    repr(prompt.norm_response[c]),
                    repr(prompt.clean_metric),
                    "true" if prompt.near_tie else "false",
                    repr(prompt.unembed_effect[c]),
                    repr(prompt.compensatory_effect[c]),
                    "" if not prompt.ablated_unembed_effect else repr(prompt.ablated_unembed_effect[c]),
                    *("" if values is None else repr(values[c]) for values in estimates),
                )
            )
    return buffer.getvalue().encode("utf-8")


def has_positions(result: JobResult) -> bool:
    return any(p.positions is not None for p in result.prompts)


def position_csv_rows(result: JobResult) -> Iterator[bytes]:
    """The CSV of a per-position result, one prompt at a time: the text of the whole table never exists at once."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(POSITION_CSV_COLUMNS)
    yield buffer.getvalue().encode("utf-8")
    n_components = len(result.components)
    for prompt in result.prompts:
        columns = prompt.positions
        if columns is None:
            continue
        buffer.seek(0)
        buffer.truncate()
        arrays = [array("f", getattr(columns, name)) for name in POSITION_MEASURES]
        clean, gap = array("f", columns.clean_metric), array("f", columns.top2_gap)
        text = neutralise(prompt.prompt)
        optional = [None if getattr(columns, name) is None else array("f", getattr(columns, name))
                    for name in OPTIONAL_POSITION_MEASURES]
        n_positions = len(columns.positions)
        for p, (position, target) in enumerate(zip(columns.positions, columns.target_ids, strict=True)):
            for c, component in enumerate(result.components):
                at = c * n_positions + p
                writer.writerow(
                    (prompt.index, text, position, target, neutralise(component),
                     *(repr(values[at]) for values in arrays), repr(clean[p]), repr(gap[p]),
                     *("" if values is None else repr(values[at]) for values in optional))
                )
        assert all(len(values) == n_components * n_positions for values in arrays)
        yield buffer.getvalue().encode("utf-8")
