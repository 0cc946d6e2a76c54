"""Attribution patching beside exact ablation: AtP and AtP* estimates of every component's total effect.

Kramár, Lieberum, Shah and Nanda (2024), "AtP*: An efficient and scalable method for localizing LLM behaviour to
components" (arXiv 2403.00745). Their effect of a node n on a (clean, noise) pair is the metric after patching n to
its noise value minus the clean metric, and attribution patching estimates it to first order (their Eq. 4):

    Î_AtP(n) = (ñ − n) · ∂m/∂n,   ∂m/∂n taken on the run being intervened on.

Here that run is the clean run and ñ is exactly what the exact engine writes in place of n
(worker/engine/replacements.py, through `prompt_ablations`' rules): the resample source's output right-aligned, the
mean, or zero; m is the job's metric at the final position (worker/engine/readout.py: pre-cap logits on soft-capped
models, as `total_effect` reads them). This service reports `total_effect = m(clean) − m(ablated)`, the paper's
effect with the opposite sign, so every signed estimate here is returned in the service's sign:

    atp(n)       = −Î_AtP(n) = (n − ñ) · ∂m/∂n            compare with total_effect, sign included

With several resample sources, one estimate per source (per ablated run), and their mean beside the exact engine's
mean over the same runs.

AtP* (the paper's §3.1) adds two fixes, both implemented as the paper defines them:

- the QK fix (§3.1.1; worker/engine/qk_fix.py) for nodes that are a head's query or key (`head.L.H.q`,
  `head.L.H.k`): the attention softmax recomputed exactly for the patched queries or keys and only ∂m/∂A
  linearised. The service's ablation components (attn.L, mlp.L, head.L.H = the head's slice of W_O's input) are
  not queries or keys: what they write does not pass through their own softmax, so for them the QK fix changes
  nothing and AtP* is AtP with GradDrop.
- GradDrop (§3.1.2) against cancellation of direct and indirect effects: for every layer ℓ, the estimate with the
  backward path through layer ℓ's residual contribution dropped (worker/engine/gradients.py), combined as the
  paper does (its Eq. 11 in the numbering of the public replication koayon/atp_star): the mean of their absolute
  values over the L − 1 layers other than the node's own (dropping the node's own layer removes its every path,
  so that term is zero):

    atp_star(n) = 1/(L − 1) · Σ_ℓ |atp_GD_ℓ(n)|           compare with |total_effect|: a magnitude, no sign

  `atp_qkfix` (returned with `atp_star`) is the signed estimate with the QK fix and without GradDrop (the paper's
  "AtP + QKfix"); for the ablation components it equals `atp`.

Where this follows a replication rather than the paper's text: the equation numbers above are those the public
replication (koayon/atp_star) quotes; that replication drops attention and MLP sublayers separately (2L terms),
where this follows the paper's per-layer drop (L terms, one residual contribution per block); it sums |Î| per
prompt pair before averaging over pairs, as here. A layer with one block (L = 1) has nothing to drop: there
atp_star is |atp|.

Cost (`MethodCost`, per prompt): AtP needs the clean run, each resample source's clean run (both shared with the
exact engine, which needs them too) and one backward pass; with `positions: "final"` the backward pass is one
token deep, since only the final token depends on the final token's nodes: the differentiable pass recomputes
that token from the clean prefix's cached keys and values, for a batch of prompts at once. GradDrop adds L − 1
backward passes from each layer down (about (L − 1)/2 whole ones); the QK fix adds one softmax per layer per
patched query or key set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

from hydra_ablate_client.vocabulary import EstimateName
from worker.engine.architecture import Architecture, describe
from worker.engine.attention_probe import AttentionCall
from worker.engine.clean import CleanRun, CleanRunCache
from worker.engine.components import Component, model_component
from worker.engine.errors import InputError
from worker.engine.gradients import (
    Graph,
    NodeGradients,
    dropped_gradients,
    forward_with_graph,
    frozen_parameters,
    full_gradients,
)
from worker.engine.qk_fix import QKRows, patched_keys, qk_fixed, qk_linear, rows_of
from worker.engine.readout import Readout
from worker.engine.replacements import MeanActivations, align_to_length
from worker.engine.sweep import (
    ProgressCallback,
    StopCheck,
    SweepCancelled,
    _correct_only,
    clean_run,
    complete_clean_runs,
    job_sources,
)
from worker.engine.types import SweepInputs, SweepSpec

Site = Literal["out", "q", "k"]
SITES: tuple[Site, ...] = get_args(Site)
ESTIMATES: tuple[EstimateName, ...] = get_args(EstimateName)
# What each returned method estimates: the signed total effect, or its magnitude (|total_effect|).
SIGNED, MAGNITUDE = "total_effect", "abs_total_effect"
ESTIMATED: dict[str, str] = {"atp": SIGNED, "atp_qkfix": SIGNED, "atp_star": MAGNITUDE}
DEFAULT_BATCH_PROMPTS = 128  # prompts per differentiable pass at the final position (one row each)


@dataclass(frozen=True)
class Node:
    """What is patched: a component's output (`out`), or a head's query or key (`q`, `k`)."""

    component: Component
    site: Site = "out"

    @property
    def name(self) -> str:
        return self.component.name if self.site == "out" else f"{self.component.name}.{self.site}"


def parse_node(name: str, n_layers: int, n_heads: int) -> Node:
    """attn.L, mlp.L, head.L.H, or head.L.H.q / head.L.H.k; InputError with the reason otherwise."""
    base, _, site = name.rpartition(".")
    if site in ("q", "k") and base.startswith("head."):
        return Node(model_component(base, n_layers, n_heads), site)  # type: ignore[arg-type]
    try:
        return Node(model_component(name, n_layers, n_heads))
    except InputError as error:
        if "bad component name" not in str(error):
            raise
        raise InputError(f"bad node name '{name}': use attn.L, mlp.L, head.L.H, head.L.H.q or head.L.H.k") from None


@dataclass
class PromptEstimates:
    """One prompt's estimates: per method, per node (in the result's node order)."""

    index: int  # the prompt's index in the job
    target_id: int
    clean_metric: float
    sources: list[int]  # resample sources (empty for mean and zero)
    values: dict[str, list[float]]  # method → [node]: the mean over the prompt's ablated runs
    per_run: dict[str, list[list[float]]]  # method → [node][run]: one run per source (one for mean and zero)


@dataclass(frozen=True)
class MethodCost:
    """What a method cost, per prompt: model passes (a pass over a prompt counts 1, as the paper counts) and time."""

    forward_passes: float
    backward_passes: float
    seconds: float

    @property
    def model_evaluations(self) -> float:
        return self.forward_passes + self.backward_passes


@dataclass
class AttributionResult:
    nodes: list[str]
    methods: list[str]  # "atp"; with "atp_star" also "atp_qkfix" and "atp_star"
    estimated: dict[str, str]  # method → "total_effect" (signed) or "abs_total_effect" (magnitude)
    prompts: list[PromptEstimates]
    cost: dict[str, MethodCost]  # per method, per prompt; the clean passes are `clean_seconds`, shared
    clean_seconds: float = 0.0
    clean_passes: int = 0
    gradient_checks: dict[str, float] = field(default_factory=dict)  # max |metric of the pass − clean metric|


# --------------------------------------------------------------------------------------------------------------------
# What replaces every node (the exact engine's replacements, for every component at once)
# --------------------------------------------------------------------------------------------------------------------


def aligned(rows: torch.Tensor, length: int) -> torch.Tensor:
    """(X, S, e) → (X, length, e): `align_to_length` (right-aligned, missing early rows the source's mean) on each."""
    x, s, e = rows.shape
    flat = rows.transpose(0, 1).reshape(s, x * e)
    return align_to_length(flat, length).reshape(length, x, e).transpose(0, 1)


@dataclass(frozen=True)
class Replacements:
    """What replaces every layer component's and every head's clean rows in each of one prompt's R ablated runs."""

    layer_out: torch.Tensor  # (R, 2N, P, d)
    head_in: torch.Tensor | None  # (R, N, P, H·hd), when heads are estimated
    qk: list[QKRows] | None  # R entries, when queries or keys are estimated


def _mean_rows(
    arch: Architecture, means: MeanActivations, with_heads: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mean rows (2N, 1, d) and (N, 1, H·hd) of every component (MeanActivations.as_clean_run_rows)."""
    layers = torch.stack([
        means.as_clean_run_rows(Component(kind, layer), arch.head_dim)
        for layer in range(arch.n_layers)
        for kind in ("attn", "mlp")
    ])
    if not with_heads:
        return layers, None
    heads = torch.stack([
        torch.cat([means.as_clean_run_rows(Component("head", layer, h), arch.head_dim) for h in range(arch.n_heads)],
                  dim=-1)
        for layer in range(arch.n_layers)
    ])
    return layers, heads


def _mean_qk(rows: list[QKRows]) -> QKRows:
    """Mean queries and keys (N, ·, 1, hd), pooled over the rows of every prompt: their final positions, or every
    position (a run over the final position keeps one row per prompt), as MeanActivations pools outputs."""
    query = torch.cat([r.query for r in rows], dim=2).mean(dim=2, keepdim=True)
    key = torch.cat([r.key for r in rows], dim=2).mean(dim=2, keepdim=True)
    return QKRows(query, key)


def _replacements(
    ablation: str,
    run: CleanRun,
    runs: dict[int, CleanRun],
    sources: list[int],
    means: tuple[torch.Tensor, torch.Tensor | None] | None,
    qk_rows: dict[int, QKRows] | None,
    qk_mean: QKRows | None,
    own_qk: QKRows | None,
    with_heads: bool,
) -> Replacements:
    positions = run.layer_out.shape[1]
    if ablation == "zero":
        zero_qk = None if own_qk is None else [QKRows(torch.zeros_like(own_qk.query), torch.zeros_like(own_qk.key))]
        heads = torch.zeros_like(run.head_in)[None] if with_heads and run.head_in is not None else None
        return Replacements(torch.zeros_like(run.layer_out)[None], heads, zero_qk)
    if ablation == "mean":
        assert means is not None
        layers, head_rows = means
        mean_qk = None
        if own_qk is not None and qk_mean is not None:
            mean_qk = [QKRows(qk_mean.query.expand_as(own_qk.query), qk_mean.key.expand_as(own_qk.key))]
        return Replacements(
            layers.expand(-1, positions, -1)[None],
            None if head_rows is None else head_rows.expand(-1, positions, -1)[None],
            mean_qk,
        )
    layer_out = torch.stack([aligned(runs[s].layer_out, positions) for s in sources])
    head_in = None
    if with_heads:
        head_in = torch.stack([aligned(_heads_of(runs[s]), positions) for s in sources])
    source_qk = None
    if own_qk is not None and qk_rows is not None:
        source_qk = [_aligned_qk(qk_rows[s], positions) for s in sources]
    return Replacements(layer_out, head_in, source_qk)


def _heads_of(run: CleanRun) -> torch.Tensor:
    if run.head_in is None:
        raise RuntimeError("head estimates need clean runs with the heads' inputs")
    return run.head_in


def _aligned_qk(rows: QKRows, positions: int) -> QKRows:
    n, heads, _, hd = rows.query.shape
    kv = rows.key.shape[1]
    query = aligned(rows.query.reshape(n * heads, -1, hd), positions).reshape(n, heads, positions, hd)
    key = aligned(rows.key.reshape(n * kv, -1, hd), positions).reshape(n, kv, positions, hd)
    return QKRows(query, key)


# --------------------------------------------------------------------------------------------------------------------
# Contractions: (n − ñ) · ∂m/∂n for every node of a kind at once
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Deltas:
    """n − ñ for every output node of a batch of B prompts, R runs each (in the space the ablation replaces)."""

    layer_out: torch.Tensor  # (B, R, 2N, P, d)
    head_in: torch.Tensor | None  # (B, R, N, P, H·hd)


def _deltas(runs: list[CleanRun], reps: list[Replacements]) -> _Deltas:
    layer_out = torch.stack([run.layer_out.unsqueeze(0) - rep.layer_out for run, rep in zip(runs, reps, strict=True)])
    head_in = None
    if reps[0].head_in is not None:
        head_in = torch.stack([
            _heads_of(run).unsqueeze(0) - rep.head_in for run, rep in zip(runs, reps, strict=True)
            if rep.head_in is not None
        ])
    return _Deltas(layer_out, head_in)


@dataclass
class _Terms:
    """Estimates of every node of a batch (B prompts, R runs each): layer components (B, R, 2N'), heads, head
    queries and head keys (B, R, N', H), for the layers 0 … N' − 1 a gradient reaches."""

    layer_out: torch.Tensor
    heads: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> _Terms:
        return _Terms(f(self.layer_out), *(None if t is None else f(t) for t in (self.heads, self.query, self.key)))


def _out_terms(arch: Architecture, deltas: _Deltas, grads: NodeGradients) -> _Terms:
    """(n − ñ) · ∂m/∂n for every output node of layers 0 … grads.layers − 1, summed over positions."""
    n = grads.layers
    grad_out = torch.stack(grads.layer_out, dim=1).float().unsqueeze(1)  # (B, 1, 2n, P, d)
    terms = _Terms((deltas.layer_out[:, :, : 2 * n].float() * grad_out).sum(dim=(-1, -2)))  # (B, R, 2n)
    if deltas.head_in is not None:
        grad_heads = torch.stack(grads.head_in, dim=1).float().unsqueeze(1)  # (B, 1, n, P, H·hd)
        per = deltas.head_in[:, :, :n].float() * grad_heads  # (B, R, n, P, H·hd)
        terms.heads = per.unflatten(-1, (arch.n_heads, arch.head_dim)).sum(dim=(-1, -3))  # (B, R, n, H)
    return terms


def _qk_terms(
    calls: list[AttentionCall], probs_grads: list[torch.Tensor], reps: list[Replacements], fixed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, N', H) query and key terms for layers 0 … N' − 1, QK-fixed or linear (worker/engine/qk_fix.py); every
    prompt of the batch patched at once, one run at a time."""
    estimate = qk_fixed if fixed else qk_linear
    runs = len(reps[0].qk or [])
    query_terms, key_terms = [], []
    for layer, probs_grad in enumerate(probs_grads):
        call = calls[layer]
        per_run_q, per_run_k = [], []
        for r in range(runs):
            rows = [rep.qk[r] for rep in reps if rep.qk is not None]
            new_query = torch.stack([row.query[layer] for row in rows])  # (B, H, P, hd)
            new_key = torch.stack([row.key[layer] for row in rows])  # (B, KV, P, hd)
            per_run_q.append(estimate(call, probs_grad, query=new_query))  # (B, H)
            per_run_k.append(estimate(call, probs_grad, key=patched_keys(call, new_key)))
        query_terms.append(torch.stack(per_run_q, dim=1))  # (B, R, H)
        key_terms.append(torch.stack(per_run_k, dim=1))
    return torch.stack(query_terms, dim=2), torch.stack(key_terms, dim=2)


# --------------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[key] = self.seconds.get(key, 0.0) + now - started
        return now


class _JobSetup(NamedTuple):
    readout: Readout  # the job's metric
    timer: _Timer
    clean: Callable[[torch.Tensor], CleanRun]  # a prompt's clean run, from the shared cache where it is there
    started: float  # when the clean phase began (for `timer.add("clean", started)`)
    sources: list[list[int]]  # each prompt's resample sources, as the exact engine draws them


def _job_setup(
    model: nn.Module,
    arch: Architecture,
    spec: SweepSpec,
    inputs: SweepInputs,
    clean_cache: CleanRunCache | None,
    *,
    all_positions: bool,
    with_heads: bool,
) -> _JobSetup:
    """What `run_attribution` and the per-position `run_position_attribution` set up alike before their clean runs:
    the metric's read-out, the phase timer, the clean-run function (shared with the exact engine through
    `clean_cache`) and the resample sources, which make their estimates sit beside the exact engine's runs."""
    readout = Readout(arch, spec.metric)
    timer = _Timer()

    def clean(ids: torch.Tensor) -> CleanRun:
        return clean_run(model, arch, ids, all_positions=all_positions, with_heads=with_heads, cache=clean_cache)

    started = time.perf_counter()
    return _JobSetup(readout, timer, clean, started, job_sources(spec, inputs))


def run_attribution(
    model: nn.Module,
    spec: SweepSpec,
    inputs: SweepInputs,
    *,
    estimates: tuple[EstimateName, ...] = ESTIMATES,
    clean_cache: CleanRunCache | None = None,
    batch_prompts: int = DEFAULT_BATCH_PROMPTS,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> AttributionResult:
    """AtP (and, with "atp_star", AtP* and AtP + QK fix) for every prompt × node of `spec` (nodes: the components
    attn.L, mlp.L, head.L.H, and head.L.H.q / head.L.H.k), for the ablation of `spec` (kind, positions, sources).

    The same prompts, targets, selection (`only_correct`), sources and replacements as `run_sweep`, so every
    estimate sits beside the exact engine's value for the same run. `clean_cache`: clean runs shared with the exact
    engine (the other chunks of a job); None computes every one. Leaves nothing on the model: no hook, no `.grad`,
    every parameter's `requires_grad` and the attention implementation as they were, no graph kept.
    """
    unknown = sorted(set(estimates) - set(ESTIMATES))
    if unknown or not estimates:
        raise InputError(f"estimates {unknown or '[]'}: choose from {', '.join(ESTIMATES)}")
    if spec.measure_positions != "final" or spec.target != "clean_top":
        raise InputError(
            "attribution estimates read the metric at the final position (one backward pass per prompt): use "
            "measure_positions 'final' and target 'clean_top' (or given answers)"
        )
    arch = describe(model)
    nodes = [parse_node(name, arch.n_layers, arch.n_heads) for name in spec.components]
    with_heads = any(n.component.kind == "head" and n.site == "out" for n in nodes)
    with_qk = any(n.site != "out" for n in nodes)
    star = "atp_star" in estimates
    all_positions = spec.positions == "all"
    readout, timer, clean, started, sources = _job_setup(
        model, arch, spec, inputs, clean_cache, all_positions=all_positions, with_heads=with_heads
    )
    candidates = list(range(len(inputs.token_ids))) if inputs.measure_indices is None else list(inputs.measure_indices)
    runs = {i: clean(inputs.token_ids[i]) for i in candidates}
    measured = _correct_only(candidates, runs, inputs.target_ids) if spec.only_correct else candidates
    mean_acts = complete_clean_runs(runs, spec, inputs, measured, sources, lambda i: clean(inputs.token_ids[i]), clean)
    means = _mean_rows(arch, mean_acts, with_heads) if mean_acts is not None else None
    started = timer.add("clean", started)

    qk_rows: dict[int, QKRows] | None = None
    qk_mean: QKRows | None = None
    if with_qk and spec.ablation != "zero":
        needed = sorted(runs) if spec.ablation == "mean" else sorted({s for i in measured for s in sources[i]})
        if spec.ablation == "mean" and inputs.mean_reference_ids is not None:
            raise InputError("query and key estimates with a mean reference dataset are not supported yet")
        qk_rows = _probe_rows(model, arch, readout, [runs[i] for i in needed], all_positions, batch_prompts, needed)
        if spec.ablation == "mean":
            qk_mean = _mean_qk(list(qk_rows.values()))
        started = timer.add("qk_rows", started)

    prompts: list[PromptEstimates] = []
    columns = _node_columns(nodes, arch)
    worst = 0.0
    for group in _groups(measured, all_positions, batch_prompts):
        if should_stop is not None and should_stop():
            raise SweepCancelled("attribution cancelled")
        group_runs = [runs[i] for i in group]
        targets = [_target(inputs, i, runs[i]) for i in group]
        counterfactuals = [inputs.counterfactual_ids[i] if inputs.counterfactual_ids is not None else None
                           for i in group]
        with frozen_parameters(model):
            graph = forward_with_graph(arch, readout, group_runs, targets, counterfactuals, all_positions, with_qk)
        full, hidden_grads = full_gradients(graph, retain=star and arch.n_layers > 1)
        started = timer.add("atp", started)
        with torch.no_grad():
            clean_metrics = torch.cat([readout.value(r.x_final.float().unsqueeze(0), t, c)
                                       for r, t, c in zip(group_runs, targets, counterfactuals, strict=True)])
        worst = max(worst, float((graph.metric.detach() - clean_metrics).abs().max()))

        reps = [
            _replacements(spec.ablation, runs[i], runs, sources[i], means, qk_rows, qk_mean,
                          rows_of(graph.attention, b) if graph.attention is not None else None, with_heads)
            for b, i in enumerate(group)
        ]
        deltas = _deltas(group_runs, reps)
        linear = _out_terms(arch, deltas, full)
        if with_qk:
            assert graph.attention is not None and full.probs is not None
            linear.query, linear.key = _qk_terms(graph.attention, full.probs, reps, fixed=False)
        started = timer.add("atp", started)
        per_method = {"atp": linear}
        if star:
            fixed = linear
            if with_qk:
                assert graph.attention is not None and full.probs is not None
                query, key = _qk_terms(graph.attention, full.probs, reps, fixed=True)
                fixed = _Terms(linear.layer_out, linear.heads, query, key)
            started = timer.add("atp_qkfix", started)
            per_method["atp_qkfix"] = fixed
            per_method["atp_star"] = _graddrop(arch, graph, hidden_grads, deltas, reps, fixed)
            started = timer.add("atp_star", started)
        del graph, full, hidden_grads  # the graph's last references: nothing of it outlives the group

        tables = {method: _flat(terms, arch).index_select(2, columns.to(terms.layer_out.device)).cpu()
                  for method, terms in per_method.items()}
        for b, i in enumerate(group):
            prompts.append(_prompt_estimates(i, targets[b], float(clean_metrics[b]), sources[i], tables, b))
        if on_progress is not None:
            on_progress(len(prompts), len(measured))

    methods = ["atp", "atp_qkfix", "atp_star"] if star else ["atp"]
    return AttributionResult(
        nodes=[n.name for n in nodes],
        methods=methods,
        estimated={m: ESTIMATED[m] for m in methods},
        prompts=prompts,
        cost=_costs(arch, spec, timer, len(measured), star),
        clean_seconds=timer.seconds.get("clean", 0.0),
        clean_passes=len(runs),
        gradient_checks={"metric_vs_clean": worst},
    )


def _target(inputs: SweepInputs, i: int, run: CleanRun) -> int:
    return inputs.target_ids[i] if inputs.target_ids is not None else int(run.logits_final.argmax())


def _groups(measured: list[int], all_positions: bool, batch_prompts: int) -> list[list[int]]:
    """Prompts per differentiable pass: up to `batch_prompts` at the final position, one each for every position."""
    size = 1 if all_positions else max(1, batch_prompts)
    return [measured[k : k + size] for k in range(0, len(measured), size)]


def _probe_rows(
    model: nn.Module,
    arch: Architecture,
    readout: Readout,
    runs: list[CleanRun],
    all_positions: bool,
    batch_prompts: int,
    indices: list[int],
) -> dict[int, QKRows]:
    """The clean queries and keys of the recomputed positions of every run (a probed pass without gradients)."""
    rows: dict[int, QKRows] = {}
    by_index = dict(zip(indices, runs, strict=True))
    for group in _groups(indices, all_positions, batch_prompts):
        group_runs = [by_index[i] for i in group]
        targets = [int(r.logits_final.argmax()) for r in group_runs]
        with frozen_parameters(model):
            graph = forward_with_graph(
                arch, readout, group_runs, targets, [None] * len(group), all_positions, probe=True, differentiable=False
            )
        assert graph.attention is not None
        rows.update({i: rows_of(graph.attention, b) for b, i in enumerate(group)})
        del graph
    return rows


def _graddrop(
    arch: Architecture,
    graph: Graph,
    hidden_grads: list[torch.Tensor],
    deltas: _Deltas,
    reps: list[Replacements],
    fixed: _Terms,
) -> _Terms:
    """AtP* for the batch: 1/(L − 1) Σ_ℓ |term_ℓ|, with term_ℓ the (QK-fixed) estimate under GradDrop_ℓ.

    For a node of layer j: term_ℓ is the estimate itself for ℓ < j (the dropped layer is below the node), 0 for
    ℓ = j, and, for ℓ > j, the estimate from `dropped_gradients(ℓ)`."""
    n = arch.n_layers
    magnitude = fixed.map(torch.abs)
    if n == 1:
        return magnitude
    device = magnitude.layer_out.device
    layer_of_slot = (torch.arange(2 * n, device=device) // 2).float()  # attn.l, mlp.l → l
    layer_index = torch.arange(n, device=device).float().view(-1, 1)  # (N, 1): broadcasts over heads
    acc = _Terms(
        magnitude.layer_out * layer_of_slot,  # j · |term|: the drops below the node
        *(None if t is None else t * layer_index for t in (magnitude.heads, magnitude.query, magnitude.key)),
    )
    for layer in range(1, n):
        grads = dropped_gradients(graph, hidden_grads, layer, retain=layer < n - 1)
        terms = _out_terms(arch, deltas, grads)
        acc.layer_out[:, :, : 2 * layer] += terms.layer_out.abs()
        if acc.heads is not None and terms.heads is not None:
            acc.heads[:, :, :layer] += terms.heads.abs()
        if acc.query is not None and acc.key is not None:
            assert graph.attention is not None and grads.probs is not None
            query, key = _qk_terms(graph.attention, grads.probs, reps, fixed=True)
            acc.query[:, :, :layer] += query.abs()
            acc.key[:, :, :layer] += key.abs()
    return acc.map(lambda t: t / (n - 1))


def _node_columns(nodes: list[Node], arch: Architecture) -> torch.Tensor:
    """Each node's column in `_flat`: layer components, then heads, then head queries, then head keys."""
    n, h = arch.n_layers, arch.n_heads
    offsets = {"out": 2 * n, "q": 2 * n + n * h, "k": 2 * n + 2 * n * h}
    columns = []
    for node in nodes:
        c = node.component
        if c.kind == "head":
            assert c.head is not None
            columns.append(offsets[node.site] + c.layer * h + c.head)
        else:
            columns.append(2 * c.layer + (1 if c.kind == "mlp" else 0))
    return torch.tensor(columns, dtype=torch.long)


def _flat(terms: _Terms, arch: Architecture) -> torch.Tensor:
    """(B, R, 2N + 3·N·H): every node's estimate in one row per run (zeros for kinds not estimated)."""
    batch, runs = terms.layer_out.shape[:2]
    empty = terms.layer_out.new_zeros(batch, runs, arch.n_layers * arch.n_heads)
    parts = [None if t is None else t.flatten(2) for t in (terms.heads, terms.query, terms.key)]
    return torch.cat([terms.layer_out, *(empty if p is None else p for p in parts)], dim=2)


def _prompt_estimates(
    index: int, target: int, clean_metric: float, sources: list[int], tables: dict[str, torch.Tensor], row: int
) -> PromptEstimates:
    """One prompt's estimates from the batch's (B, R, nodes) tables."""
    per_run = {method: table[row].T.tolist() for method, table in tables.items()}  # [node][run]
    values = {method: table[row].mean(dim=0).tolist() for method, table in tables.items()}
    return PromptEstimates(index=index, target_id=target, clean_metric=clean_metric, sources=list(sources),
                           values=values, per_run=per_run)


def _costs(
    arch: Architecture, spec: SweepSpec, timer: _Timer, n_prompts: int, star: bool
) -> dict[str, MethodCost]:
    """Per prompt. Forward passes: the clean run and each resample source's (as the paper counts its clean and noise
    runs; the mean comes from the clean runs every job has); backward passes: AtP's one, and GradDrop's L − 1 from
    each layer ℓ down, counted as ℓ/L of one. Seconds: the method's own work (AtP* includes AtP's and the fix's)."""
    per = max(n_prompts, 1)
    noise = spec.resample_samples if spec.ablation == "resample" else 0
    atp_seconds = (timer.seconds.get("atp", 0.0) + timer.seconds.get("qk_rows", 0.0)) / per
    costs = {"atp": MethodCost(1.0 + noise, 1.0, atp_seconds)}
    if star:
        n = arch.n_layers
        fix_seconds = atp_seconds + timer.seconds.get("atp_qkfix", 0.0) / per
        costs["atp_qkfix"] = MethodCost(1.0 + noise, 1.0, fix_seconds)
        dropped = sum(layer / n for layer in range(1, n))
        star_seconds = fix_seconds + timer.seconds.get("atp_star", 0.0) / per
        costs["atp_star"] = MethodCost(1.0 + noise, 1.0 + dropped, star_seconds)
    return costs
