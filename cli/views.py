"""How results, jobs and models look in a terminal (rich tables) and in a spreadsheet (CSV).

Pure functions of the wire types, no I/O, so the CLI, notebooks and the tests render exactly the same thing.
The column meanings are those of docs/concepts/definitions.md.

Every table is built for a width (the terminal's, or `COLUMNS`): its columns come in three levels (always, by
default, `--wide` only); the default ones that do not fit are left out (the caption says which), and when even the
essential ones do not fit, each row is stacked as a block of `name value` lines. Job ids and component names are
never wrapped or cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group, RenderableType
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
from rich.text import Text

from cli.estimate_views import attribution_lines, error_lines
from cli.patch_views import patch_result_view
from hydra_ablate_client.wire import (
    ComponentSummary,
    Fit,
    JobPage,
    JobResult,
    JobStatus,
    ModelInfo,
    Regression,
    Summary,
)
from service.rendering.result_csv import to_csv

STATUS_STYLES = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}
ALWAYS, DEFAULT, WIDE = 0, 1, 2  # column levels
_MEASURE = Console(width=100_000, no_color=True)

# What a Regression's y and x name, as a reader of the paper says it (docs/concepts/definitions.md).
QUANTITY_LABELS = {
    "compensatory_effect": "CE",
    "compensatory_effect.attn": "CE(attn)",
    "compensatory_effect.mlp": "CE(mlp)",
    "unembed_effect": "Δunembed",
    "direct_effect": "DE",
    "total_effect": "TE",
    "compensation": "compensation",
    "total_effect.mean": "mean TE",
    "direct_effect.mean": "mean DE",
}


def quantity(name: str) -> str:
    """'compensatory_effect' -> 'CE'; 'response[mlp.5]' -> 'response of mlp.5'."""
    if name.startswith("response[") and name.endswith("]"):
        return f"response of {name[len('response['):-1]}"
    return QUANTITY_LABELS.get(name, name)


def regression_label(regression: Regression) -> str:
    """What a regression regresses on what: 'CE on Δunembed', 'compensation on DE'."""
    return f"{quantity(regression.y)} on {quantity(regression.x)}"


@dataclass(frozen=True)
class Column:
    header: str
    level: int = ALWAYS
    justify: str = "left"
    key: bool = False  # the row's identity (a job id, a component name): bold, never wrapped or cut


def _pm(mean: float, se: float) -> str:
    return f"{mean:+.3f} ±{se:.3f}"


def _num(value: float | None, spec: str = "+.3f") -> str:
    return "—" if value is None else format(value, spec)


def _fit(regression: Regression) -> str:
    if regression.slope is None:
        return "no spread"
    return f"slope {regression.slope:+.3f}, R² {_num(regression.r2, '.3f')}, n={regression.n}"


def _table(columns: Sequence[Column], rows: Sequence[Sequence[str]], title: str | None,
           caption: str | None) -> Table:
    table = Table(
        title=title,
        caption=caption,
        caption_justify="left",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,  # no blank margin left and right: two more characters for the columns
        collapse_padding=True,  # two spaces between columns, not three
    )
    for column in columns:
        table.add_column(
            column.header,
            justify=column.justify,  # type: ignore[arg-type]
            style="bold" if column.key else None,
            no_wrap=column.key,
            overflow="ignore" if column.key else "fold",
        )
    for row in rows:
        table.add_row(*row)
    return table


def natural_width(renderable: RenderableType) -> int:
    """The width a renderable takes when nothing has to wrap."""
    return _MEASURE.measure(renderable).maximum


def _stacked(columns: Sequence[Column], rows: Sequence[Sequence[str]], title: str | None, caption: str | None,
             width: int) -> Group:
    """Each row as a block: its key on a line of its own, then `header value` pairs filling lines of `width`."""
    parts: list[RenderableType] = []
    if title:
        parts.append(Text(title, style="italic"))
    for row in rows:
        key = [Text.from_markup(cell, style="bold") for cell, column in zip(row, columns, strict=True) if column.key]
        pairs = [
            Text.assemble((column.header, "dim"), " ", Text.from_markup(cell))
            for cell, column in zip(row, columns, strict=True)
            if not column.key and Text.from_markup(cell).plain.strip()
        ]
        parts.append(Text(" ").join(key) if key else Text(""))
        line = Text("  ")
        for pair in pairs:
            if line.cell_len > 2 and line.cell_len + 3 + pair.cell_len > width:
                parts.append(line)
                line = Text("  ")
            line.append_text(Text("   ") if line.cell_len > 2 else Text(""))
            line.append_text(pair)
        if line.cell_len > 2:
            parts.append(line)
    if caption:
        parts.append(Text(caption, style="dim"))
    return Group(*parts)


def fitted(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = None,
    wide: bool = False,
    title: str | None = None,
    caption: str | None = None,
) -> RenderableType:
    """A table for `width` columns (None: as wide as it needs): see the module's docstring."""
    levels = WIDE if wide else DEFAULT
    chosen = [i for i, column in enumerate(columns) if column.level <= levels]

    def build(indices: list[int], note: str | None = None) -> Table:
        text = " ".join(part for part in (caption, note) if part) or None
        return _table([columns[i] for i in indices], [[row[i] for i in indices] for row in rows], title, text)

    table = build(chosen)
    if wide or width is None or natural_width(table) <= width:
        return table
    essential = [i for i in chosen if columns[i].level == ALWAYS]
    if natural_width(build(essential)) > width:
        return _stacked([columns[i] for i in chosen], [[row[i] for i in chosen] for row in rows], title, caption,
                        width)
    kept = list(essential)
    for index in (i for i in chosen if columns[i].level > ALWAYS):  # each optional column, in order, if it fits
        trial = sorted([*kept, index])
        if natural_width(build(trial)) <= width:
            kept = trial
    hidden = ", ".join(columns[i].header for i in chosen if i not in kept)
    return build(kept, f"(Not shown at this width: {hidden}; --wide shows every column.)" if hidden else None)


# --- results -------------------------------------------------------------------------------------------------------

# (field of ComponentSummary, level) of the regressions listed per component; --wide lists all of them.
_REGRESSIONS = (
    ("ce_vs_unembed", DEFAULT),  # the paper's Fig. 7
    ("compensation_vs_direct", DEFAULT),
    ("ce_vs_direct", WIDE),
    ("ce_attn_vs_unembed", WIDE),
    ("ce_mlp_vs_unembed", WIDE),
    ("ce_attn_vs_direct", WIDE),
    ("ce_mlp_vs_direct", WIDE),
)


def _ci(regression: Regression) -> str:
    if not isinstance(regression, Fit) or regression.slope_ci_low is None or regression.slope_ci_high is None:
        return "—"
    return f"[{regression.slope_ci_low:+.2f}, {regression.slope_ci_high:+.2f}]"


def _means(result: JobResult, width: int | None, wide: bool) -> RenderableType:
    columns = [
        Column("component", key=True),
        Column("DE ±SE", justify="right"),
        Column("TE ±SE", justify="right"),
        Column("removed", DEFAULT, "right"),
        Column("comp ±SE", DEFAULT, "right"),
        Column("attn", DEFAULT, "right"),
        Column("mlp", DEFAULT, "right"),
        Column("norm", DEFAULT, "right"),
        Column("Δunembed ±SE", WIDE, "right"),
        Column("CE ±SE", WIDE, "right"),
        Column("Δ̃unembed(k,k)", WIDE, "right"),
        Column("corr(Δunembed,TE)", WIDE, "right"),
        Column("Δunembed>TE", WIDE, "right"),
    ]
    rows = [
        [
            row.component,
            _pm(row.direct_effect_mean, row.direct_effect_se),
            _pm(row.total_effect_mean, row.total_effect_se),
            removed_share(row),
            _pm(row.compensation_mean, row.compensation_se),
            _num(row.compensation_attn_mean),
            _num(row.compensation_mlp_mean),
            _num(row.norm_response_mean),
            _pm(row.unembed_effect_mean, row.unembed_effect_se),
            _pm(row.compensatory_effect_mean, row.compensatory_effect_se),
            "—" if row.ablated_unembed_effect_mean is None else _num(row.ablated_unembed_effect_mean),
            _num(row.unembed_drop_correlation),
            _num(row.unembed_exceeds_drop_share, ".0%"),
        ]
        for row in result.summary.components
    ]
    return fitted(
        columns, rows, width=width, wide=wide,
        title="Means over prompts (removed: share of Δunembed the ablation removed, ! weak; "
        "comp = DE − TE = attn + mlp + norm)",
    )


def removed_share(row: ComponentSummary) -> str:
    """The share of Δunembed the ablation removed, marked `!` where it is below the summary's threshold."""
    if row.unembed_removed_share is None:
        return "—"
    return f"{row.unembed_removed_share:.0%}" + ("!" if row.weak_ablation else "")


def regressions(components: Sequence[ComponentSummary], wide: bool = False) -> list[tuple[str, Regression]]:
    """(component, regression) pairs in the order the table lists them."""
    level = WIDE if wide else DEFAULT
    pairs = []
    for row in components:
        for name, at in _REGRESSIONS:
            regression = getattr(row, name, None)
            if at <= level and regression is not None:
                pairs.append((row.component, regression))
    return pairs


def _regressions(result: JobResult, width: int | None, wide: bool) -> RenderableType:
    columns = [
        Column("component", key=True),
        Column("regression (y on x)"),
        Column("slope", justify="right"),
        Column("95% CI", DEFAULT, "right"),
        Column("R²", DEFAULT, "right"),
        Column("n", DEFAULT, "right"),
        Column("intercept", WIDE, "right"),
    ]
    rows = [
        [
            component,
            regression_label(regression),
            _num(regression.slope),
            _ci(regression),
            _num(regression.r2, ".3f"),
            str(regression.n),
            _num(regression.intercept),
        ]
        for component, regression in regressions(result.summary.components, wide)
    ]
    return fitted(columns, rows, width=width, wide=wide, title="Regressions across prompts, per component")


def _self_repair(result: JobResult, width: int | None, wide: bool) -> RenderableType | None:
    items = result.summary.self_repair
    if not items:
        return None
    share = result.summary.top_fraction
    columns = [
        Column("component", key=True),
        Column("pairs", justify="right"),
        Column("self-repair ±SE", justify="right"),
        Column("DE", DEFAULT, "right"),
        Column("TE", DEFAULT, "right"),
        Column("heads", WIDE, "right"),
        Column("mlps", WIDE, "right"),
        Column("norm", WIDE, "right"),
        Column("norm share", WIDE, "right"),
    ]
    rows = [
        [
            item.component,
            str(item.n_pairs),
            _pm(item.self_repair_mean, item.self_repair_se),
            _num(item.direct_effect_mean),
            _num(item.total_effect_mean),
            _num(item.heads_mean),
            _num(item.mlps_mean),
            _num(item.norm_mean),
            _num(item.norm_share, ".0%"),
        ]
        for item in items
    ]
    top = f"top {share:.0%} of " if share is not None else ""
    return fitted(columns, rows, width=width, wide=wide,
                  title=f"Self-repair (DE − TE) over each component's {top}(prompt, position) pairs by DE")


def _erasure(result: JobResult, width: int | None) -> RenderableType | None:
    fits = result.summary.erasure
    if not fits:
        return None
    columns = [
        Column("ablated", key=True),
        Column("regression (y on x)"),
        Column("slope", justify="right"),
        Column("R²", justify="right"),
        Column("clean DE", justify="right"),
        Column("response", justify="right"),
    ]
    rows = [
        [item.ablated, regression_label(item.fit), _num(item.fit.slope), _num(item.fit.r2, ".3f"),
         _num(item.clean_direct_effect_mean), _num(item.response_mean)]
        for item in fits
    ]
    return fitted(columns, rows, width=width, wide=True, title="Erasure: downstream MLP responses (--wide)")


def summary_lines(result: JobResult) -> list[str]:
    """The job-wide summary, one labelled line each."""
    summary = result.summary
    spec = result.provenance.spec
    lines = [f"{result.model}: {spec.ablation} ablation, {spec.metric}, {summary.n_prompts} prompts"]
    lines += paper_lines(summary)
    lines += estimate_lines(summary)
    selection = summary.selection
    if selection.only_correct:
        lines.append(f"only_correct: {selection.n_kept} of {selection.n_candidates} prompts answered correctly")
    lines.append(f"{regression_label(summary.total_vs_direct)} across components: {_fit(summary.total_vs_direct)}")
    ties = f"pairs {summary.near_ties}" if summary.n_pairs is not None else f"{summary.near_ties}"
    lines.append(f"near ties (top-2 gap small): {ties}")
    return lines


def paper_lines(summary: Summary) -> list[str]:
    """The paper's statistic first: CE on Δunembed per component (how many slopes lie wholly in (0, 1), the best
    fit), then the ablations' efficacy (how many removed less than the threshold of Δunembed, the weakest named).
    Each line fits 80 columns."""
    lines = []
    # Components whose CE cannot vary (the last MLP: nothing downstream) have no R² and are left out of the count.
    fits = [(c.component, c.ce_vs_unembed) for c in summary.components
            if c.ce_vs_unembed is not None and c.ce_vs_unembed.r2 is not None]
    if fits:
        partial = [name for name, fit in fits if fit.slope_in_unit_interval]
        best = max(fits, key=lambda item: item[1].r2 if item[1].r2 is not None else -1.0)
        lines.append(f"CE on Δunembed (paper's Fig. 7): slope CI within (0, 1) for {len(partial)} of {len(fits)}")
        lines.append(f"  best fit {best[0]}: slope {_num(best[1].slope, '+.2f')} {_ci(best[1])}, "
                     f"R² {_num(best[1].r2, '.2f')}")
    if summary.efficacy_threshold is not None:
        rated = [c for c in summary.components if c.weak_ablation is not None]
        weak = sorted((c for c in rated if c.weak_ablation), key=lambda c: c.unembed_removed_share or 0.0)
        threshold = f"{summary.efficacy_threshold:.0%}"
        if weak:
            lines.append(f"ablation efficacy: {len(weak)} of {len(rated)} rated removed < {threshold} of Δunembed "
                         "(! below)")
            named = ", ".join(f"{c.component} {c.unembed_removed_share:.0%}" for c in weak[:4])
            lines.append(f"  weakest: {named}" + (f" (+{len(weak) - 4})" if len(weak) > 4 else ""))
        elif rated:
            lines.append(f"ablation efficacy: all {len(rated)} rated removed ≥ {threshold} of Δunembed")
    return lines


def estimate_lines(summary: Summary) -> list[str]:
    """Jobs with estimates: per method its rank agreement with the exact effects, its recall of the exact top-k and
    how much faster than the exact engine it ran (its own work per prompt), then how much of each component's miss
    goes with the compensatory effect (cli/estimate_views.error_lines). Each line fits 80 columns."""
    block = summary.attribution
    if block is None:
        return []
    unit = "pair" if any(a.n_pairs is not None for a in block.agreement) else "prompt"  # per-position: (prompt, q)
    lines = attribution_lines(block, unit)
    if block.verification is not None:  # estimates first: the agreement covers the verified components only
        v = block.verification
        lines.append(f"  verified {len(v.verified)} of {len(v.components)} components exactly; agreement over those")
        lines.append(f"  (the top {v.top} by |mean {v.ranked_by}|, {v.random} more drawn with seed {v.seed})")
    return lines + error_lines(block, unit)


def result_view(result: JobResult, width: int | None = None, wide: bool = False) -> Group:
    """What `hydra-ablate result` prints: the summary lines, the means, the labelled regressions (and, with
    --wide, every fit and the erasure table)."""
    if result.patching is not None:  # a patching job (cli/patch_views.py)
        return patch_result_view(result)
    parts: list[RenderableType] = [Text(line) for line in summary_lines(result)]
    tables = [_means(result, width, wide), _self_repair(result, width, wide)]
    if any(getattr(row, name, None) is not None for row in result.summary.components for name, _ in _REGRESSIONS):
        tables.append(_regressions(result, width, wide))
    if wide:
        tables.append(_erasure(result, width))
    for table in tables:
        if table is not None:
            parts += [Text(""), table]
    return Group(*parts)


def result_csv(result: JobResult) -> str:
    """The API's CSV of the result (service/rendering/result_csv.py: one format for both), as text with CRLF rows."""
    return to_csv(result).decode("utf-8")


# --- models and jobs -----------------------------------------------------------------------------------------------


def models_table(models: Sequence[ModelInfo], width: int | None = None, wide: bool = False) -> RenderableType:
    columns = [
        Column("id", key=True),
        Column("architecture"),
        Column("layers", justify="right"),
        Column("heads", justify="right"),
        Column("kv heads", DEFAULT, "right"),
        Column("dtype", DEFAULT),
        Column("device", DEFAULT),
        Column("source", DEFAULT),
        Column("family", WIDE),
        Column("d_model", WIDE, "right"),
        Column("vocab", WIDE, "right"),
        Column("blocks", WIDE),
        Column("device name", WIDE),
        Column("softcap", WIDE, "right"),
    ]
    rows = [
        [
            info.id,
            info.architecture,
            str(info.n_layers),
            str(info.n_heads),
            str(info.n_kv_heads),
            info.dtype,
            info.device,
            info.source,
            info.family,
            str(info.d_model),
            str(info.vocab_size),
            "parallel" if info.parallel_blocks else "sequential",
            info.device_name or "",
            "" if info.final_logit_softcap is None else f"{info.final_logit_softcap:g}",
        ]
        for info in models
    ]
    return fitted(columns, rows, width=width, wide=wide, title="Models served by the workers")


def _state(status: JobStatus) -> str:
    return f"[{STATUS_STYLES.get(status.status, 'white')}]{status.status}[/]"


def _progress(status: JobStatus) -> str:
    return f"{status.progress.done}/{status.progress.total}"


def status_table(status: JobStatus, width: int | None = None) -> RenderableType:
    """A job as key/value rows: what `hydra-ablate status` prints (long values wrap; the id is never cut: below
    about 44 columns each value goes on a line of its own under its name)."""
    prompts = status.progress
    rows = [
        ("id", status.id),
        ("status", _state(status)),
        ("phase", status.phase),
        ("model", status.model),
        ("progress", f"{_progress(status)} ablations, {prompts.prompts_done}/{prompts.prompts_total} prompts"),
        ("name", status.name or ""),
        ("tags", ", ".join(status.tags)),
        ("owner", status.owner or ""),
        ("created", status.created_at),
        ("started", status.started_at or "—"),
        ("finished", status.finished_at or "—"),
        ("note", status.note or ""),
        ("error", f"[red]{status.error}[/]" if status.error else ""),
    ]
    rows = [(label, value) for label, value in rows if value]
    label_width = max(len(label) for label, _ in rows)
    if width is not None and width < label_width + 2 + len(status.id):
        parts: list[RenderableType] = []
        for label, value in rows:
            parts += [Text(label, style="bold"), Text.assemble("  ", Text.from_markup(value))]
        return Group(*parts)
    table = Table(show_header=False, box=None, pad_edge=False, collapse_padding=True)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    return table


def _short_time(stamp: str | None) -> str:
    """'2025-01-02T03:04:05.678+00:00' -> '2025-01-02 03:04' (the full stamp with --wide)."""
    return "—" if not stamp else stamp[:16].replace("T", " ")


def jobs_table(page: JobPage, width: int | None = None, wide: bool = False) -> RenderableType:
    last = page.offset + len(page.items)
    title = f"Jobs {page.offset + 1}–{last} of {page.total}" if page.items else f"No jobs (total {page.total})"
    columns = [
        Column("id", key=True),
        Column("status"),
        Column("progress", justify="right"),
        Column("model", DEFAULT),
        Column("created", DEFAULT),
        Column("name", DEFAULT),
        Column("phase", WIDE),
        Column("tags", WIDE),
        Column("owner", WIDE),
        Column("finished", WIDE),
        Column("error", WIDE),
    ]
    rows = [
        [
            status.id,
            _state(status),
            _progress(status),
            status.model,
            status.created_at if wide else _short_time(status.created_at),
            status.name or "",
            status.phase,
            ", ".join(status.tags),
            status.owner or "",
            status.finished_at or "",
            status.error or "",
        ]
        for status in page.items
    ]
    return fitted(columns, rows, width=width, wide=wide, title=title)


def job_progress(**kwargs: object) -> Progress:
    """The bar `submit --wait`, `wait` and `demo` show: ablations done of total, with elapsed time and ETA."""
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
