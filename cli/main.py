"""`hydra-ablate`: run the local stack (`serve`, `demo`) and drive the API from a shell (submit, status, result, …).

Client commands read the server from --url / HYDRA_URL and the key from --api-key / HYDRA_API_KEY. Any failure
(an API error, an unreachable server, a bad spec file, a failed job) ends in one red line and exit code 1 rather
than a traceback: the message is the API's problem detail, which already says what to change.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar, get_args

import msgspec
import typer
import yaml
from rich.console import Console
from rich.text import Text

from cli.keys import keys_app
from cli.patch_options import PairsFileError, patch_options
from cli.views import (
    job_progress,
    jobs_table,
    models_table,
    natural_width,
    result_csv,
    result_view,
    status_table,
)
from hydra_ablate_client import vocabulary
from hydra_ablate_client.http import DEFAULT_URL, HydraClient, HydraError
from hydra_ablate_client.vocabulary import (
    AblationKind,
    CorpusName,
    DatasetName,
    FigureFormat,
    Intervention,
    MeasurePositions,
    MetricName,
    NormScaleMode,
    PairDatasetName,
    PatchDirection,
    PositionResponses,
    PositionScope,
    PresetName,
    ResampleFrom,
    ResampleSources,
    ResampleWithin,
    ResponseBasisName,
    TargetName,
)
from hydra_ablate_client.wire import JobRequest, JobResult, JobStatus
from service.core.redaction import install_log_redaction
from service.core.settings import env_text

log = logging.getLogger("hydra-ablate")
app = typer.Typer(
    help="Causal ablation experiments on transformer LMs (the Hydra effect) as a REST service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

DEFAULT_DATASET = "known_1000"
CORPUS_DEFAULT = "known_1000_text"
BUILTIN_MODEL = "smollm2-135m"


class Choice(enum.StrEnum):
    """Typer shows and checks Enum members as choices on every typer version; a test keeps them equal to the schema."""


def choices(name: str, values: object) -> Any:
    """A Choice enum whose members are the values of a Literal of hydra_ablate_client.vocabulary (one definition
    per list)."""
    # Enum's functional API, called on a member-less subclass: mypy models that API on Enum itself only.
    subclass: Callable[..., Any] = Choice
    return subclass(name, [(value, value) for value in get_args(values)])


if TYPE_CHECKING:  # type checkers see the Literals; Typer gets Enums, whose members it shows and checks
    Ablation = AblationKind
    Positions = PositionScope
    Metric = MetricName
    Preset = PresetName
    Dataset = DatasetName
    FigureName = vocabulary.FigureName
    FigureFormatChoice = FigureFormat
    NormScale = NormScaleMode
    ResampleFromChoice = ResampleFrom
    ResampleWithinChoice = ResampleWithin
    ResampleSourcesChoice = ResampleSources
    MeasureChoice = MeasurePositions
    Target = TargetName
    ResponseBasis = ResponseBasisName
    PositionResponsesChoice = PositionResponses
    Corpus = CorpusName
    InterventionChoice = Intervention
    Direction = PatchDirection
    PairDatasetChoice = PairDatasetName
else:
    Ablation = choices("Ablation", AblationKind)
    Positions = choices("Positions", PositionScope)
    Metric = choices("Metric", MetricName)
    Preset = choices("Preset", PresetName)
    Dataset = choices("Dataset", DatasetName)
    FigureName = choices("FigureName", vocabulary.FigureName)
    FigureFormatChoice = choices("FigureFormatChoice", FigureFormat)
    NormScale = choices("NormScale", NormScaleMode)
    ResampleFromChoice = choices("ResampleFromChoice", ResampleFrom)
    ResampleWithinChoice = choices("ResampleWithinChoice", ResampleWithin)
    ResampleSourcesChoice = choices("ResampleSourcesChoice", ResampleSources)
    MeasureChoice = choices("MeasureChoice", MeasurePositions)
    Target = choices("Target", TargetName)
    ResponseBasis = choices("ResponseBasis", ResponseBasisName)
    PositionResponsesChoice = choices("PositionResponsesChoice", PositionResponses)
    Corpus = choices("Corpus", CorpusName)
    InterventionChoice = choices("InterventionChoice", Intervention)
    Direction = choices("Direction", PatchDirection)
    PairDatasetChoice = choices("PairDatasetChoice", PairDatasetName)


class ResultFormat(Choice):  # the CLI's own list: a table, or the API's JSON or CSV
    table = "table"
    json = "json"
    csv = "csv"


P = ParamSpec("P")
R = TypeVar("R")


class CliFailure(Exception):
    """A failure to report as one line: a bad spec, a job that failed, a file that cannot be written."""


class Detached(Exception):
    """Ctrl-C while following a job: the job goes on on the server; say so and how to cancel it."""

    def __init__(self, job_id: str, base_url: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.base_url = base_url

    def cancel_command(self) -> str:
        url = "" if self.base_url.rstrip("/") == DEFAULT_URL else f" --url {self.base_url}"
        return f"hydra-ablate cancel {self.job_id}{url}"


# --- spec files and flags ------------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> dict[str, Any]:
    """A JobRequest document from a JSON or YAML file ('-' reads stdin); YAML unless the name ends in .json."""
    name = str(path)
    try:
        text = sys.stdin.read() if name == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliFailure(f"cannot read spec file {name}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if name.endswith(".json") else "YAML"
        raise CliFailure(f"spec file {name} is not valid {kind}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliFailure(f"spec file {name} must hold a mapping of JobRequest fields, not a {type(data).__name__}")
    return data


def split_components(value: str) -> list[str]:
    """'attn, mlp.3,head.2.1' -> ['attn', 'mlp.3', 'head.2.1']."""
    return [part.strip() for part in value.split(",") if part.strip()]


SOURCES = ("prompts", "dataset", "texts", "corpus")  # alternative sources of prompts: a job names one
CORPUS_PRESETS = frozenset({"rushing_nanda"})  # presets whose prompts come from a corpus (service/core/resolve.py)


def parse_metadata(items: list[str]) -> dict[str, Any]:
    """['run=3', 'note=first try', 'ok=true'] -> {'run': 3, 'note': 'first try', 'ok': True}.

    A value that reads as a JSON scalar is that scalar; anything else is text.
    """
    metadata: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliFailure(f"--meta takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        metadata[key] = value if value is None or isinstance(value, (str, int, float, bool)) else raw
    return metadata


def merge_request(
    spec: Mapping[str, Any],
    *,
    model: str | None = None,
    prompts: list[str] | None = None,
    components: list[str] | None = None,
    ablation: str | None = None,
    positions: str | None = None,
    metric: str | None = None,
    preset: str | None = None,
    dataset: str | None = None,
    limit: int | None = None,
    samples: int | None = None,
    seed: int | None = None,
    offset: int | None = None,
    relation: str | None = None,
    use_answers: bool | None = None,
    texts: list[str] | None = None,
    corpus: str | None = None,
    answers: list[str] | None = None,
    counterfactuals: list[str] | None = None,
    tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The spec file's fields overridden by the flags that were given.

    Prompts, texts, a dataset and a corpus are alternative prompt sources, so a flag for one drops the file's
    others (with the answers and counterfactuals that belonged to the file's prompts, unless flags give them).
    `--limit` / `--offset` slice the file's dataset or corpus, or the built-in dataset when there is none (the
    built-in corpus for a corpus preset). `options` are further JobRequest fields (None: not given).
    """
    request = dict(spec)
    simple = {
        "model": model,
        "components": components,
        "ablation": ablation,
        "positions": positions,
        "metric": metric,
        "preset": preset,
        "resample_samples": samples,
        "seed": seed,
        "answers": list(answers) if answers else None,
        "counterfactuals": list(counterfactuals) if counterfactuals else None,
        "tags": list(tags) if tags else None,
        **options,
    }
    slicing = {"limit": limit, "offset": offset}

    def has(values: Mapping[str, Any]) -> bool:
        return any(value is not None for value in values.values())

    dataset_only = {"relation": relation, "use_answers": use_answers}
    chosen = [
        name
        for name, given in (
            ("--prompt", bool(prompts)),
            ("--text", bool(texts)),
            ("--dataset/--relation/--use-answers", dataset is not None or has(dataset_only)),
            ("--corpus", corpus is not None),
        )
        if given
    ]
    if len(chosen) > 1:
        raise CliFailure(f"{' and '.join(chosen)} are alternatives: give one source of prompts")
    if chosen and chosen[0] in ("--prompt", "--text") and has(slicing):
        raise CliFailure("--limit/--offset slice a dataset or corpus, not --prompt/--text: give one source of prompts")

    def replace_source(key: str, value: Any) -> None:
        for name in (*SOURCES, "answers", "counterfactuals"):
            request.pop(name, None)
        request[key] = value

    if prompts:
        replace_source("prompts", list(prompts))
    elif texts:
        replace_source("texts", list(texts))
    elif chosen or has(slicing):
        current_preset = preset or request.get("preset")
        use_corpus = corpus is not None or (
            dataset is None and not chosen and "dataset" not in request
            and ("corpus" in request or current_preset in CORPUS_PRESETS)
        )
        key, default = ("corpus", CORPUS_DEFAULT) if use_corpus else ("dataset", DEFAULT_DATASET)
        name = corpus if use_corpus else dataset
        current = request.get(key)
        ref = dict(current) if isinstance(current, Mapping) else {}
        if name is not None and ref.get("name") not in (None, name):
            ref = {}  # another set: the file's slice and filters do not apply to it
        ref["name"] = name or ref.get("name") or default
        extra = slicing if use_corpus else {**slicing, **dataset_only}
        ref.update({k: v for k, v in extra.items() if v is not None})
        replace_source(key, ref)
    request.update({key: value for key, value in simple.items() if value is not None})
    if metadata:
        request["metadata"] = {**(request.get("metadata") or {}), **metadata}
    return request


def to_job_request(request: Mapping[str, Any]) -> JobRequest:
    """Check the request against the wire schema before sending, so typos fail locally with the field's path."""
    try:
        return msgspec.convert(dict(request), JobRequest)
    except msgspec.ValidationError as exc:
        raise CliFailure(f"invalid job request: {exc}") from exc


# --- shared plumbing -----------------------------------------------------------------------------------------------


def handled(command: Callable[P, R]) -> Callable[P, R]:
    """Turn expected failures into one red line and exit code 1 (130 on Ctrl-C), never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except Detached as detached:
            err.print(
                Text.assemble(
                    ("stopped following; ", "yellow"),
                    f"job {detached.job_id} goes on on the server. Cancel it with:\n  ",
                    (detached.cancel_command(), "bold"),
                ),
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            err.print(Text("interrupted", style="yellow"))
            raise typer.Exit(130) from None
        except (HydraError, CliFailure, TimeoutError, OSError) as exc:
            err.print(Text.assemble(("error: ", "bold red"), (_explain(exc), "red")), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _explain(exc: BaseException) -> str:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, HydraError) and exc.status in (401, 403):
        message += " (pass --api-key or set HYDRA_API_KEY)"
    return message


UrlOption = Annotated[
    str | None, typer.Option("--url", envvar="HYDRA_URL", help="API base URL (default http://127.0.0.1:8000)")
]
KeyOption = Annotated[str | None, typer.Option("--api-key", envvar="HYDRA_API_KEY", help="sent as X-API-Key")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print the API's JSON instead of a table")]
WideFlag = Annotated[
    bool, typer.Option("--wide", "-w", help="every column, however wide (default: what fits the terminal)")
]


def _text(choice: object) -> str:
    """A choice's value (Typer passes Enum members; the type checker sees the schema's Literal strings)."""
    return str(getattr(choice, "value", choice))


def _value(choice: object) -> str | None:
    return None if choice is None else _text(choice)


def output_width() -> int | None:
    """The width to fit: COLUMNS when set, else the terminal's; None when stdout is a file or pipe (no limit)."""
    columns = env_text("COLUMNS")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if out.is_terminal:
        return shutil.get_terminal_size().columns
    return None


def show(renderable: object, wide: bool = False) -> None:
    """Print what render.py built for output_width(); never narrower than it needs, so nothing is cut (with --wide,
    or on a file or pipe, lines may be longer than the terminal)."""
    width = output_width()
    needed = natural_width(renderable)  # type: ignore[arg-type]
    console = Console(
        width=max(width or 0, needed) if (wide or width is None) else width,
        force_terminal=out.is_terminal,
        no_color=not out.is_terminal or None,  # type: ignore[arg-type]
        highlight=False,
    )
    console.print(renderable)


def _print_json(value: object) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def follow(client: HydraClient, job_id: str, poll_s: float = 0.5, detach: bool = True) -> JobStatus:
    """Poll a job to its end behind a live progress bar (stderr, so stdout stays the job's output).

    Ctrl-C stops following, not the job: with `detach`, it raises Detached (the command then says how to cancel).
    """
    try:
        with job_progress(console=err) as bar:
            task = bar.add_task("queued", total=None)

            def update(status: JobStatus) -> None:
                total = status.progress.total or None
                bar.update(task, completed=status.progress.done, total=total, description=status.status)

            return client.wait(job_id, poll_s=poll_s, on_progress=update)
    except KeyboardInterrupt:
        if not detach:
            raise
        raise Detached(job_id, str(client.base_url)) from None


def require_success(status: JobStatus) -> None:
    if status.status != "succeeded":
        reason = f": {status.error}" if status.error else ""
        raise CliFailure(f"job {status.id} {status.status}{reason}")


def _write(path: Path, data: str | bytes) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8", newline="")  # as rendered: CSV keeps its CRLF rows
    except OSError as exc:
        raise CliFailure(f"cannot write {path}: {exc.strerror or exc}") from exc


def _setup_logging() -> None:
    from rich.logging import RichHandler

    install_log_redaction()  # REDIS_URL passwords never reach a log line
    handler = RichHandler(console=err, show_path=False, log_time_format="[%X]")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise


@contextlib.contextmanager
def stack_failures() -> Iterator[None]:
    """Stack raises RuntimeError when a child process dies: report it as a failure of the stack, not a bug."""
    try:
        yield
    except RuntimeError as exc:
        raise CliFailure(f"the local stack failed: {exc} (its log is above)") from exc


def _port_free(host: str, port: int) -> bool:
    from service.api.serve import port_is_free

    return port_is_free(host, port)


# --- commands ------------------------------------------------------------------------------------------------------


@app.command()
@handled
def serve(
    host: Annotated[str, typer.Option(help="interface the API listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Celery worker processes (one job at a time each)")] = 1,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for the workers to load models")] = 600,
    allow_remote_without_auth: Annotated[
        bool,
        typer.Option(
            "--allow-remote-without-auth",
            help="listen on a non-loopback --host although auth is off (REDIS_URL unset); also "
            "HYDRA_ALLOW_REMOTE_NO_AUTH=1",
        ),
    ] = False,
) -> None:
    """Run Redis (embedded unless REDIS_URL is set), the API and the workers until Ctrl-C or SIGTERM."""
    from cli.stack import Stack, check_exposure

    _setup_logging()
    try:
        check_exposure(host, dict(os.environ), allow_remote_without_auth)
    except ValueError as exc:
        raise CliFailure(str(exc)) from None
    if not _port_free(host, port):
        raise CliFailure(f"{host}:{port} is already in use; choose another with --port")
    stack = Stack(host=host, port=port, workers=workers)
    with stack_failures():
        try:
            stack.start(allow_remote_without_auth)
            stack.wait_ready(timeout_s=ready_timeout)
        except BaseException:
            stack.stop()
            raise
        log.info("ready: %s (OpenAPI at %s/schema); Ctrl-C stops", stack.api_url, stack.api_url)
        stack.run_until_signal()


@app.command()
@handled
def submit(
    spec_file: Annotated[str | None, typer.Argument(help="JobRequest as JSON or YAML ('-' for stdin)")] = None,
    model: Annotated[str | None, typer.Option(help="model id (see `hydra-ablate models`)")] = None,
    preset: Annotated[
        Preset | None, typer.Option(help="a named setup whose values fill the fields not given (hydra, rushing_nanda)")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="a prompt (repeatable)")] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="a document, measured at every position (repeatable)")
    ] = None,
    dataset: Annotated[Dataset | None, typer.Option(help="a built-in prompt set")] = None,
    corpus: Annotated[Corpus | None, typer.Option(help="a built-in corpus of documents")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use the dataset's (or corpus's) first N entries")] = None,
    offset: Annotated[int | None, typer.Option(min=0, help="skip the dataset's (or corpus's) first N entries")] = None,
    relation: Annotated[
        str | None, typer.Option(help="only dataset prompts of this Wikidata relation, e.g. P36")
    ] = None,
    use_answers: Annotated[
        bool | None, typer.Option("--use-answers", help="the dataset's answers as targets (not the clean top token)")
    ] = None,
    answer: Annotated[
        list[str] | None, typer.Option("--answer", help="per prompt, the text whose first token is the target")
    ] = None,
    counterfactual: Annotated[
        list[str] | None, typer.Option("--counterfactual", help="per prompt, the competing answer (logit_diff)")
    ] = None,
    components: Annotated[str | None, typer.Option(help="comma-separated, e.g. attn,mlp or attn.3,head.2.1")] = None,
    knockout: Annotated[
        list[str] | None,
        typer.Option(
            "--knockout",
            help="components ablated together in one run, comma-separated, e.g. attn.3,head.5.1 (repeatable: "
            "one set each); alone, only the sets are ablated. With --intervention patch: sites patched together "
            "from the source run, e.g. head.9.6,head.9.9",
        ),
    ] = None,
    ablation: Annotated[
        Ablation | None, typer.Option(help="replace outputs by another prompt's, the mean, or 0")
    ] = None,
    estimates: Annotated[
        str | None,
        typer.Option(
            help="attribution-patching estimates beside the exact effects, comma-separated: atp, atp_star "
            "(at every measured position in per-position jobs)"
        ),
    ] = None,
    verify: Annotated[
        str | None,
        typer.Option(
            help="with --estimates: estimate every component first, then ablate exactly only TOP[,RANDOM] of them "
            "(the TOP largest |mean estimate| and RANDOM more drawn with the seed), e.g. 20,10"
        ),
    ] = None,
    positions: Annotated[Positions | None, typer.Option(help="ablate at the final position or at every one")] = None,
    metric: Annotated[Metric | None, typer.Option(help="what is read on the target token")] = None,
    norm_scale: Annotated[
        NormScale | None, typer.Option(help="whose final-norm scale direct effects use: the clean or ablated run")
    ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="resample sources per prompt")] = None,
    resample_from: Annotated[
        ResampleFromChoice | None, typer.Option(help="resample sources: the next prompt or random ones")
    ] = None,
    resample_within: Annotated[
        ResampleWithinChoice | None,
        typer.Option(help="draw resample sources from the whole job or the prompt's dataset relation"),
    ] = None,
    resample_sources: Annotated[
        ResampleSourcesChoice | None,
        typer.Option(help="any prompt as a resample source, or only those whose clean top token is not the target"),
    ] = None,
    mean_reference: Annotated[
        Dataset | None, typer.Option(help="mean ablation: the dataset whose mean activation replaces outputs")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="seed of the random resample pairing")] = None,
    source_seeds: Annotated[
        int | None,
        typer.Option(min=1, max=16, help="independent draws of the random sources (seeds seed, seed+1, …)"),
    ] = None,
    keep_samples: Annotated[
        bool | None, typer.Option("--keep-samples", help="return every resample patch's TE, DE and layer profile")
    ] = None,
    only_correct: Annotated[
        bool | None,
        typer.Option("--only-correct", help="measure only prompts whose clean top token starts their answer"),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=2, max=4096, help="cut every prompt or text to its first N tokens")
    ] = None,
    measure_positions: Annotated[
        MeasureChoice | None, typer.Option(help="measure at the final position or at every position")
    ] = None,
    target: Annotated[
        Target | None, typer.Option(help="clean_top (the clean run's top token) or next_token (texts)")
    ] = None,
    response_basis: Annotated[
        ResponseBasis | None, typer.Option(help="downstream responses per layer, or per head and MLP")
    ] = None,
    position_responses: Annotated[
        PositionResponsesChoice | None,
        typer.Option(help="per-position jobs: split sums (heads/MLPs/norm) or the full response vector"),
    ] = None,
    intervention: Annotated[
        InterventionChoice | None, typer.Option(help="ablate components, or patch sites between paired prompts")
    ] = None,
    pairs: Annotated[
        str | None,
        typer.Option(
            "--pairs",
            help="patching: a JSON file of pairs [{clean, corrupted, answer, counterfactual}, …] (sets "
            "--intervention patch)",
        ),
    ] = None,
    pair_dataset: Annotated[
        PairDatasetChoice | None,
        typer.Option(help="patching: draw the pairs from a built-in paired dataset (--limit of them; sets "
                     "--intervention patch)"),
    ] = None,
    direction: Annotated[
        Direction | None, typer.Option(help="patching: denoise (clean into corrupted) or noise (the reverse)")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(min=0.0, help="patching: pairs whose two metrics differ by less get no score")
    ] = None,
    name: Annotated[str | None, typer.Option(help="a label for people (not unique)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="a label to filter jobs by (repeatable)")] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="KEY=VALUE metadata, VALUE a JSON scalar or text (repeatable)"),
    ] = None,
    callback_url: Annotated[
        str | None, typer.Option(help="where the final status is POSTed (signed webhook)")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="show progress, then the result table")] = False,
    wide: WideFlag = False,
    idempotency_key: Annotated[str | None, typer.Option(help="sent as Idempotency-Key")] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Submit a job from a spec file and/or flags (flags win); prints the job id."""
    spec = load_spec(spec_file) if spec_file else {}
    patching = _patch_options(_value(intervention), pairs, _value(pair_dataset), limit, _value(direction), epsilon)
    if pair_dataset is not None:
        limit = None  # --limit sizes the pair dataset, not a prompt dataset
    request = merge_request(
        spec,
        model=model,
        prompts=prompt,
        components=split_components(components) if components is not None else None,
        knockouts=[split_components(members) for members in knockout] if knockout else None,
        estimates=split_components(estimates) if estimates is not None else None,
        verify=None if verify is None else parse_verify(verify),
        ablation=_value(ablation),
        positions=_value(positions),
        metric=_value(metric),
        preset=_value(preset),
        dataset=_value(dataset),
        limit=limit,
        samples=samples,
        seed=seed,
        offset=offset,
        relation=relation,
        use_answers=use_answers,
        texts=text,
        corpus=_value(corpus),
        answers=answer,
        counterfactuals=counterfactual,
        tags=tag,
        metadata=parse_metadata(meta) if meta else None,
        norm_scale=_value(norm_scale),
        resample_from=_value(resample_from),
        resample_within=_value(resample_within),
        resample_sources=_value(resample_sources),
        mean_reference=None if mean_reference is None else {"name": _text(mean_reference)},
        source_seeds=source_seeds,
        keep_samples=keep_samples,
        only_correct=only_correct,
        max_tokens=max_tokens,
        measure_positions=_value(measure_positions),
        target=_value(target),
        response_basis=_value(response_basis),
        position_responses=_value(position_responses),
        name=name,
        callback_url=callback_url,
        **patching,
    )
    submit_and_show(request, url, api_key, idempotency_key, wait, wide)


def parse_verify(text: str) -> dict[str, int]:
    """`--verify TOP[,RANDOM]` as JobRequest.verify; the server checks the numbers against the job."""
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2):
        raise CliFailure(f"--verify {text!r}: give TOP or TOP,RANDOM as whole numbers, e.g. --verify 20,10")
    return {"top": numbers[0], "random": numbers[1] if len(numbers) == 2 else 0}


def _patch_options(
    intervention: str | None,
    pairs: str | None,
    pair_dataset: str | None,
    limit: int | None,
    direction: str | None,
    epsilon: float | None,
) -> dict[str, Any]:
    try:
        return patch_options(intervention, pairs, pair_dataset, limit, direction, epsilon)
    except PairsFileError as error:
        raise CliFailure(str(error)) from None


def submit_and_show(
    request: dict[str, Any], url: str | None, api_key: str | None, idempotency_key: str | None, wait: bool, wide: bool
) -> None:
    """Send the request and print the job id; with `wait`, follow the job and show its result table."""
    with HydraClient(url, api_key) as client:
        status = client.submit(to_job_request(request), idempotency_key=idempotency_key)
        out.print(status.id, highlight=False)
        if wait:
            final = follow(client, status.id)
            require_success(final)
            show(result_view(client.result(status.id), output_width(), wide), wide)


class WaitExit(enum.IntEnum):
    """`hydra-ablate wait`'s exit codes."""

    succeeded = 0
    failed = 1
    cancelled = 2


@app.command("wait")
@handled
def wait_job(
    job_id: str,
    poll: Annotated[float, typer.Option(min=0.05, help="seconds between polls")] = 0.5,
    show_result: Annotated[bool, typer.Option("--result", help="print the result table once it succeeded")] = False,
    wide: WideFlag = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Re-attach to a job: its progress bar until it ends, then its final status.

    Exit code 0 when it succeeded, 1 when it failed, 2 when it was cancelled; Ctrl-C stops following (130), not the job.
    """
    with HydraClient(url, api_key) as client:
        final = follow(client, job_id, poll_s=poll)
        show(status_table(final, output_width()))
        if final.status == "succeeded" and show_result:
            show(result_view(client.result(job_id), output_width(), wide), wide)
    if final.status != "succeeded":
        reason = f": {final.error}" if final.error else ""
        err.print(Text(f"job {final.id} {final.status}{reason}", style="red"), soft_wrap=True, highlight=False)
        raise typer.Exit(WaitExit[final.status] if final.status in WaitExit.__members__ else 1)


@app.command()
@handled
def status(job_id: str, as_json: JsonFlag = False, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """A job's state, phase, progress, labels and error."""
    with HydraClient(url, api_key) as client:
        job = client.status(job_id)
    if as_json:
        _print_json(job)
    else:
        show(status_table(job, output_width()))


@app.command()
@handled
def result(
    job_id: str,
    format: Annotated[ResultFormat, typer.Option("--format", "-f")] = ResultFormat.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
    wide: WideFlag = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """A finished job's result: summary tables, full JSON, or CSV (one row per prompt × component)."""
    with HydraClient(url, api_key) as client:
        job_result = client.result(job_id)
    if output is not None:
        _write(output, render_result(job_result, format.value, wide))
        err.print(f"wrote {output}", highlight=False)
    elif format.value == "table":
        show(result_view(job_result, output_width(), wide), wide)
    else:
        sys.stdout.write(render_result(job_result, format.value, wide))


def render_result(job_result: JobResult, format: str, wide: bool = False) -> str:
    """The result as text in one of the `result --format` choices (the tables without colour, for files)."""
    if format == "json":
        return msgspec.json.format(msgspec.json.encode(job_result), indent=2).decode() + "\n"
    if format == "csv":
        return result_csv(job_result)  # the API's format: CRLF rows, so files are written as bytes (see _write)
    view = result_view(job_result, None, wide)
    buffer = io.StringIO()
    Console(file=buffer, width=natural_width(view), no_color=True, force_terminal=False).print(view)
    return buffer.getvalue()


@app.command()
@handled
def figure(
    job_id: str,
    name: Annotated[FigureName, typer.Argument()],
    format: Annotated[FigureFormatChoice, typer.Option("--format", "-f")] = "png",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: JOB-NAME.FORMAT")] = None,
    width: Annotated[int | None, typer.Option(help="pixels (default 1200)")] = None,
    height: Annotated[int | None, typer.Option(help="pixels (default 800)")] = None,
    dpi: Annotated[int | None, typer.Option(help="dots per inch (default 100)")] = None,
    prompt: Annotated[int | None, typer.Option(help="profile: position in the result's prompts")] = None,
    component: Annotated[str | None, typer.Option(help="profile: the ablated component")] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Save one of a finished job's figures."""
    options = {"width": width, "height": height, "dpi": dpi, "prompt": prompt, "component": component}
    with HydraClient(url, api_key) as client:
        try:
            data = client.figure(job_id, _text(name), _text(format), **options)  # type: ignore[arg-type]
        except HydraError as exc:
            if exc.status == 404 and exc.detail in ("", exc.title):  # the route itself is missing, not the job
                raise CliFailure(
                    f"{exc}: this server does not serve figures (GET /v1/jobs/{{id}}/figures/{{name}})"
                ) from exc
            raise
    path = output or Path(f"{job_id}-{_text(name)}.{_text(format)}")
    _write(path, data)
    out.print(f"saved {path} ({len(data)} bytes)", highlight=False)


@app.command()
@handled
def models(as_json: JsonFlag = False, wide: WideFlag = False, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """The models the workers serve."""
    with HydraClient(url, api_key) as client:
        infos = client.models()
    if as_json:
        _print_json(infos)
    else:
        show(models_table(infos, output_width(), wide), wide)


@app.command()
@handled
def cancel(job_id: str, url: UrlOption = None, api_key: KeyOption = None) -> None:
    """Cancel a queued or running job (it stops at its next prompt)."""
    with HydraClient(url, api_key) as client:
        show(status_table(client.cancel(job_id), output_width()))


@app.command("list")
@handled
def list_jobs(
    offset: Annotated[int, typer.Option(min=0)] = 0,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    as_json: JsonFlag = False,
    wide: WideFlag = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Jobs, newest first."""
    with HydraClient(url, api_key) as client:
        page = client.list(offset=offset, limit=limit)
    if as_json:
        _print_json(page)
    else:
        show(jobs_table(page, output_width(), wide), wide)


@app.command()
@handled
def demo(
    prompts: Annotated[int, typer.Option(min=2, help="known_1000 prompts to sweep")] = 8,
    samples: Annotated[int, typer.Option(min=1, help="resample sources per prompt (< prompts)")] = 3,
    port: Annotated[int, typer.Option(help="API port (another free one if taken)")] = 8000,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for the stack")] = 600,
    figure_path: Annotated[Path, typer.Option("--figure", help="where to save te_vs_de")] = Path(
        "hydra-demo-te_vs_de.png"
    ),
    url: Annotated[str | None, typer.Option("--url", help="use this running API instead of starting a stack")] = None,
    api_key: KeyOption = None,
) -> None:
    """Start a local stack, run a small Hydra sweep on the built-in model, print the table, save the figure."""
    from cli.stack import Stack
    from service.core.embedded_redis import free_port

    _setup_logging()
    stack: Stack | None = None
    try:
        if url is None:
            if not _port_free("127.0.0.1", port):
                log.info("port %d is taken; using a free one", port)
                port = free_port()
            stack = Stack(port=port)
            with stack_failures():
                stack.start()
                stack.wait_ready(timeout_s=ready_timeout)
            url = stack.api_url
            log.info("ready: %s", url)
        with HydraClient(url, api_key) as client:
            run_demo(client, prompts, samples, figure_path)
    finally:
        if stack is not None:
            stack.stop()


def run_demo(
    client: HydraClient, prompts: int, samples: int, figure_path: Path, model: str | None = None
) -> None:
    """The demo's job against a ready API: submit, follow, print the table, fetch the headline figure (on `model`,
    else the built-in model where served, else the first model served)."""
    served = [info.id for info in client.models()]
    if not served:
        raise CliFailure("the API advertises no models: no worker has loaded one")
    if model is None:
        model = BUILTIN_MODEL if BUILTIN_MODEL in served else served[0]
    request = {
        "preset": "hydra",
        "model": model,
        "dataset": {"name": DEFAULT_DATASET, "limit": prompts},
        "resample_samples": samples,
    }
    job = client.submit(request)
    log.info(
        "job %s: Hydra preset on %s, %d prompts (all measured, answered correctly or not) × %d resample sources",
        job.id, model, prompts, samples,
    )
    final = follow(client, job.id, detach=False)  # Ctrl-C stops the demo's own stack, and the job with it
    require_success(final)
    show(result_view(client.result(job.id), output_width()))
    try:
        png = client.figure(job.id, "te_vs_de", "png")
    except HydraError as exc:
        if exc.status != 404:
            raise
        out.print(f"note: this server has no figures endpoint yet (404); skipped {figure_path}", highlight=False)
        return
    _write(figure_path, png)
    out.print(f"saved {figure_path} ({len(png)} bytes)", highlight=False)


app.add_typer(keys_app, name="keys")


def main() -> None:
    """Console-script entry point (`hydra-ablate`)."""
    app()


if __name__ == "__main__":
    main()
