"""The one CSV format of a JobResult, written by the API (`GET …/result?format=csv`) and the CLI
(`hydra-ablate result --format csv`) alike: same columns, UTF-8, CRLF rows (RFC 4180).

One row per prompt × component (prompt-major, components in the result's order). Floats are written with Python's
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

from service.schemas import JobResult

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
)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """A text cell a spreadsheet will not evaluate: `'` before a leading formula character."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def to_csv(result: JobResult) -> bytes:
    """The result as CSV bytes (see the module doc)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for prompt in result.prompts:
        index = prompt.index  # its place in the job: only_correct jobs leave prompts out
        text, token = neutralise(prompt.prompt), neutralise(prompt.target_token)
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
                )
            )
    return buffer.getvalue().encode("utf-8")
