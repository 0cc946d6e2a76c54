"""Engine benchmark: the fast engine against one-forward-pass-per-ablation loops (hooks, and nnsight as its users
write it), on SmolLM2-135M and the known_1000 prompts. Not a test: prints a table and writes JSON.

    python bench/bench_engines.py [--prompts 100] [--peer-ablations 120] [--out bench/results.json]
        [--model smollm2|llama-135m|llama-360m|llama-1b|llama-1.1b|llama-7b] [--device cpu|cuda]
        [--dtype float32|bfloat16]

`--model llama-…` builds a randomly initialised Llama of that shape (weights need not be trained for timing; the
SmolLM2 tokenizer and its 49,152-token vocabulary serve every shape). On CUDA, peak memory is the allocator's peak
(`torch.cuda.max_memory_allocated`) besides the process's peak RSS.

Each scenario runs each engine in its own subprocess (so peak memory is per engine), on the same prompts; the
peers run on a subset large enough for a stable per-ablation rate, and the numbers they share with the fast engine
are compared (maximum absolute difference of total and direct effects).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIOS: dict[str, dict[str, Any]] = {
    # (a) the paper's setup: every attn and MLP layer, final token, 15 resample sources, centred logit
    "hydra": {"components": ["attn", "mlp"], "positions": "final", "samples": 15, "metric": "centered_logit"},
    # (b) every head, final token, one resample source
    "heads": {"components": ["head"], "positions": "final", "samples": 1, "metric": "logit"},
    # (c) every attn and MLP layer ablated at all positions
    "all_positions": {"components": ["attn", "mlp"], "positions": "all", "samples": 1, "metric": "logit"},
    # (d) the rushing_nanda preset's work: every head resample-ablated at every position of a 64-token document
    # of the built-in corpus, measured at every position (next-token target, head response basis); the fast engine
    # measures `documents` documents, the peers run `--peer-ablations` heads of the first one (one forward pass
    # each, reading the logits at every position)
    "rushing_nanda": {"components": ["head"], "positions": "all", "samples": 1, "metric": "logit",
                      "per_position": True, "documents": 1, "max_tokens": 64},
}


def component_names(kinds: list[str], n_layers: int, n_heads: int) -> list[str]:
    names = []
    for layer in range(n_layers):
        for kind in kinds:
            if kind == "head":
                names += [f"head.{layer}.{h}" for h in range(n_heads)]
            else:
                names.append(f"{kind}.{layer}")
    return names


# Randomly initialised Llama shapes (hidden, layers, heads, kv heads, MLP width) of well-known models.
SHAPES: dict[str, dict[str, Any]] = {  # LlamaConfig keyword arguments
    "llama-135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                   "intermediate_size": 1536, "tie_word_embeddings": True},  # SmolLM2-135M
    "llama-360m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                   "intermediate_size": 2560},  # SmolLM2-360M
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "intermediate_size": 8192},  # Llama 3.2 1B
    "llama-1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                   "intermediate_size": 5632},  # TinyLlama 1.1B
    "llama-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "intermediate_size": 11008},  # Llama 2 7B (the paper's model size)
}
# Set from the command line.
OPTIONS: dict[str, str] = {"model": "smollm2", "device": "cpu", "dtype": "float32", "flops": "on"}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    prompts: list[str]


def load(n_prompts: int) -> Loaded:
    import torch

    from worker.model_cache import DTYPES, load_model
    from worker.model_sources import builtin_smollm2

    torch.manual_seed(0)
    dtype, device = DTYPES[OPTIONS["dtype"]], OPTIONS["device"]
    rows = json.loads((ROOT / "service" / "core" / "data" / "known_1000.json").read_text())
    prompts = [r["prompt"] for r in rows[:n_prompts]]
    if OPTIONS["model"] == "smollm2":
        loaded = load_model(builtin_smollm2(), device=device, dtype=dtype)
        return Loaded(loaded.model, loaded.tokenizer, prompts)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    source = builtin_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **SHAPES[OPTIONS["model"]])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    return Loaded(model, tokenizer, prompts)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mb() -> float | None:
    import torch

    if OPTIONS["device"].startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def synchronise() -> None:
    import torch

    if OPTIONS["device"].startswith("cuda"):
        torch.cuda.synchronize()


def corpus_ids(loaded: Loaded, scenario: dict[str, Any]) -> list[Any]:
    """The first documents of the built-in corpus (one more than measured: a resample source), cut to max_tokens."""
    import torch

    from service.core.corpora import documents

    docs = documents("known_1000_text")[: scenario["documents"] + 1]
    ids = [loaded.tokenizer(d).input_ids[: scenario["max_tokens"]] for d in docs]
    return [torch.tensor(i, device=OPTIONS["device"]) for i in ids]


def run_fast_positions(scenario: dict[str, Any]) -> dict[str, Any]:
    from worker.engine.position_sweep import run_position_sweep
    from worker.engine.types import SweepInputs, SweepSpec

    loaded = load(1)
    config = loaded.model.config
    names = component_names(scenario["components"], config.num_hidden_layers, config.num_attention_heads)
    spec = SweepSpec(
        components=tuple(names), positions="all", metric=scenario["metric"], resample_from="next",
        measure_positions="all", target="next_token", response_basis="heads",
    )
    ids = corpus_ids(loaded, scenario)
    measured = list(range(scenario["documents"]))
    started = time.perf_counter()
    result = run_position_sweep(loaded.model, spec, SweepInputs(token_ids=ids, measure_indices=measured))
    elapsed = time.perf_counter() - started
    ablations = len(measured) * len(names)
    values = {
        f"{i}/{name}": prompt.total_effect[c].tolist() for i, prompt in enumerate(result.prompts)
        for c, name in enumerate(names)
    }
    return {"engine": "fast", "ablations": ablations, "seconds": elapsed, "rate": ablations / elapsed,
            "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb(), "flops_per_ablation": None,
            "values": values}


def run_peer_positions(engine: str, scenario: dict[str, Any], peer_ablations: int) -> dict[str, Any]:
    """One forward pass per ablated head over the whole document, the target logit read at every position."""
    import torch

    loaded = load(1)
    config = loaded.model.config
    names = component_names(scenario["components"], config.num_hidden_layers, config.num_attention_heads)
    work = [name for name in names[:: max(1, len(names) // peer_ablations)]][:peer_ablations]
    ids = corpus_ids(loaded, scenario)
    reads = [d[:-1] for d in ids]
    targets = ids[0][1:]
    clean = [_clean_pass(loaded.model, r, work, all_logits=True) for r in reads[:2]]
    ablate = _hooks_ablation if engine == "hooks" else _nnsight_ablation(loaded)
    positions = torch.arange(targets.shape[0])
    clean_logits = clean[0][0][positions, targets]
    values: dict[str, list[float]] = {}
    started = time.perf_counter()
    for name in work:
        rows = _replacement_rows(clean[1][1][name], reads[0].shape[0], "all")
        logits = ablate(loaded.model, reads[0], name, rows, all_logits=True)
        values[f"0/{name}"] = (clean_logits - logits[positions, targets]).tolist()
    elapsed = time.perf_counter() - started
    return {"engine": engine, "ablations": len(work), "seconds": elapsed, "rate": len(work) / elapsed,
            "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb(), "values": values}


def run_fast(scenario: dict[str, Any], n_prompts: int) -> dict[str, Any]:
    import torch

    from worker.engine.sweep import run_sweep
    from worker.engine.types import SweepInputs, SweepSpec

    loaded = load(n_prompts)
    config = loaded.model.config
    names = component_names(scenario["components"], config.num_hidden_layers, config.num_attention_heads)
    spec = SweepSpec(
        components=tuple(names),
        positions=scenario["positions"],
        metric=scenario["metric"],
        resample_samples=scenario["samples"],
        resample_from="next",
    )
    device = OPTIONS["device"]
    ids = [torch.tensor(loaded.tokenizer(p).input_ids, device=device) for p in loaded.prompts]
    synchronise()
    started = time.perf_counter()
    # batch_tokens=None: the budget the workers use (from free memory on CUDA, the fixed default on a CPU)
    result = run_sweep(loaded.model, spec, SweepInputs(token_ids=ids), batch_tokens=None)
    synchronise()
    elapsed = time.perf_counter() - started
    ablations = len(ids) * len(names) * scenario["samples"]
    flops_per_ablation = _fast_flops_per_ablation(loaded, spec, ids, ablations) if OPTIONS["flops"] == "on" else None
    # Work shared with the peers (they use the first resample source only): the same sweep with one source.
    comparable = result if spec.resample_samples == 1 else run_sweep(
        loaded.model, replace(spec, resample_samples=1), SweepInputs(token_ids=ids)
    )
    return {
        "engine": "fast",
        "ablations": ablations,
        "seconds": elapsed,
        "rate": ablations / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
        "flops_per_ablation": flops_per_ablation,
        "values": _effects_by_key(comparable, names),
    }


def _fast_flops_per_ablation(loaded: Loaded, spec: Any, ids: list[Any], ablations: int) -> float:
    """FLOPs counted by torch's FlopCounterMode on a 2-prompt run, per ablation (clean runs included)."""
    from torch.utils.flop_counter import FlopCounterMode

    from worker.engine.sweep import run_sweep
    from worker.engine.types import SweepInputs

    sample = ids[: max(3, spec.resample_samples + 1)]
    with FlopCounterMode(display=False) as counter:
        run_sweep(loaded.model, spec, SweepInputs(token_ids=sample))
    per_prompt_ablations = ablations / len(ids)
    return counter.get_total_flops() / (len(sample) * per_prompt_ablations)


def _effects_by_key(result: Any, names: list[str]) -> dict[str, list[float]]:
    """TE and DE keyed by 'prompt/component', for comparing engines on shared work."""
    values = {}
    for i, prompt in enumerate(result.prompts):
        for c, name in enumerate(names):
            values[f"{i}/{name}"] = [prompt.total_effect[c], prompt.direct_effect[c]]
    return values


def peer_work(scenario: dict[str, Any], n_prompts: int, peer_ablations: int, names: list[str]) -> list[tuple[int, str]]:
    """The (prompt, component) pairs a peer runs: spread over components, first source only."""
    pairs = [(i, name) for i in range(n_prompts) for name in names]
    step = max(1, len(pairs) // peer_ablations)
    return pairs[::step][:peer_ablations]


def run_peer(engine: str, scenario: dict[str, Any], n_prompts: int, peer_ablations: int) -> dict[str, Any]:
    """One full forward pass per ablation; replacement = next prompt's clean output (resample source 1).

    Generous to the peers: clean logits and source activations are computed once per prompt, outside the timing;
    only the ablated passes are timed.
    """
    import torch

    loaded = load(n_prompts)
    config = loaded.model.config
    names = component_names(scenario["components"], config.num_hidden_layers, config.num_attention_heads)
    work = peer_work(scenario, n_prompts, peer_ablations, names)
    ids = [torch.tensor(loaded.tokenizer(p).input_ids, device=OPTIONS["device"]) for p in loaded.prompts]
    needed = sorted({name for _, name in work})
    clean = [_clean_pass(loaded.model, prompt_ids, needed) for prompt_ids in ids]
    ablate = _hooks_ablation if engine == "hooks" else _nnsight_ablation(loaded)
    metric = _metric(scenario["metric"])
    values: dict[str, list[float]] = {}
    synchronise()
    started = time.perf_counter()
    for i, name in work:
        logits, _ = clean[i]
        target = int(logits.argmax())
        rows = _replacement_rows(clean[(i + 1) % n_prompts][1][name], ids[i].shape[0], scenario["positions"])
        ablated = ablate(loaded.model, ids[i], name, rows)
        values[f"{i}/{name}"] = [metric(logits, target) - metric(ablated, target), float("nan")]
    synchronise()
    elapsed = time.perf_counter() - started
    return {
        "engine": engine,
        "ablations": len(work),
        "seconds": elapsed,
        "rate": len(work) / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
        "values": values,
    }


def _metric(name: str) -> Any:
    if name == "centered_logit":
        return lambda logits, t: float(logits[t].float() - logits.float().mean())
    return lambda logits, t: float(logits[t].float())


def _site(model: Any, name: str) -> tuple[Any, str, slice]:
    """The module an ablation edits, whether its output or input, and the columns (a head's slice)."""
    parts = name.split(".")
    block = model.model.layers[int(parts[1])]
    if parts[0] == "attn":
        return block.self_attn, "output", slice(None)
    if parts[0] == "mlp":
        return block.mlp, "output", slice(None)
    hd = model.config.hidden_size // model.config.num_attention_heads
    head = int(parts[2])
    return block.self_attn.o_proj, "input", slice(head * hd, (head + 1) * hd)


def _register(module: Any, where: str, edit: Any) -> Any:
    if where == "input":
        return module.register_forward_pre_hook(lambda _m, args: (edit(args[0]), *args[1:]))

    def hook(_m: Any, _i: Any, out: Any) -> Any:
        return (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)

    return module.register_forward_hook(hook)


def _clean_pass(model: Any, ids: Any, names: list[str], all_logits: bool = False) -> tuple[Any, dict[str, Any]]:
    """Clean final logits and each needed component's clean activations (all positions)."""
    import torch

    saved: dict[str, Any] = {}
    handles = []
    for name in names:
        module, where, cols = _site(model, name)

        def keep(t: Any, name: str = name, cols: slice = cols) -> Any:
            saved[name] = t[0, :, cols].clone()
            return t

        handles.append(_register(module, where, keep))
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    logits = logits if all_logits else logits[-1]
    for handle in handles:
        handle.remove()
    return logits, saved


def _replacement_rows(source: Any, length: int, positions: str) -> Any:
    """The README's rule: final row only, or right-aligned rows with the source's mean filling a shorter source."""
    import torch

    if positions == "final":
        return source[-1:]
    if source.shape[0] >= length:
        return source[-length:]
    return torch.cat([source.mean(0, keepdim=True).expand(length - source.shape[0], -1), source])


def _hooks_ablation(model: Any, ids: Any, name: str, rows: Any, all_logits: bool = False) -> Any:
    """Plain PyTorch hooks, one forward pass (TransformerLens' run_with_hooks does the same)."""
    import torch

    module, where, cols = _site(model, name)

    def patch(t: Any) -> Any:
        t = t.clone()
        t[0, -rows.shape[0] :, cols] = rows
        return t

    handle = _register(module, where, patch)
    try:
        with torch.no_grad():
            logits = model(ids.unsqueeze(0)).logits[0]
            return logits if all_logits else logits[-1]
    finally:
        handle.remove()


def _nnsight_ablation(loaded: Loaded) -> Any:
    """nnsight as its users write a patching sweep: one trace per ablation."""
    from nnsight import LanguageModel

    lm = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)

    def ablate(_model: Any, ids: Any, name: str, rows: Any, all_logits: bool = False) -> Any:
        import torch

        kind, layer = name.split(".")[0], int(name.split(".")[1])
        block = lm.model.layers[layer]
        _, _, cols = _site(loaded.model, name)
        with torch.no_grad(), lm.trace(ids.unsqueeze(0)):
            if kind == "attn":
                block.self_attn.output[0][0, -rows.shape[0] :, cols] = rows
            elif kind == "mlp":
                block.mlp.output[0, -rows.shape[0] :, cols] = rows
            else:
                block.self_attn.o_proj.input[0, -rows.shape[0] :, cols] = rows
            logits = (lm.lm_head.output[0] if all_logits else lm.lm_head.output[0, -1]).save()
        return logits

    return ablate


def matmul_gflops() -> float:
    """This machine's float32 matmul rate (GFLOP/s) on 2048×2048 matrices, best of 10 timings."""
    import torch

    from worker.model_cache import DTYPES

    size = 2048 if OPTIONS["device"] == "cpu" else 8192
    dtype = DTYPES[OPTIONS["dtype"]]
    a = torch.randn(size, size, device=OPTIONS["device"], dtype=dtype)
    b = torch.randn(size, size, device=OPTIONS["device"], dtype=dtype)
    best = 0.0
    for _ in range(10):
        synchronise()
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronise()
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def child(args: argparse.Namespace) -> None:
    scenario = SCENARIOS[args.scenario]
    if scenario.get("per_position"):
        out = (run_fast_positions(scenario) if args.engine == "fast"
               else run_peer_positions(args.engine, scenario, args.peer_ablations))
    elif args.engine == "fast":
        out = run_fast(scenario, args.prompts)
    else:
        out = run_peer(args.engine, scenario, args.prompts, args.peer_ablations)
    print("RESULT " + json.dumps(out))


def spawn(engine: str, scenario: str, prompts: int, peer_ablations: int) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", "--engine", engine, "--scenario", scenario,
        "--prompts", str(prompts), "--peer-ablations", str(peer_ablations),
        *(f"--{key}={value}" for key, value in OPTIONS.items()),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{engine}/{scenario} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def max_difference(fast: dict[str, list[float]], peer: dict[str, list[float]]) -> float | None:
    """Max |TE_fast − TE_peer| over the (prompt, component) pairs both ran with the same (first) source; per-position
    scenarios compare the TE at every position."""
    shared = [key for key in peer if key in fast]
    if not shared:
        return None
    final_only = all(len(peer[key]) == 2 and math.isnan(peer[key][1]) for key in shared)  # [TE, nan]
    if final_only:
        return max(abs(fast[key][0] - peer[key][0]) for key in shared)
    return max(abs(a - b) for key in shared for a, b in zip(fast[key], peer[key], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--peer-ablations", type=int, default=120)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--engines", default="fast,hooks,nnsight")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--flops", default="on", choices=["on", "off"], help="count the fast engine's FLOPs (a rerun)")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--engine")
    parser.add_argument("--scenario")
    args = parser.parse_args()
    OPTIONS.update(model=args.model, device=args.device, dtype=args.dtype, flops=args.flops)
    if args.child:
        child(args)
        return

    import torch

    machine = {"torch_threads": torch.get_num_threads(), "matmul_gflops": matmul_gflops(), **OPTIONS}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    report: dict[str, Any] = {"machine": machine, "prompts": args.prompts, "scenarios": {}}
    for scenario in args.scenarios.split(","):
        results = {
            engine: spawn(engine, scenario, args.prompts, args.peer_ablations) for engine in args.engines.split(",")
        }
        fast = results["fast"]
        flops = fast["flops_per_ablation"]
        fast["gflops_achieved"] = None if flops is None else flops * fast["rate"] / 1e9
        fast["fraction_of_matmul_rate"] = None if flops is None else fast["gflops_achieved"] / machine["matmul_gflops"]
        summary = {}
        for engine, out in results.items():
            summary[engine] = {
                "ablations": out["ablations"],
                "seconds": round(out["seconds"], 2),
                "ablations_per_s": round(out["rate"], 2),
                "speedup_of_fast": round(fast["rate"] / out["rate"], 1),
                "peak_rss_mb": round(out["peak_rss_mb"]),
                "peak_device_mb": None if out.get("peak_device_mb") is None else round(out["peak_device_mb"]),
                "max_abs_diff_vs_fast": max_difference(fast["values"], out["values"])
                if engine != "fast" else None,
            }
        if flops is not None:
            summary["fast"]["gflops_achieved"] = round(fast["gflops_achieved"], 2)
            summary["fast"]["fraction_of_matmul_rate"] = round(fast["fraction_of_matmul_rate"], 3)
        report["scenarios"][scenario] = summary
        print(json.dumps({scenario: summary}, indent=2), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
