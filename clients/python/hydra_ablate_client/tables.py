"""A JobResult as tables: plain columns (dict of lists), pandas DataFrames or Arrow tables. No torch, no HTTP.

Written against the result's attributes only, so it serves the server (Parquet export) and the client alike.

Tables
  long            one row per prompt × component: prompt_index, prompt, target_id, target_token, clean_metric,
                  top2_gap, near_tie, the dataset fields (relation, subject, answer, dataset_index) when the
                  prompts came from a dataset, component, kind, layer, head (a knockout set: kind "knockout",
                  no layer or head), then every per-component measure
                  (total_effect, direct_effect, compensation, norm_response, and any the server adds), then the
                  attribution-patching estimates (atp, atp_qkfix, atp_star and abs_total_effect, what atp_star
                  is compared with; empty for jobs without estimates)
  summary         one row per component: its means, standard errors and the compensation-vs-direct regression
                  (flattened: compensation_vs_direct_slope, …)
  response        one row per prompt × ablated component × downstream component: the response matrix, long
  response_mean   the summary's mean response matrix, long: component, response_component, response
  prompts         one row per prompt: its scalar fields and dataset fields
  all_estimates   jobs with `verify`: one row per prompt × every component of the job (not only the verified ones):
                  prompt_index, component, kind, layer, head, atp, atp_qkfix, atp_star (PromptResult.all_estimates);
                  no rows for other jobs

A patching job's result has its own long, summary and prompts (pairs) tables: hydra_ablate_client/patch_tables.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, get_args

from hydra_ablate_client.patch_tables import is_patching, patch_table
from hydra_ablate_client.vocabulary import component_columns

TableName = Literal["long", "summary", "response", "response_mean", "prompts", "all_estimates"]
TABLES: tuple[TableName, ...] = get_args(TableName)
Columns = dict[str, list[Any]]

# Per-prompt lists that are not indexed by component.
_NOT_PER_COMPONENT = frozenset({"sources", "response", "clean_direct_effect", "warnings"})
PROMPT_SCALARS = ("target_id", "target_token", "clean_metric", "top2_gap", "near_tie")
DATASET_COLUMNS = ("relation", "subject", "answer", "dataset_index")
# The estimates of PromptResult.all_estimates (jobs with verify: every component, not only the verified ones).
ALL_ESTIMATE_METHODS = ("atp", "atp_qkfix", "atp_star")
# PromptResult.estimates, one column each after the measures: None (an empty cell) for jobs without estimates and for
# a method the job did not ask for, so every long table has the same columns.
ESTIMATE_COLUMNS = (*ALL_ESTIMATE_METHODS, "abs_total_effect")


def _fields(value: Any) -> tuple[str, ...]:
    return tuple(getattr(value, "__struct_fields__", ()))


def per_component_measures(result: Any) -> list[str]:
    """The per-prompt fields holding one number per component, in the result's field order."""
    if not result.prompts:
        return ["total_effect", "direct_effect", "compensation", "norm_response"]
    first = result.prompts[0]
    n = len(result.components)
    return [
        name
        for name in _fields(first)
        if name not in _NOT_PER_COMPONENT
        and isinstance(getattr(first, name), list)
        and len(getattr(first, name)) == n
    ]


def dataset_fields(result: Any) -> list[Any] | None:
    """The per-prompt dataset records (relation, subject, answer) when the job named a dataset."""
    spec = getattr(getattr(result, "provenance", None), "spec", None)
    if spec is None:
        return None
    fields = getattr(spec, "prompt_fields", None)
    # One record per prompt of the job; a result may measure only some of them (only_correct): look up by index.
    return list(fields) if fields and len(fields) == len(spec.prompts) else None


def prompt_index(prompt: Any, position: int) -> int:
    """The prompt's index in the job (results of only_correct jobs leave prompts out); older results: position."""
    index = getattr(prompt, "index", None)
    return position if index is None else int(index)


def _prompt_columns(result: Any, with_dataset: bool) -> list[str]:
    columns = ["prompt_index", "prompt", *PROMPT_SCALARS]
    return [*columns, *DATASET_COLUMNS] if with_dataset else columns


def _prompt_values(index: int, prompt: Any, record: Any | None) -> list[Any]:
    values = [index, prompt.prompt, *(getattr(prompt, name) for name in PROMPT_SCALARS)]
    if record is not None:
        values += [getattr(record, name) for name in DATASET_COLUMNS]
    return values


def long_column_names(result: Any) -> list[str]:
    base = _prompt_columns(result, dataset_fields(result) is not None)
    return [*base, "component", "kind", "layer", "head", *per_component_measures(result), *ESTIMATE_COLUMNS]


def estimate_lists(prompt: Any) -> list[list[float] | None]:
    """The prompt's ESTIMATE_COLUMNS lists (None for each when it has no estimates)."""
    estimates = getattr(prompt, "estimates", None)
    return [None if estimates is None else getattr(estimates, name) for name in ESTIMATE_COLUMNS]


def iter_long(result: Any, start: int = 0, stop: int | None = None) -> Iterator[list[Any]]:
    """Rows of the long table for prompts start:stop, in long_column_names order."""
    records = dataset_fields(result)
    measures = per_component_measures(result)
    parsed = [component_columns(name) for name in result.components]
    for index in range(start, len(result.prompts) if stop is None else stop):
        prompt = result.prompts[index]
        job_index = prompt_index(prompt, index)
        head = _prompt_values(job_index, prompt, None if records is None else records[job_index])
        lists = [getattr(prompt, name) for name in measures]
        estimates = estimate_lists(prompt)
        for c, name in enumerate(result.components):
            yield [*head, name, *parsed[c], *(values[c] for values in lists),
                   *(None if values is None else values[c] for values in estimates)]


def _columns(names: list[str], rows: Iterator[list[Any]]) -> Columns:
    columns: Columns = {name: [] for name in names}
    for row in rows:
        for name, value in zip(names, row, strict=True):
            columns[name].append(value)
    return columns


def long_table(result: Any) -> Columns:
    return _columns(long_column_names(result), iter_long(result))


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if _fields(value):
        for name in _fields(value):
            _flatten(f"{prefix}_{name}" if prefix else name, getattr(value, name), into)
    elif not isinstance(value, list):
        into[prefix] = value


def summary_table(result: Any) -> Columns:
    rows = []
    for item in result.summary.components:
        row: dict[str, Any] = {}
        kind, layer, head = component_columns(item.component)
        _flatten("", item, row)
        row = {"component": row.pop("component"), "kind": kind, "layer": layer, "head": head, **row}
        rows.append(row)
    names = list(rows[0]) if rows else ["component", "kind", "layer", "head"]
    return {name: [row.get(name) for row in rows] for name in names}


def response_table(result: Any) -> Columns:
    columns: Columns = {name: [] for name in ("prompt_index", "component", "response_component", "response")}
    for position, prompt in enumerate(result.prompts):
        index = prompt_index(prompt, position)
        for c, name in enumerate(result.components):
            for b, basis in enumerate(result.response_basis):
                columns["prompt_index"].append(index)
                columns["component"].append(name)
                columns["response_component"].append(basis)
                columns["response"].append(prompt.response[c][b])
    return columns


def response_mean_table(result: Any) -> Columns:
    columns: Columns = {name: [] for name in ("component", "response_component", "response")}
    for c, name in enumerate(result.components):
        for b, basis in enumerate(result.response_basis):
            columns["component"].append(name)
            columns["response_component"].append(basis)
            columns["response"].append(result.summary.response_matrix[c][b])
    return columns


def prompts_table(result: Any) -> Columns:
    records = dataset_fields(result)
    names = _prompt_columns(result, records is not None)
    indices = [prompt_index(p, position) for position, p in enumerate(result.prompts)]
    rows = (
        _prompt_values(i, p, None if records is None else records[i])
        for i, p in zip(indices, result.prompts, strict=True)
    )
    return _columns(names, rows)


def estimated_components(result: Any) -> list[str]:
    """Every component a job with `verify` estimated, in the order of its prompts' `all_estimates` (else [])."""
    attribution = getattr(result.summary, "attribution", None)
    verification = getattr(attribution, "verification", None)
    return list(verification.components) if verification is not None else []


def all_estimates_table(result: Any) -> Columns:
    components = estimated_components(result)
    parsed = [component_columns(name) for name in components]
    names = ["prompt_index", "component", "kind", "layer", "head", *ALL_ESTIMATE_METHODS]
    rows = (
        [prompt_index(prompt, position), name, *parsed[c],
         *(None if getattr(every, m) is None else getattr(every, m)[c] for m in ALL_ESTIMATE_METHODS)]
        for position, prompt in enumerate(result.prompts)
        if (every := getattr(prompt, "all_estimates", None)) is not None
        for c, name in enumerate(components)
    )
    return _columns(names, rows)


_BUILDERS = {
    "long": long_table,
    "summary": summary_table,
    "response": response_table,
    "response_mean": response_mean_table,
    "prompts": prompts_table,
    "all_estimates": all_estimates_table,
}


def table(result: Any, name: TableName = "long") -> Columns:
    if is_patching(result):  # a patching job: pairs × sites × positions (hydra_ablate_client/patch_tables.py)
        return patch_table(result, name)
    if name not in _BUILDERS:
        raise ValueError(f"unknown table {name!r}; tables are {', '.join(TABLES)}")
    return _BUILDERS[name](result)


def to_pandas(result: Any, name: TableName = "long") -> Any:
    """The table as a pandas DataFrame (`pip install hydra-ablate-client[pandas]`)."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("to_pandas needs pandas: pip install 'hydra-ablate-client[pandas]'") from exc
    frame = pd.DataFrame(table(result, name))
    integers = ("layer", "head", "dataset_index", *(("position",) if is_patching(result) else ()))
    for column in integers:  # absent for some rows: nullable integers, not floats
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    return frame


def to_arrow(result: Any, name: TableName = "long") -> Any:
    """The table as a pyarrow.Table (`pip install hydra-ablate-client[arrow]`)."""
    try:
        import pyarrow as pa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("to_arrow needs pyarrow: pip install 'hydra-ablate-client[arrow]'") from exc
    return pa.table(table(result, name))
