"""The registry of every environment variable the project reads: one entry each, with its type, default and meaning.

The processes read their variables once, at start-up, into typed objects (service/core/settings.py for the API and
the worker, worker/worker_settings.py for the worker alone; the CLI and the client read theirs when a command
starts). Every reader goes through `variable(name)`, so a variable missing here fails the first time it is read,
and the configuration page of the docs is generated from this list:

    python -m service.core.configuration          # rewrites docs/operations/configuration.md
    python -m service.core.configuration --check  # exits 1 when the page differs (tests/test_configuration.py)

The client package does not import the service: its two variables are listed here by hand, and a test checks that
they are the names the client reads (hydra_ablate_client.http.ENVIRONMENT).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Process = Literal["API", "worker", "CLI", "client"]
Kind = Literal["text", "integer", "number", "on/off", "bytes", "path", "list", "URL"]

API: tuple[Process, ...] = ("API",)
WORKER: tuple[Process, ...] = ("worker",)
SHARED: tuple[Process, ...] = ("API", "worker")
CLI: tuple[Process, ...] = ("CLI",)


@dataclass(frozen=True)
class Variable:
    name: str
    kind: Kind
    default: str  # as a reader sees it in the docs (Markdown)
    meaning: str  # Markdown, one table cell
    read_by: tuple[Process, ...]


VARIABLES: tuple[Variable, ...] = (
    # --- Redis, keys and queues: the API and the worker must agree -----------------------------------------------
    Variable("REDIS_URL", "URL", "unset → embedded Redis (`serve`); `redis://127.0.0.1:6379/0` otherwise",
             "broker and job store", ("API", "worker", "CLI")),
    Variable("HYDRA_KEY_PREFIX", "text", "`hydra:`", "prefix of every key the service writes",
             ("API", "worker", "CLI")),
    Variable("HYDRA_QUEUE", "text", "`hydra`", "Celery queue the API sends jobs to and workers consume", SHARED),
    Variable("HYDRA_RESULT_TTL_S", "integer", "604800 (7 days)", "how long jobs, results and figures are kept",
             SHARED),
    # --- what a job may ask for ------------------------------------------------------------------------------------
    Variable("HYDRA_MAX_ABLATIONS", "integer", "5,000,000",
             "cap on prompts × components × resample sources per job", API),
    Variable("HYDRA_MAX_RESULT_VALUES", "integer", "25,000,000",
             "cap on the numbers in one result (prompts × components × (2·layers + 6)), so results fit in Redis", API),
    Variable("HYDRA_MAX_PROMPT_TOKENS", "integer", "512",
             "tokens per prompt, counted with the model's published tokenizer (`0`: no cap); over it → `422`", API),
    Variable("HYDRA_MAX_BODY_BYTES", "integer", "10485760 (10 MiB)", "request body size; over it → `413`", API),
    Variable("HYDRA_LARGE_SUBMIT_BYTES", "integer", "262144 (256 KiB)",
             "bodies of at least this size are decoded, checked and counted in tokens in worker threads, never on "
             "the API's event loop, so a 10 MB submit does not stall other requests (`0`: never)", API),
    Variable("HYDRA_LARGE_SUBMITS", "integer", "1",
             "such large bodies worked on at once per API process; one more is answered `503` at once, with a "
             "`Retry-After` of about how long one takes", API),
    # --- readiness -------------------------------------------------------------------------------------------------
    Variable("HYDRA_READY_TIMEOUT_S", "number", "1.0", "how long `/ready` waits for a worker ping", API),
    Variable("HYDRA_READY_CACHE_S", "number", "2.0",
             "how long `/ready` reuses its probe's answer (one probe at a time, shared by every caller)", API),
    Variable("HYDRA_HEALTH_CHECKS_REDIS", "on/off", "`off` (`on` in `hydra-ablate serve`)",
             "`/health` also answers `503` while Redis does not answer a ping (shared and cached like `/ready`)",
             ("API", "CLI")),
    # --- access control and limits ---------------------------------------------------------------------------------
    Variable("HYDRA_AUTH", "on/off", "`on` (`off` in `hydra-ablate serve` without `REDIS_URL`)",
             "API keys required on the job routes; `off` only together with `HYDRA_ALLOW_NO_AUTH=1` (jobs then "
             "belong to `local`)", ("API", "CLI")),
    Variable("HYDRA_ALLOW_NO_AUTH", "on/off", "unset",
             "`1` confirms `HYDRA_AUTH=off`; without it the API refuses to start with auth off", API),
    Variable("HYDRA_API_KEYS", "list", "unset",
             "extra keys, `name:key[:admin]` comma-separated, hashed at start-up (besides `hydra-ablate keys create "
             "NAME [--admin]`)", ("API", "CLI")),
    Variable("HYDRA_RATE_LIMIT_WRITE", "integer", "120",
             "submits and cancels per API key per window (`0`: no limit); over it → `429` with `Retry-After`", API),
    Variable("HYDRA_RATE_LIMIT_READ", "integer", "1200",
             "status, result, figure and list requests per API key per window (`0`: no limit)", API),
    Variable("HYDRA_RATE_WINDOW_S", "integer", "60",
             "the rate-limit window in seconds (counters in Redis, shared by every API process)", API),
    Variable("HYDRA_UI_LOGIN_LIMIT", "integer", "10",
             "web-page sign-in attempts per window, per client address and per the first 8 characters of the key "
             "tried (`0`: no limit); over it → a `429` page with `Retry-After`", API),
    Variable("HYDRA_MAX_ACTIVE_JOBS", "integer", "100",
             "queued + running jobs per API key (`0`: no cap); over it → `429`", API),
    Variable("HYDRA_MAX_STREAMS_PER_KEY", "integer", "32",
             "event streams and waiting long polls one API key may hold open on one API process (`0`: no cap); "
             "over it → `429` with `Retry-After`. With auth off every caller is the one key `local`", API),
    Variable("HYDRA_MAX_STREAMS", "integer", "512",
             "event streams and waiting long polls one API process holds open for all keys together (`0`: no cap; "
             "each is a socket, so keep it below the process's open-file limit); over it → `429` with `Retry-After`",
             API),
    # --- webhooks --------------------------------------------------------------------------------------------------
    Variable("HYDRA_CALLBACK_ALLOW", "list", "unset",
             "networks callback URLs may resolve to besides public addresses (e.g. `127.0.0.0/8,10.0.0.0/8`)", SHARED),
    Variable("HYDRA_CALLBACK_BACKOFF_S", "number", "5.0",
             "the first callback retry's delay; each later one doubles it", WORKER),
    Variable("HYDRA_CALLBACK_MAX_ATTEMPTS", "integer", "6", "callback deliveries tried per job", WORKER),
    Variable("HYDRA_CALLBACK_TIMEOUT_S", "number", "10.0",
             "how long one callback delivery may take in all (connecting, sending, the receiver's answer), however "
             "slowly the receiver sends; at most 4 KiB of the answer are read", WORKER),
    # --- chunks and the broker: the API and the worker must agree ---------------------------------------------------
    Variable("HYDRA_CHUNK_PROMPTS", "integer", "64",
             "prompts per chunk: a job is split into chunks that any worker serving its model can run", WORKER),
    Variable("HYDRA_MAX_DELIVERIES", "integer", "3",
             "a chunk delivered more often than this (its worker keeps dying) fails the job with that reason", WORKER),
    Variable("HYDRA_CHUNK_TIME_LIMIT_S", "number", "21600 (6 h)",
             "hard time limit per chunk; the soft limit, min(5 min, a tenth of it) earlier, fails the job cleanly",
             SHARED),
    Variable("HYDRA_VISIBILITY_TIMEOUT_S", "number", "hard limit + min(1 h, hard limit)",
             "Redis broker visibility timeout; always above the hard limit, so a long chunk never runs twice", SHARED),
    # --- the worker's models and devices --------------------------------------------------------------------------
    Variable("HYDRA_MODELS", "list", "`smollm2-135m`",
             "models a worker serves, e.g. `smollm2-135m,gemma-3-270m` ([Models](../concepts/models.md))", WORKER),
    Variable("HYDRA_MODEL_CACHE_SIZE", "integer", "2",
             "models kept loaded per worker process (least recently used dropped)", WORKER),
    Variable("HYDRA_MODEL_CACHE_BYTES", "bytes", "unset (no byte budget)",
             "parameter bytes the model cache may hold; least recently used models are dropped to fit", WORKER),
    Variable("HYDRA_CLEAN_CACHE_BYTES", "bytes", "1073741824 (1 GiB)",
             "per loaded model, on its device: clean runs kept for the job's next chunks, so each prompt's clean "
             "pass runs once per job instead of once per chunk that uses it as a source, and patching jobs' runs of "
             "their pairs' prompts, kept for the next chunks and jobs over the same prompts (least recently used "
             "first out; `0`: off)", WORKER),
    Variable("HYDRA_DEVICE", "text", "`cpu`", "`cuda` on GPU workers", WORKER),
    Variable("HYDRA_DTYPE", "text", "`float32`",
             "`bfloat16` or `float16` on GPU workers (see [Precision](../concepts/precision.md))", WORKER),
    Variable("HYDRA_BATCH_TOKENS", "integer", "unset → from the device",
             "a fixed memory budget per batch, in ablated runs × prompt tokens; unset: derived from the free CUDA "
             "memory and the model's shape on a GPU (a batch that still runs out of memory is halved), 8192 on a CPU",
             WORKER),
    Variable("HYDRA_LEASE_S", "number", "120",
             "a running chunk's lease in Redis, renewed every quarter of it ([guarantees](guarantees.md))", WORKER),
    Variable("HYDRA_SWEEP_S", "number", "30", "how often each worker's recovery sweep runs", WORKER),
    Variable("HYDRA_REDIS_OUTAGE_S", "number", "60",
             "how long a chunk rides out Redis being away or refusing writes (full at `maxmemory`, or unable to "
             "write its append-only file); must stay below `HYDRA_LEASE_S`", WORKER),
    # --- logs and metrics ------------------------------------------------------------------------------------------
    Variable("HYDRA_LOG_FORMAT", "text", "`text`",
             "`json`: one JSON object per log line (API and worker), with `request_id` and `job_id`", SHARED),
    Variable("HYDRA_ACCESS_LOG", "on/off", "`on` (`off` in `hydra-ablate serve` / `demo`)",
             "one log line per HTTP request (`hydra.access`)", ("API", "CLI")),
    Variable("PROMETHEUS_MULTIPROC_DIR", "path", "unset (set by `hydra-ablate serve`)",
             "a folder where several API processes on one port share their HTTP latency metrics, so any of them "
             "answers `/metrics` for all (prometheus-client's multiprocess mode)", API),
    # --- the local stack (`hydra-ablate serve`) --------------------------------------------------------------------
    Variable("HYDRA_DATA_DIR", "path", "`~/.cache/hydra-ablate`",
             "where the embedded Redis keeps its append-only file (in a folder only its owner may enter); one "
             "`hydra-ablate serve` at a time per folder (a lock: a second is refused, naming the first); and where "
             "the built-in Gemma-3-270M keeps its assembled GGUF and converted copy (`models/gemma-3-270m/`, made by "
             "`scripts/setup.sh`)", ("worker", "CLI")),
    Variable("HYDRA_API_PROCESSES", "integer", "2 (at most the CPU count; 1 off Linux)",
             "`hydra-ablate serve` only: API processes sharing the port (SO_REUSEPORT, `service/api/serve.py`: the "
             "kernel spreads connections among them); their HTTP latency metrics are shared through "
             "`PROMETHEUS_MULTIPROC_DIR`, so any of them answers `/metrics` for all", CLI),
    Variable("HYDRA_WORKER_NICE", "integer", "10",
             "`hydra-ablate serve` only: the workers' CPU priority (their session's autogroup too), so requests are "
             "answered first and jobs take the cycles left; `0`: same priority as the API", CLI),
    Variable("HYDRA_ALLOW_REMOTE_NO_AUTH", "on/off", "unset",
             "`1` lets `hydra-ablate serve --host 0.0.0.0` run with auth off (as `--allow-remote-without-auth` does)",
             CLI),
    Variable("COLUMNS", "integer", "unset → the terminal's width",
             "the width the CLI fits its tables to (no limit when its output is a file or a pipe)", CLI),
    # --- the client package (hydra_ablate_client.http.ENVIRONMENT; listed by hand, the client imports no service) ---
    Variable("HYDRA_URL", "URL", "`http://127.0.0.1:8000`",
             "the CLI and the Python client: the API's base URL (`--url`)", ("CLI", "client")),
    Variable("HYDRA_API_KEY", "text", "unset",
             "the CLI and the Python client: sent as `X-API-Key` (`--api-key`)", ("CLI", "client")),
)

BY_NAME: dict[str, Variable] = {entry.name: entry for entry in VARIABLES}
assert len(BY_NAME) == len(VARIABLES), "a variable is listed twice"


def variable(name: str) -> Variable:
    """The registry's entry for `name`; reading a variable that is not listed is a programming error."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise LookupError(f"{name} is not in the settings registry (service/core/configuration.py): add it") from None


PAGE = Path(__file__).resolve().parents[2] / "docs" / "operations" / "configuration.md"
INTRO = """\
# Configuration

Every setting is an environment variable of the process that uses it: the API, the worker, the `hydra-ablate`
command, or the Python client (`hydra-ablate serve` passes its environment on to the API and workers it starts).
Each process reads its variables once, when it starts; change one and restart the process. A value that does not
parse is refused with a message naming the variable; a worker with a bad setting does not start.

Types: *integer* and *number* are written in decimal (`1e9` is read for byte counts); *on/off* is `1`/`0`,
`true`/`false`, `yes`/`no` or `on`/`off`; a *list* is comma-separated.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_page() -> str:
    """docs/operations/configuration.md, generated: edit VARIABLES, not the page."""
    lines = [
        INTRO,
        "<!-- generated by `python -m service.core.configuration` from service/core/configuration.py: edit the "
        "registry there, not this table -->",
        "",
        "| variable | read by | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for entry in VARIABLES:
        readers = ", ".join(entry.read_by)
        lines.append(
            f"| `{entry.name}` | {readers} | {entry.kind} | {_cell(entry.default)} | {_cell(entry.meaning)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    page = render_page()
    if "--check" in argv:
        if PAGE.read_text() != page:
            print(f"{PAGE} differs from the settings registry: run python -m service.core.configuration")
            return 1
        return 0
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
