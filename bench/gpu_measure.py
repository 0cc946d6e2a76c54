"""The GPU session's measurements that need torch, one per subcommand; bench/gpu_run.py runs each in a process of
its own (peak memory is that process's own, and a crash or a time-out loses only that part):

    python bench/gpu_measure.py env         versions, the device, and whether what the run needs imports
    python bench/gpu_measure.py matmul      the dense matrix-product rate in bfloat16 (TFLOP/s): the ceiling
    python bench/gpu_measure.py throughput --shape llama-7b --seconds 120 [--until EPOCH] [--partial FILE]

The device is HYDRA_GPU_DEVICE (`cuda` unless set; `cpu` for bench/gpu_dry_run.sh). On a CPU the model shapes
shrink to at most 2 layers of width 64 and the matrices to 512², so that the same code paths run in seconds and
write the same keys. Each subcommand prints `RESULT {json}` as its last line; `throughput` also rewrites
`--partial` after each engine, so that a time-out keeps what was measured before it.

Throughput is the `hydra` preset's sweep (service/core/resolve.py: every attention and MLP layer, final position, 15
resample sources, centred logit) on a randomly initialised Llama of the shape, in bfloat16, on the 1,209
known_1000 prompts (all of them serve as sources), by five engines, each for its share of the shape's time:

- `fast`: the engine as workers run it, over consecutive chunks of the workers' 64 prompts (fewer where the
  warm-up's rate says one would not fit the engine's share), batch budget from free device memory;
- `fast_equal_batch`: the same engine held to one prompt's ablations (layers × 15 rows) per batch;
- `hooks_batched`: plain forward hooks, one full forward pass per batch of that same number of rows, each row
  with its own component replaced (the hooks loop at an equal batch size);
- `hooks`: the hooks loop as bench/bench_engines.py runs it, one forward pass per ablation;
- `nnsight`: nnsight as its users write a patching sweep, one trace per ablation (when it imports).

Resample sources are the next 15 prompts (the preset draws them at random: the same work per ablation) so that
every engine replaces the same activations and their total effects can be compared. The peers' clean passes (the
sources' activations) run outside their timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.bench_engines import SHAPES, Loaded, _clean_pass, _hooks_ablation, _nnsight_ablation, _site, component_names

DEVICE_ENV = "HYDRA_GPU_DEVICE"
# The shapes measured, in order: SmolLM2-135M, Llama 3.2 1B, Llama 2 7B (bench/bench_engines.py SHAPES).
GPU_SHAPES = ("llama-135m", "llama-1b", "llama-7b")
PROJECTED_PROMPTS = 1209  # all of known_1000, the preset's dataset
CHUNK_PROMPTS = 64  # the workers' chunk (HYDRA_CHUNK_PROMPTS's default, service/core/settings.py)
DTYPE = torch.bfloat16
# Share of a shape's time after loading and warming up that each engine gets (it stops at its next unit of work
# past its share; the fast engine measures at least one chunk, the peers at least one batch or ablation).
SHARES = {"fast": 0.3, "fast_equal_batch": 0.2, "hooks_batched": 0.25, "hooks": 0.12, "nnsight": 0.13}
ENGINES = tuple(SHARES)


def device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_ENV, "").strip() or "cuda")


def synchronise(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def result(payload: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


# --- env --------------------------------------------------------------------------------------------------------

# Modules the run needs (msgspec and redis travel as wheels), and those it does without: the tests run in one
# process without pytest-xdist and without a per-test time limit without pytest-timeout; nnsight's engine is left
# out when nnsight does not import.
NEEDED_MODULES = ("msgspec", "redis", "transformers", "pytest", "packaging")
OPTIONAL_MODULES = ("xdist", "pytest_timeout", "nnsight")
DISTRIBUTIONS = {"xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout"}


def env() -> dict[str, Any]:
    import importlib
    import importlib.metadata as metadata

    import transformers

    where = device()
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": str(where),
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "imports": {},
    }
    for name in NEEDED_MODULES + OPTIONAL_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any failure to import is what this reports
            out["imports"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
            continue
        dist = DISTRIBUTIONS.get(name, name)
        version: str | None
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = getattr(module, "__version__", None)
        out["imports"][name] = {"ok": True, "version": version, "file": getattr(module, "__file__", None)}
    out["software"] = requirements()
    out["software"]["problems"] += [
        f"{name} does not import: {out['imports'][name]['error']}" for name in NEEDED_MODULES
        if not out["imports"][name]["ok"]
    ]
    if where.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(where)
        out.update(
            gpu=props.name, gpu_memory_mib=props.total_memory // 2**20, capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    return out


BOUNDED = ("torch", "transformers")  # the worker extra's bounds that this python3 must meet


def requirements() -> dict[str, Any]:
    """torch and transformers against pyproject's worker extra, and every carried package's own requirements
    against what is installed (the carried wheels are installed without their dependencies)."""
    import importlib.metadata as metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    problems: list[str] = []
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    bounds: dict[str, Any] = {}
    for text in declared:
        requirement = Requirement(text)
        if requirement.name in BOUNDED:
            version = installed(requirement.name)
            ok = version is not None and requirement.specifier.contains(Version(version).public, prereleases=True)
            bounds[requirement.name] = {"declared": str(requirement.specifier), "installed": version, "ok": ok}
            if not ok:
                problems.append(f"{requirement.name} {version} is outside pyproject's worker bound {requirement}")
    carried: dict[str, list[str]] = {}
    site = os.environ.get("HYDRA_GPU_SITE")
    for dist in metadata.distributions(path=[site]) if site else []:
        unmet = []
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            version = installed(requirement.name)
            if version is None or not requirement.specifier.contains(Version(version).public, prereleases=True):
                unmet.append(f"{requirement} (installed: {version})")
        carried[dist.metadata["Name"]] = unmet
        problems += [f"carried {dist.metadata['Name']} needs {need}" for need in unmet]
    return {"bounds": bounds, "carried_unmet": carried, "problems": problems}


# --- matmul -----------------------------------------------------------------------------------------------------


def matmul() -> dict[str, Any]:
    """The bfloat16 matrix-product rate on random data: median of timed repeats, three input pairs in rotation."""
    where = device()
    size = 8192 if where.type == "cuda" else 512
    repeats = 30 if where.type == "cuda" else 10
    torch.manual_seed(0)
    pairs = [(torch.randn(size, size, device=where, dtype=DTYPE), torch.randn(size, size, device=where, dtype=DTYPE))
             for _ in range(3)]
    for a, b in pairs:  # warm-up: cuBLAS handles and heuristics
        a @ b
    synchronise(where)
    times = []
    for i in range(repeats):
        a, b = pairs[i % len(pairs)]
        if where.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            began = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - began)
    times.sort()
    flops = 2 * size**3
    return {
        "dtype": "bfloat16", "size": size, "repeats": repeats,
        "tflops_median": flops / times[len(times) // 2] / 1e12, "tflops_best": flops / times[0] / 1e12,
        "timing": "CUDA events" if where.type == "cuda" else "host clock",
    }


# --- throughput -------------------------------------------------------------------------------------------------


def shape_config(name: str, scaled_down: bool) -> dict[str, Any]:
    """LlamaConfig keyword arguments of the shape; on a CPU at most 2 layers, 4 heads of 16, the MLP's ratio kept."""
    shape = dict(SHAPES[name])
    if not scaled_down:
        return shape
    heads = min(4, shape["num_attention_heads"])
    kv = max(1, heads * shape["num_key_value_heads"] // shape["num_attention_heads"])
    hidden = 16 * heads
    ratio = shape["intermediate_size"] / shape["hidden_size"]
    return {**shape, "hidden_size": hidden, "num_hidden_layers": min(2, shape["num_hidden_layers"]),
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": round(hidden * ratio)}


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    where: torch.device
    names: list[str]
    ids: list[torch.Tensor]  # every known_1000 prompt, on the device
    samples: int
    metric: str


def build(name: str) -> tuple[Setup, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from service.core.datasets import load
    from service.core.resolve import PRESETS
    from tests.tiny_models import load_tokenizer

    where = device()
    preset = PRESETS["hydra"]
    tokenizer = load_tokenizer()
    shape = shape_config(name, scaled_down=where.type != "cuda")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **shape)
    torch.manual_seed(0)
    began = time.perf_counter()
    with torch.device(where):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE, attn_implementation="sdpa").eval()
    synchronise(where)
    loaded_s = time.perf_counter() - began
    prompts = [fact.prompt for fact in load("known_1000")]
    ids = [torch.tensor(tokenizer(p).input_ids, device=where) for p in prompts]
    names = component_names(list(preset["components"]), config.num_hidden_layers, config.num_attention_heads)
    info = {
        "shape": shape, "scaled_down": where.type != "cuda", "parameters": sum(p.numel() for p in model.parameters()),
        "load_s": loaded_s, "prompts_available": len(ids), "components": len(names),
        "samples": preset["resample_samples"], "rows_per_prompt": len(names) * preset["resample_samples"],
        "longest_prompt_tokens": max(int(t.shape[0]) for t in ids),
        "weights_mib": torch.cuda.memory_allocated(where) / 2**20 if where.type == "cuda" else None,
    }
    setup = Setup(model, tokenizer, where, names, ids, preset["resample_samples"], preset["metric"])
    return setup, info


def hydra_spec(setup: Setup) -> Any:
    from service.core.resolve import PRESETS
    from worker.engine.types import SweepSpec

    preset = PRESETS["hydra"]
    return SweepSpec(
        components=tuple(setup.names), ablation=preset["ablation"], positions=preset["positions"],
        metric=preset["metric"], resample_samples=preset["resample_samples"], resample_from="next",
    )


def chunk_size(where: torch.device, engine: str, rate: float, seconds: float, rows_per_prompt: int) -> int:
    """Prompts per timed sweep: the workers' 64 for `fast` (its batches span prompts), 8 when batches are one
    prompt's anyway, fewer when the warm-up's rate (ablations/s) says that one such sweep would take most of the
    engine's `seconds`; 2 on a CPU, where the dry run only checks that the code runs."""
    if where.type != "cuda":
        return 2
    fits = int(0.5 * rate * seconds / rows_per_prompt)
    return max(1, min(CHUNK_PROMPTS if engine == "fast" else 8, fits))


@contextmanager
def peak_memory(where: torch.device, into: dict[str, Any]) -> Iterator[None]:
    if where.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(where)
    try:
        yield
    finally:
        into["peak_device_mib"] = torch.cuda.max_memory_allocated(where) / 2**20 if where.type == "cuda" else None


def run_fast(
    setup: Setup, seconds: float, batch_tokens: int | None, size: int, values: dict[str, float] | None
) -> dict[str, Any]:
    """Consecutive chunks of `size` prompts (all 1,209 prompts serve as sources, as a job's chunks see them), with
    the workers' clean-run cache, until `seconds` have passed (at least one chunk)."""
    from worker.engine.clean import CleanRunCache
    from worker.engine.sweep import run_sweep
    from worker.engine.types import SweepInputs
    from worker.worker_settings import DEFAULT_CLEAN_CACHE_BYTES

    spec = hydra_spec(setup)
    cache = CleanRunCache(DEFAULT_CLEAN_CACHE_BYTES)
    out: dict[str, Any] = {"batch_tokens": "from free memory" if batch_tokens is None else batch_tokens,
                           "chunk_prompts": size}
    elapsed, chunks = 0.0, 0
    with peak_memory(setup.where, out):
        while chunks == 0 or elapsed < seconds:
            measured = [(chunks * size + k) % len(setup.ids) for k in range(size)]
            inputs = SweepInputs(token_ids=setup.ids, measure_indices=measured)
            synchronise(setup.where)
            began = time.perf_counter()
            swept = run_sweep(setup.model, spec, inputs, batch_tokens=batch_tokens, clean_cache=cache)
            synchronise(setup.where)
            elapsed += time.perf_counter() - began
            if values is not None:
                for prompt in swept.prompts:
                    for c, name in enumerate(setup.names):
                        values[f"{prompt.index}/{name}"] = prompt.total_effect[c]
            chunks += 1
    ablations = chunks * size * len(setup.names) * setup.samples
    out.update(chunks=chunks, prompts=chunks * size, ablations=ablations, clean_passes=cache.misses,
               seconds=elapsed, ablations_per_s=ablations / elapsed)
    return out


def count_fast_flops(setup: Setup) -> dict[str, float]:
    """The fast engine's FLOPs (torch's FlopCounterMode) per ablated run and per clean pass, from a sweep that
    measures a few prompts, its clean passes counted apart; doubles as the warm-up (kernels, cuBLAS handles)."""
    from worker.engine.architecture import describe
    from worker.engine.sweep import clean_run, run_sweep
    from worker.engine.types import SweepInputs

    measured = list(range(8 if setup.where.type == "cuda" else 1))
    cleaned = sorted({(i + j) % len(setup.ids) for i in measured for j in range(setup.samples + 1)})
    arch = describe(setup.model)
    inputs = SweepInputs(token_ids=setup.ids, measure_indices=measured)
    sweep_flops = _flops(lambda: run_sweep(setup.model, hydra_spec(setup), inputs, batch_tokens=None))
    clean_flops = _flops(lambda: [
        clean_run(setup.model, arch, setup.ids[i], all_positions=False, with_heads=False) for i in cleaned
    ])
    ablations = len(measured) * len(setup.names) * setup.samples
    synchronise(setup.where)
    began = time.perf_counter()  # the same sweep again, uncounted and warm: a first rate, to size the chunks
    run_sweep(setup.model, hydra_spec(setup), inputs, batch_tokens=None)
    synchronise(setup.where)
    return {"per_ablation": (sweep_flops - clean_flops) / ablations, "per_clean_pass": clean_flops / len(cleaned),
            "warm_ablations_per_s": ablations / (time.perf_counter() - began)}


def _flops(work: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())


def centred(logits: torch.Tensor, target: int) -> torch.Tensor:
    """The centred logit of `target` per row of (B, V) logits (the preset's metric)."""
    logits = logits.float()
    return logits[:, target] - logits.mean(dim=-1)


class SourceRows:
    """Each prompt's clean final-position output of every component (the replacement values), computed once."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.rows: dict[int, dict[str, torch.Tensor]] = {}
        self.clean: dict[int, torch.Tensor] = {}  # final logits

    def of(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.rows:
            logits, saved = _clean_pass(self.setup.model, self.setup.ids[i], self.setup.names)
            self.clean[i] = logits
            self.rows[i] = {name: rows[-1] for name, rows in saved.items()}
        return self.rows[i]


def hooks_batch_logits(setup: Setup, ids: torch.Tensor, rows: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """One forward pass of len(rows) copies of the prompt; row r has component rows[r][0]'s final-position output
    replaced by rows[r][1]. Final-position logits only (logits_to_keep=1), no KV cache: generous to the peer."""
    by_name: dict[str, list[int]] = {}
    for r, (name, _) in enumerate(rows):
        by_name.setdefault(name, []).append(r)
    handles = []
    for name, indices in by_name.items():
        module, where, cols = _site(setup.model, name)
        index = torch.tensor(indices, device=ids.device)
        values = torch.stack([rows[r][1] for r in indices])

        def edit(t: torch.Tensor, index: torch.Tensor = index, values: torch.Tensor = values,
                 cols: slice = cols) -> torch.Tensor:
            t[index, -1, cols] = values.to(t.dtype)  # the module's fresh output, edited in place (no_grad)
            return t

        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, e=edit: (e(args[0]), *args[1:])))
        else:
            def hook(_m: Any, _i: Any, out: Any, e: Callable[[torch.Tensor], torch.Tensor] = edit) -> Any:
                return (e(out[0]), *out[1:]) if isinstance(out, tuple) else e(out)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            batch = ids.unsqueeze(0).expand(len(rows), -1)
            return setup.model(batch, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()


def run_hooks_batched(setup: Setup, seconds: float, batch_rows: int, values: dict[str, float]) -> dict[str, Any]:
    """The fast engine's work per prompt (every component × 15 sources) by forward hooks, `batch_rows` rows per
    forward pass, until `seconds` of forward passes have passed; halves the batch if it runs out of memory."""
    sources = SourceRows(setup)
    total = len(setup.ids)
    out: dict[str, Any] = {"batch_rows": batch_rows, "halvings": 0}
    elapsed, ablations, prompts = 0.0, 0, 0
    flops_per_ablation = None
    with peak_memory(setup.where, out):
        i = 0
        while prompts == 0 or elapsed < seconds:
            mine = [(i + j) % total for j in range(1, setup.samples + 1)]
            replacements = {j: sources.of(j) for j in mine}
            sources.of(i)
            target = int(sources.clean[i].argmax())
            clean_metric = centred(sources.clean[i].unsqueeze(0), target)[0]
            work = [(name, replacements[j][name]) for name in setup.names for j in mine]
            metrics: list[torch.Tensor] = []
            start = 0
            while start < len(work):
                part = work[start : start + out["batch_rows"]]
                if flops_per_ablation is None:  # counted on the first batch, outside the timing
                    ids = setup.ids[i]
                    flops_per_ablation = _flops(functools.partial(hooks_batch_logits, setup, ids, part)) / len(part)
                synchronise(setup.where)
                began = time.perf_counter()
                try:
                    logits = hooks_batch_logits(setup, setup.ids[i], part)
                    metrics.append(centred(logits, target))
                    synchronise(setup.where)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if out["batch_rows"] == 1:
                        raise
                    out["batch_rows"] //= 2
                    out["halvings"] += 1
                    continue
                elapsed += time.perf_counter() - began
                start += len(part)
            te = (clean_metric - torch.cat(metrics)).reshape(len(setup.names), setup.samples).mean(dim=1)
            for c, name in enumerate(setup.names):
                values[f"{i}/{name}"] = float(te[c])
            ablations += len(work)
            prompts += 1
            i += 1
    out.update(prompts=prompts, ablations=ablations, seconds=elapsed, ablations_per_s=ablations / elapsed,
               flops_per_ablation=flops_per_ablation)
    return out


def run_one_at_a_time(setup: Setup, engine: str, seconds: float, values: dict[str, float]) -> dict[str, Any]:
    """One forward pass (hooks) or trace (nnsight) per ablation, the fast engine's work in its order (prompt,
    component, each of the 15 sources), until `seconds`; a component's mean TE is kept once all its sources ran."""
    ablate = _hooks_ablation if engine == "hooks" else _nnsight_ablation(Loaded(setup.model, setup.tokenizer, []))
    sources = SourceRows(setup)
    total = len(setup.ids)
    out: dict[str, Any] = {"batch_rows": 1}
    elapsed, ablations = 0.0, 0
    with peak_memory(setup.where, out):
        for i in range(total):
            mine = [(i + j) % total for j in range(1, setup.samples + 1)]
            sources.of(i)
            target = int(sources.clean[i].argmax())
            clean = centred(sources.clean[i].unsqueeze(0), target)[0]
            for name in setup.names:
                effects = []
                for j in mine:
                    if ablations and elapsed >= seconds:
                        break
                    replacement = sources.of(j)[name].unsqueeze(0)
                    synchronise(setup.where)
                    began = time.perf_counter()
                    logits = ablate(setup.model, setup.ids[i], name, replacement)
                    synchronise(setup.where)
                    elapsed += time.perf_counter() - began
                    effects.append(float(clean - centred(logits.unsqueeze(0), target)[0]))
                    ablations += 1
                if len(effects) < len(mine):
                    break
                values[f"{i}/{name}"] = sum(effects) / len(effects)
            if elapsed >= seconds:
                break
    out.update(ablations=ablations, seconds=elapsed, ablations_per_s=ablations / elapsed)
    return out


def max_difference(fast: dict[str, float], peer: dict[str, float]) -> float | None:
    shared = [key for key in peer if key in fast]
    return max(abs(fast[key] - peer[key]) for key in shared) if shared else None


def throughput(name: str, until: float, partial: Path | None) -> dict[str, Any]:
    """Every engine on one shape by the wall-clock time `until` (loading included); each engine gets its share of
    what is left when it starts, so that an engine that overran its share shortens the ones after it, and one
    that would start after `until` is left out with the reason."""
    deadline = time.monotonic() + (until - time.time())
    seconds = deadline - time.monotonic()
    setup, info = build(name)
    report: dict[str, Any] = {"model": name, **info, "engines": {}, "errors": {}, "not_run": {}}

    def save() -> None:
        if partial is not None:
            partial.write_text(json.dumps(report))

    save()
    began = time.perf_counter()
    report["fast_flops"] = count_fast_flops(setup)
    report["warmup_s"] = time.perf_counter() - began
    save()
    fast_values: dict[str, float] = {}
    rows = info["rows_per_prompt"]
    for k, engine in enumerate(ENGINES):
        # On a GPU an engine that would start past the deadline is left out; on a CPU (the dry run, CI) every
        # engine runs its one unit of work at least, since there the point is that each code path runs.
        if time.monotonic() >= deadline and setup.where.type == "cuda":
            report["not_run"][engine] = f"the shape's {seconds:.0f} s were used by the engines before it"
            continue
        left = sum(SHARES[e] for e in ENGINES[k:])
        share = max(0.0, (deadline - time.monotonic()) * SHARES[engine] / left)
        values: dict[str, float] = {}
        try:
            size = chunk_size(setup.where, engine, report["fast_flops"]["warm_ablations_per_s"], share, rows)
            if engine == "fast":
                measured = run_fast(setup, share, None, size, fast_values)
            elif engine == "fast_equal_batch":
                measured = run_fast(setup, share, rows * info["longest_prompt_tokens"], size, None)
                measured["batch_rows"] = rows
            elif engine == "hooks_batched":
                measured = run_hooks_batched(setup, share, rows, values)
            else:
                measured = run_one_at_a_time(setup, engine, share, values)
        except Exception as error:  # noqa: BLE001 - one engine's failure is reported; the others still run
            report["errors"][engine] = f"{type(error).__name__}: {error}"[:2000]
            save()
            continue
        measured["share_s"] = share
        if engine != "fast":
            measured["max_abs_diff_vs_fast"] = max_difference(fast_values, values) if values else None
            measured["compared"] = sum(key in fast_values for key in values)
        report["engines"][engine] = measured
        save()
    report["seconds"] = seconds - (deadline - time.monotonic())
    save()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["env", "matmul", "throughput"])
    parser.add_argument("--shape", choices=GPU_SHAPES, default="llama-135m")
    parser.add_argument("--seconds", type=float, default=60.0, help="this shape's time, loading included")
    parser.add_argument("--until", type=float, help="the wall-clock time (epoch seconds) to end by, instead")
    parser.add_argument("--partial", type=Path, help="rewritten with what was measured after each engine")
    args = parser.parse_args()
    if args.what == "env":
        result(env())
    elif args.what == "matmul":
        result(matmul())
    else:
        torch.set_grad_enabled(False)
        result(throughput(args.shape, args.until or time.time() + args.seconds, args.partial))


if __name__ == "__main__":
    main()
