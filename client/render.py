"""How results, jobs and models look in a terminal (rich tables) and in a spreadsheet (CSV).

Pure functions of the wire types, no I/O, so the CLI, notebooks and the tests render exactly the same thing.
The column meanings are those of docs/definitions.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from service.result_csv import to_csv
from service.schemas import JobPage, JobResult, JobStatus, ModelInfo, Regression

STATUS_STYLES = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}


def _pm(mean: float, se: float) -> str:
    return f"{mean:+.3f} ±{se:.3f}"


def _num(value: float | None, spec: str = "+.3f") -> str:
    return "—" if value is None else format(value, spec)


def _fit(regression: Regression) -> str:
    if regression.slope is None:
        return "no spread"
    return f"slope {regression.slope:+.3f}, R² {_num(regression.r2, '.3f')}, n={regression.n}"


def result_table(result: JobResult) -> Table:
    """One row per ablated component: DE and TE (mean ± SE over prompts) and how the compensation splits.

    compensation = DE − TE = attn + mlp + norm, where attn/mlp sum the downstream responses of each kind and
    norm is the final norm's share; slope and R² fit compensation on DE across prompts (the Hydra signature is
    a positive slope: the more a component matters directly, the more the rest of the network repairs).
    """
    summary = result.summary
    spec = result.provenance.spec
    table = Table(
        title=f"{result.model}: {spec.ablation} ablation, {spec.metric}, {summary.n_prompts} prompts",
        caption=(
            f"TE on DE across components: {_fit(summary.total_vs_direct)}. "
            f"Near ties (top-2 gap small): {summary.near_ties}. compensation = DE − TE = attn + mlp + norm."
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,  # no vertical rules: the nine columns fit about 100 characters
    )
    table.add_column("component", style="bold", no_wrap=True)
    for name in ("DE ±SE", "TE ±SE", "comp ±SE", "attn", "mlp", "norm", "slope", "R²"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in summary.components:
        fit = row.compensation_vs_direct
        table.add_row(
            row.component,
            _pm(row.direct_effect_mean, row.direct_effect_se),
            _pm(row.total_effect_mean, row.total_effect_se),
            _pm(row.compensation_mean, row.compensation_se),
            _num(row.compensation_attn_mean),
            _num(row.compensation_mlp_mean),
            _num(row.norm_response_mean),
            _num(fit.slope),
            _num(fit.r2, ".3f"),
        )
    return table


def result_csv(result: JobResult) -> str:
    """The API's CSV of the result (service/result_csv.py: one format for both), as text with CRLF rows."""
    return to_csv(result).decode("utf-8")


def models_table(models: Sequence[ModelInfo]) -> Table:
    table = Table(title="Models served by the workers")
    table.add_column("id", style="bold")
    table.add_column("architecture")
    for name in ("layers", "heads", "kv heads", "d_model", "vocab"):
        table.add_column(name, justify="right")
    table.add_column("blocks")
    table.add_column("source", overflow="fold")
    for info in models:
        table.add_row(
            info.id,
            info.architecture,
            str(info.n_layers),
            str(info.n_heads),
            str(info.n_kv_heads),
            str(info.d_model),
            str(info.vocab_size),
            "parallel" if info.parallel_blocks else "sequential",
            info.source,
        )
    return table


def _state(status: JobStatus) -> str:
    return f"[{STATUS_STYLES.get(status.status, 'white')}]{status.status}[/]"


def status_table(status: JobStatus) -> Table:
    """A job as key/value rows: what `hydra-ablate status` prints."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("id", status.id)
    table.add_row("status", _state(status))
    table.add_row("model", status.model)
    table.add_row("progress", f"{status.progress.done}/{status.progress.total} ablations")
    table.add_row("created", status.created_at)
    table.add_row("started", status.started_at or "—")
    table.add_row("finished", status.finished_at or "—")
    if status.error:
        table.add_row("error", f"[red]{status.error}[/]")
    return table


def jobs_table(page: JobPage) -> Table:
    last = page.offset + len(page.items)
    title = f"Jobs {page.offset + 1}–{last} of {page.total}" if page.items else f"No jobs (total {page.total})"
    table = Table(title=title)
    for name in ("id", "status", "model", "progress", "created", "error"):
        table.add_column(name, justify="right" if name == "progress" else "left")
    for status in page.items:
        table.add_row(
            status.id,
            _state(status),
            status.model,
            f"{status.progress.done}/{status.progress.total}",
            status.created_at,
            status.error or "",
        )
    return table


def job_progress(**kwargs: object) -> Progress:
    """The bar `submit --wait` and `demo` show: ablations done of total, with elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        **kwargs,  # type: ignore[arg-type]
    )
