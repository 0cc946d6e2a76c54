"""Attribution patching for per-position ablation jobs: AtP and AtP* estimates of every component's total effect at
every measured position (worker/engine/position_sweep.py; docs/concepts/attribution.md, "Per-position jobs").

What the exact engine reports. A per-position job ablates a component at every position of the prompt at once (one
ablated run per component and resample source) and reads the metric at every measured position q with q's own
target (the next token, or the clean top token), so its total effect is

    total_effect[c, q] = m_q(clean) − m_q(c replaced by ñ at every position)

with m_q the job's metric at position q (`metric_at`: pre-cap logits, except the log-probability), averaged over
the prompt's ablated runs. The estimate of that same quantity, to first order, in the service's sign:

    atp[c, q] = Σ_p (n_p − ñ_p) · ∂m_q/∂n_p        (the gradient taken on the clean run)

with ñ exactly what the exact engine writes (worker/engine/attribution.py's replacements: the resample source's
output right-aligned, the mean, zero). Causality makes ∂m_q/∂n_p zero for p > q, so m_q is differentiated on the
prompt's first q + 1 tokens: one backward pass per measured position q, over its prefix, seeded with m_q alone (a
backward pass of a sum of several m_q would mix them: AtP is linear in the patch, not separable in the read-outs).
This is the cheapest exact formulation when the job has more components than positions: the alternative,
forward-mode differentiation, takes one pass per component. A job measured at its final position only
(`measure_positions: "final"` with `target: "next_token"` or `response_basis: "heads"`) needs one backward pass.

AtP* is as at the final position: the QK fix changes nothing for the ablation components (their output is after
their own softmax: `atp_qkfix = atp`), and GradDrop drops each layer's residual contribution from m_q's backward
path in turn, per measured position:

    atp_star[c, q] = 1/(L − 1) · Σ_ℓ |atp_GD_ℓ[c, q]|          compare with |total_effect[c, q]| (mean over runs)

Cost (`MethodCost`, per prompt; a pass over the whole prompt of T tokens counts 1, a pass over a prefix of k
tokens counts k/T): backward passes Σ_q (q + 1)/T, (T + 1)/2 when every position is measured, 1 at the final one;
forward passes the same differentiable passes (the longest is the clean run, counted once as the paper counts it)
plus each resample source's clean run; GradDrop adds Σ_ℓ ℓ/L of each prefix's backward pass. The service bounds
the backward passes of a job (service/core/estimate_options.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from hydra_ablate_client.vocabulary import EstimateName
from worker.engine.architecture import Architecture, describe
from worker.engine.attribution import (
    ESTIMATED,
    ESTIMATES,
    MethodCost,
    Replacements,
    _Deltas,
    _deltas,
    _flat,
    _graddrop,
    _job_setup,
    _mean_rows,
    _node_columns,
    _out_terms,
    _replacements,
    _Terms,
    _Timer,
    parse_node,
)
from worker.engine.clean import CleanRun, CleanRunCache
from worker.engine.errors import InputError
from worker.engine.gradients import forward_with_graph, frozen_parameters, full_gradients
from worker.engine.position_sweep import _targets, check_position_spec, metric_at, model_tokens
from worker.engine.readout import Readout
from worker.engine.sweep import (
    ProgressCallback,
    StopCheck,
    SweepCancelled,
    complete_clean_runs,
)
from worker.engine.types import SweepInputs, SweepSpec


@dataclass
class PositionPromptEstimates:
    """One prompt's estimates at its measured positions: per method, (C, P) float32, the mean over its runs."""

    index: int  # the prompt's index in the job
    positions: list[int]  # the measured positions (indices into the tokens the model read)
    target_ids: list[int]  # the target at each measured position
    clean_metric: list[float]  # m_q on the clean run, at each measured position
    sources: list[int]
    values: dict[str, torch.Tensor]  # method → (C, P)
    per_run: dict[str, torch.Tensor]  # method → (C, R, P): one run per resample source (one for mean and zero)


@dataclass
class PositionAttributionResult:
    nodes: list[str]
    methods: list[str]  # "atp"; with "atp_star" also "atp_qkfix" and "atp_star"
    estimated: dict[str, str]  # method → "total_effect" (signed) or "abs_total_effect" (magnitude)
    prompts: list[PositionPromptEstimates]
    cost: dict[str, MethodCost]  # per method, per prompt (the module doc's count)
    clean_seconds: float = 0.0
    backward_passes: int = 0  # autograd calls seeded with one m_q (GradDrop's partial ones not counted)
    gradient_checks: dict[str, float] = field(default_factory=dict)  # max |m_q of the pass − clean m_q|


def readout_positions(length: int, spec: SweepSpec) -> list[int]:
    """The positions a per-position job measures on a prompt the model reads as `length` tokens."""
    return list(range(length)) if spec.measure_positions == "all" else [length - 1]


def backward_passes_per_prompt(length: int, spec: SweepSpec, n_layers: int, star: bool) -> float:
    """Backward passes of one prompt as `MethodCost` counts them: Σ_q (q + 1)/T, times 1 + Σ_ℓ ℓ/L with GradDrop."""
    passes = sum((q + 1) / length for q in readout_positions(length, spec))
    return passes * (1.0 + _dropped_share(n_layers)) if star else passes


def _dropped_share(n_layers: int) -> float:
    """GradDrop's backward passes for one differentiable pass: from each layer ℓ ≥ 1 down, ℓ/L of one each."""
    return sum(layer / n_layers for layer in range(1, n_layers))


def prefix(run: CleanRun, length: int) -> CleanRun:
    """The clean run of the prompt's first `length` tokens (a run over every position): causal attention makes it
    the first `length` positions of the run itself."""
    if run.x_all is None:
        raise ValueError("a prefix needs a clean run over every position")
    if length == run.length:
        return run
    return replace(
        run,
        layer_out=run.layer_out[:, :length],
        block_in=run.block_in[:, :length],
        head_in=None if run.head_in is None else run.head_in[:, :length],
        x_final=run.x_all[length - 1],
        length=length,
        x_all=run.x_all[:length],
    )


def _first(deltas: _Deltas, length: int) -> _Deltas:
    """n − ñ at the prompt's first `length` positions."""
    head_in = None if deltas.head_in is None else deltas.head_in[..., :length, :]
    return _Deltas(deltas.layer_out[..., :length, :], head_in)


def run_position_attribution(
    model: nn.Module,
    spec: SweepSpec,
    inputs: SweepInputs,
    *,
    estimates: tuple[EstimateName, ...] = ESTIMATES,
    clean_cache: CleanRunCache | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> PositionAttributionResult:
    """AtP (and, with "atp_star", AtP* and AtP + QK fix) for every prompt × component × measured position of a
    per-position `spec` (components attn.L, mlp.L, head.L.H), for the same prompts, targets, resample sources and
    replacements as `run_position_sweep`. Leaves nothing on the model (as `run_attribution`)."""
    unknown = sorted(set(estimates) - set(ESTIMATES))
    if unknown or not estimates:
        raise InputError(f"estimates {unknown or '[]'}: choose from {', '.join(ESTIMATES)}")
    check_position_spec(spec, inputs.target_ids is not None)
    if spec.knockouts:
        raise InputError("estimates cover single components, not knockout sets: drop the knockouts or the estimates")
    arch = describe(model)
    nodes = [parse_node(name, arch.n_layers, arch.n_heads) for name in spec.components]
    if any(n.site != "out" for n in nodes):
        raise InputError("per-position estimates cover the ablation components attn.L, mlp.L and head.L.H")
    with_head_rows = any(n.component.kind == "head" for n in nodes)
    # The clean runs the per-position sweep makes (and caches): with the heads' inputs also for the head basis.
    with_heads = with_head_rows or spec.response_basis == "heads"
    star = "atp_star" in estimates
    readout, timer, clean, started, sources = _job_setup(
        model, arch, spec, inputs, clean_cache, all_positions=True, with_heads=with_heads
    )
    measured = list(range(len(inputs.token_ids))) if inputs.measure_indices is None else list(inputs.measure_indices)
    runs: dict[int, CleanRun] = {}
    mean_acts = complete_clean_runs(
        runs, spec, inputs, measured, sources, lambda i: clean(model_tokens(inputs.token_ids[i], spec)), clean
    )
    means = _mean_rows(arch, mean_acts, with_head_rows) if mean_acts is not None else None
    started = timer.add("clean", started)

    columns = _node_columns(nodes, arch)
    methods = ["atp", "atp_qkfix", "atp_star"] if star else ["atp"]
    prompts: list[PositionPromptEstimates] = []
    worst, calls = 0.0, 0
    backward = forward = 0.0
    for i in measured:
        if should_stop is not None and should_stop():
            raise SweepCancelled("attribution cancelled")
        run = runs[i]
        targets = _targets(arch, readout, run, spec, inputs, i)
        positions = readout_positions(run.length, spec)
        assert run.x_all is not None
        with torch.no_grad():
            clean_metric = metric_at(arch, readout, run.x_all.float(), targets)  # (T,)
        rep = _replacements(spec.ablation, run, runs, sources[i], means, None, None, None, with_head_rows)
        deltas = _deltas([run], [rep])
        started = timer.add("atp", started)
        tables: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
        for q in positions:
            terms, metric = _readout_terms(model, arch, readout, run, rep, deltas, q, int(targets[q]), star, timer)
            calls += 1
            worst = max(worst, abs(metric - float(clean_metric[q])))
            for method, values in terms.items():
                tables[method].append(_flat(values, arch)[0].index_select(1, columns.to(values.layer_out.device)))
        started = time.perf_counter()
        backward += sum((q + 1) / run.length for q in positions)
        forward += sum((q + 1) / run.length for q in positions)
        per_run = {m: torch.stack(t, dim=-1).transpose(0, 1).float().cpu() for m, t in tables.items()}  # (C, R, P)
        prompts.append(PositionPromptEstimates(
            index=i,
            positions=positions,
            target_ids=[int(targets[q]) for q in positions],
            clean_metric=[float(clean_metric[q]) for q in positions],
            sources=list(sources[i]),
            values={m: t.mean(dim=1) for m, t in per_run.items()},
            per_run=per_run,
        ))
        if on_progress is not None:
            on_progress(len(prompts), len(measured))

    return PositionAttributionResult(
        nodes=[n.name for n in nodes],
        methods=methods,
        estimated={m: ESTIMATED[m] for m in methods},
        prompts=prompts,
        cost=_costs(arch.n_layers, spec, timer, len(measured), forward, backward, star),
        clean_seconds=timer.seconds.get("clean", 0.0),
        backward_passes=calls,
        gradient_checks={"metric_vs_clean": worst},
    )


def _readout_terms(
    model: nn.Module,
    arch: Architecture,
    readout: Readout,
    run: CleanRun,
    rep: Replacements,
    deltas: _Deltas,
    q: int,
    target: int,
    star: bool,
    timer: _Timer,
) -> tuple[dict[str, _Terms], float]:
    """Every node's estimates of m_q (batch of one prompt: (1, R, ·)), from one backward pass over the first q + 1
    tokens (and GradDrop's from each layer down); and m_q as the differentiable pass read it."""
    started = time.perf_counter()
    with frozen_parameters(model):
        graph = forward_with_graph(arch, readout, [prefix(run, q + 1)], [target], [None], True)
    full, hidden_grads = full_gradients(graph, retain=star and arch.n_layers > 1)
    first = _first(deltas, q + 1)
    linear = _out_terms(arch, first, full)
    metric = float(graph.metric.detach()[0])
    started = timer.add("atp", started)
    terms = {"atp": linear}
    if star:
        terms["atp_qkfix"] = linear  # no query or key among the components: nothing to fix
        terms["atp_star"] = _graddrop(arch, graph, hidden_grads, first, [rep], linear)
        timer.add("atp_star", started)
    del graph, full, hidden_grads
    return terms, metric


def _costs(
    n_layers: int, spec: SweepSpec, timer: _Timer, n_prompts: int, forward: float, backward: float, star: bool
) -> dict[str, MethodCost]:
    """Per prompt, the module doc's count; seconds of each method's own work (AtP* includes AtP's)."""
    per = max(n_prompts, 1)
    noise = spec.resample_samples if spec.ablation == "resample" else 0
    atp_seconds = timer.seconds.get("atp", 0.0) / per
    costs = {"atp": MethodCost(noise + forward / per, backward / per, atp_seconds)}
    if star:
        costs["atp_qkfix"] = costs["atp"]
        star_seconds = atp_seconds + timer.seconds.get("atp_star", 0.0) / per
        costs["atp_star"] = MethodCost(
            noise + forward / per, backward / per * (1.0 + _dropped_share(n_layers)), star_seconds
        )
    return costs
