"""Attribution patching on the pairs of an activation-patching job: AtP and AtP* estimates of every site's effect.

Kramár, Lieberum, Shah and Nanda (2024), arXiv 2403.00745: the effect of patching node n on the run being
intervened on is m(patched) − m(base), and attribution patching estimates it to first order (their Eq. 4):

    Î_AtP(n) = (ñ − n) · ∂m/∂n,   ∂m/∂n taken on the base run.

Here the base run is the one worker/engine/patching.py patches (the corrupted run for `denoise`, the clean run for
`noise`), ñ is the source run's activation at the patched position (the other prompt of the pair, same position),
and m is the patching metric, logit(answer) − logit(counterfactual) at the final position on the model's own
(soft-capped) logits. The estimate is in the exact engine's sign: it estimates `patched_metric − base metric`.

Sites (worker/engine/patching.py `model_site`) and the node each estimate differentiates against:

    resid_pre.L        the residual stream entering block L
    attn.L, mlp.L      what the attention / MLP of block L writes (after any post-norm)
    head.L.H           head H's slice of the out-projection's input
    head.L.H.q|k|v     head H's columns of the q, k or v projection's output (what the exact engine replaces)
    head.L.H.pattern   head H's attention probabilities in the patched query's row: ∂m/∂A · (A_source − A_base)

AtP* (the paper's §3.1) adds two fixes:

- the QK fix (§3.1.1) for `head.L.H.q` and `head.L.H.k`: the head's attention probabilities are recomputed exactly,
  with the model's own attention function (worker/engine/attention_probe.py), for the source's query (key) at the
  patched position, and only ∂m/∂A is linearised: ∂m/∂A · (A(ñ) − A(n)), summed over the head's (query, key)
  pairs; one position at a time, as the paper defines it. Patching a projection's columns and patching the
  post-rotary (post-QK-norm) query or key are the same patch: both runs are at the same position, the rotary
  embedding is the same there, and the families whose QK-norm mixes heads are refused q and k (as the exact
  engine refuses them). For every other site `atp_qkfix = atp` (v and outputs do not pass through their own
  softmax; a pattern's estimate is already linear in A);
- GradDrop (§3.1.2): `atp_star = 1/(L − 1) · Σ_ℓ |estimate with layer ℓ's residual contribution's backward path
  dropped|` over the QK-fixed estimate (worker/engine/gradients.py). For a node of layer j the drop of a layer
  below it changes nothing and the drop of its own layer gives 0, except for `resid_pre.j`, which reaches the
  metric through block j's residual connection too: its ℓ = j term uses ∂m/∂(block j's output). A magnitude.

Every position at once: AtP is linear in ñ − n, so one backward pass gives the estimate of every site at every
position (positions "all"); with "final" the same pass is read at the final position.

Cost per pair (MethodCost): the source run's forward pass, the base run's differentiable forward pass and one
backward pass: three model evaluations (the forward passes start from the embeddings; nothing else is run). The
QK fix adds one attention softmax per layer with q sites and one per layer and position with k sites (not counted
as passes, in the seconds); GradDrop adds L − 1 backward passes from each layer ℓ down, counted ℓ/L of one each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hydra_ablate_client.vocabulary import EstimateName
from worker.engine.architecture import Architecture, describe
from worker.engine.attribution import ESTIMATED, ESTIMATES, MethodCost
from worker.engine.clean import CleanRun
from worker.engine.errors import InputError
from worker.engine.gradients import Graph, NodeGradients, dropped_gradients, forward_with_graph, frozen_parameters
from worker.engine.gradients import full_gradients as node_gradients
from worker.engine.hooks import hooks_removed_on_exit
from worker.engine.patching import PatchingCancelled, PatchPair, PatchSpec, Site, check_pair, model_site
from worker.engine.readout import Readout

StopCheck = Callable[[], bool]
PatchMethod = str  # "atp", "atp_qkfix", "atp_star"


@dataclass
class PairEstimates:
    """One pair's estimates: per method, per site (outer) and patched position (inner), like `patched_metric`."""

    base_metric: float  # the metric of the differentiable pass (the base run's)
    source_metric: float
    values: dict[str, list[list[float]]]


@dataclass
class PatchAttributionResult:
    sites: list[str]
    methods: list[str]  # "atp"; with "atp_star" also "atp_qkfix" and "atp_star"
    estimated: dict[str, str]  # method → "total_effect" (the signed change) or "abs_total_effect" (its magnitude)
    pairs: list[PairEstimates]
    cost: dict[str, MethodCost]  # per method, per pair
    timings: dict[str, float] = field(default_factory=dict)


class _Entered(Exception):
    """Stops a forward pass at block 0: everything the differentiable pass needs has been computed."""


@torch.no_grad()
def _entry_run(model: nn.Module, arch: Architecture, ids: torch.Tensor) -> CleanRun:
    """What the pass over every position starts from: the residual stream entering block 0 (the embeddings, after
    any scaling), from the model's own forward pass stopped there. Only `block_in[0]` and `length` are read
    (worker/engine/ablated_runs.py `_Inputs` with one prompt and every position); the rest is empty."""
    kept: dict[str, torch.Tensor] = {}

    def stop(_module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        assert isinstance(hidden, torch.Tensor)
        kept["h"] = hidden[0].detach().clone()
        raise _Entered

    with hooks_removed_on_exit() as handles:
        handles.append(arch.blocks[0].register_forward_pre_hook(stop, with_kwargs=True))
        try:
            model(input_ids=ids.unsqueeze(0), use_cache=False)
        except _Entered:
            pass
    h = kept["h"]  # (T, d)
    empty = h.new_zeros(2 * arch.n_layers, 1, arch.d_model)
    return CleanRun(layer_out=empty, block_in=h.unsqueeze(0), head_in=None, x_final=h[-1], logits_final=h.new_zeros(0),
                    length=int(ids.shape[0]), past_keys=[], past_values=[])


def _columns(site: Site, head_dim: int) -> slice:
    if site.head is None:
        return slice(None)
    return slice(site.head * head_dim, (site.head + 1) * head_dim)


def _node(
    site: Site,
    hidden: list[torch.Tensor] | None,
    layer_out: list[torch.Tensor],
    head_in: list[torch.Tensor],
    parts: dict[tuple[str, int], torch.Tensor],
) -> torch.Tensor:
    """The site's node among a pass's tensors or their gradients (not for patterns)."""
    if site.kind == "resid_pre":
        assert hidden is not None
        return hidden[site.layer]
    if site.kind in ("attn", "mlp"):
        return layer_out[2 * site.layer + (site.kind == "mlp")]
    return head_in[site.layer] if site.part is None else parts[(site.part, site.layer)]


def _tensor(graph: Graph, site: Site) -> torch.Tensor:
    """(1, T, ·): the node a linear estimate differentiates against."""
    return _node(site, graph.hidden, graph.layer_out, graph.head_in, graph.parts)


def _gradient(grads: NodeGradients, site: Site, probs: bool) -> torch.Tensor:
    """The site's node gradient in `grads` (layers below grads.layers only); `probs`: ∂m/∂A of its layer."""
    if probs:
        assert grads.probs is not None
        return grads.probs[site.layer]
    return _node(site, grads.hidden, grads.layer_out, grads.head_in, grads.parts)


@dataclass(frozen=True)
class _Pass:
    """A pair's two passes and what the QK fix recomputed: the changes of the probabilities per site."""

    arch: Architecture
    base: Graph
    source: Graph
    positions: list[int]
    query_change: dict[int, torch.Tensor]  # layer → (H, T, K): A(source queries) − A(base), every row at once
    key_change: dict[int, torch.Tensor]  # layer → (len(positions), H, T, K): A(source key at p) − A(base)

    def linear(self, site: Site, grad: torch.Tensor) -> torch.Tensor:
        """(len(positions),) float64: (ñ − n) · g at each patched position."""
        index = torch.tensor(self.positions, device=grad.device)
        if site.part == "pattern":
            assert self.base.attention is not None and self.source.attention is not None and site.head is not None
            a, b = self.source.attention[site.layer].probs, self.base.attention[site.layer].probs
            change = (a[0, site.head] - b[0, site.head]).detach().double()  # (T, K)
            return (change * grad[0, site.head].double()).sum(dim=-1).index_select(0, index)
        cols = _columns(site, self.arch.head_dim)
        delta = (_tensor(self.source, site)[0, :, cols] - _tensor(self.base, site)[0, :, cols]).detach().double()
        return (delta * grad[0, :, cols].double()).sum(dim=-1).index_select(0, index)

    def fixed(self, site: Site, probs_grad: torch.Tensor) -> torch.Tensor:
        """(len(positions),) float64: ∂m/∂A · (A(ñ) − A(n)) for a q or k site (the QK fix)."""
        assert site.head is not None
        g = probs_grad[0, site.head].double()  # (T, K)
        if site.part == "q":
            change = self.query_change[site.layer][site.head].double()  # row p: the source's query at p
            index = torch.tensor(self.positions, device=g.device)
            return (change * g).sum(dim=-1).index_select(0, index)
        change = self.key_change[site.layer][:, site.head].double()  # (positions, T, K)
        return (change * g.unsqueeze(0)).sum(dim=(-1, -2))

    def estimate(self, site: Site, grads: NodeGradients, fixed: bool) -> torch.Tensor:
        if fixed and site.part in ("q", "k"):
            return self.fixed(site, _gradient(grads, site, probs=True))
        return self.linear(site, _gradient(grads, site, probs=site.part == "pattern"))


@torch.no_grad()
def _changes(base: Graph, source: Graph, qk: list[Site], positions: list[int]) -> tuple[
    dict[int, torch.Tensor], dict[int, torch.Tensor]
]:
    """The probabilities recomputed exactly by the layer's own attention function: with every query replaced by the
    source's (each row depends only on its own query: one softmax per layer), and with the key at each patched
    position replaced by the source's (one softmax per layer and position). Every head at once (a head's
    probabilities depend only on its own query and key: k sites exist only where a key belongs to one head)."""
    assert base.attention is not None and source.attention is not None
    query_change: dict[int, torch.Tensor] = {}
    key_change: dict[int, torch.Tensor] = {}
    for layer in sorted({s.layer for s in qk if s.part == "q"}):
        call = base.attention[layer]
        query = source.attention[layer].query.detach().to(call.query.dtype)
        query_change[layer] = (call.replay(query=query) - call.probs.detach())[0]  # (H, T, K)
    for layer in sorted({s.layer for s in qk if s.part == "k"}):
        call = base.attention[layer]
        source_key = source.attention[layer].key.detach()
        rows = []
        for p in positions:
            key = call.key.detach().clone()
            key[:, :, p] = source_key[:, :, p].to(key.dtype)
            rows.append((call.replay(key=key) - call.probs.detach())[0])
        key_change[layer] = torch.stack(rows)  # (positions, H, T, K)
    return query_change, key_change


def _graddrop(
    run: _Pass, sites: list[Site], hidden_grads: list[torch.Tensor], fixed: list[torch.Tensor]
) -> list[torch.Tensor]:
    """atp_star per site: 1/(L − 1) Σ_ℓ |term_ℓ|, term_ℓ the QK-fixed estimate under GradDrop_ℓ."""
    n = run.arch.n_layers
    if n == 1:
        return [t.abs() for t in fixed]
    acc = [t.abs() * s.layer for s, t in zip(sites, fixed, strict=True)]  # ℓ < j: the drop changes nothing
    for k, site in enumerate(sites):  # ℓ = j: only the residual connection is left (resid_pre); zero otherwise
        if site.kind == "resid_pre":
            acc[k] = acc[k] + run.linear(site, hidden_grads[site.layer]).abs()
    for layer in range(1, n):
        grads = dropped_gradients(run.base, hidden_grads, layer, retain=layer < n - 1, resid=True)
        for k, site in enumerate(sites):
            if site.layer < layer:
                acc[k] = acc[k] + run.estimate(site, grads, fixed=True).abs()
    return [t / (n - 1) for t in acc]


def run_patch_attribution(
    model: nn.Module,
    spec: PatchSpec,
    pairs: list[PatchPair],
    *,
    estimates: tuple[EstimateName, ...] = ESTIMATES,
    should_stop: StopCheck | None = None,
) -> PatchAttributionResult:
    """AtP (and, with "atp_star", AtP + QK fix and AtP*) of every site of `spec` at each patched position, for each
    pair: estimates of `patched_metric − base metric` beside the exact engine's (worker/engine/patching.py).

    Leaves nothing on the model: no hook, no `.grad`, every parameter's `requires_grad` and the attention
    implementation as they were, no graph kept."""
    unknown = sorted(set(estimates) - set(ESTIMATES))
    if unknown or not estimates:
        raise InputError(f"estimates {unknown or '[]'}: choose from {', '.join(ESTIMATES)}")
    if spec.knockouts:
        raise InputError("estimates cover single sites, not knockout sets: drop the knockouts or the estimates")
    arch = describe(model)
    sites = [model_site(name, arch) for name in spec.sites]
    if not sites:
        raise InputError("estimates need at least one site")
    for i, pair in enumerate(pairs):
        check_pair(pair, i)
    star = "atp_star" in estimates
    methods = ["atp", "atp_qkfix", "atp_star"] if star else ["atp"]
    qk = [s for s in sites if s.part in ("q", "k")]
    probe = any(s.part == "pattern" for s in sites) or (star and bool(qk))
    parts = frozenset((s.part, s.layer) for s in sites if s.part in ("q", "k", "v"))
    readout = Readout(arch, "logit_diff")
    seconds = {"atp": 0.0, "atp_qkfix": 0.0, "atp_star": 0.0}
    results = []
    for pair in pairs:
        if should_stop is not None and should_stop():
            raise PatchingCancelled("estimates cancelled")
        started = time.perf_counter()
        denoise = spec.direction == "denoise"
        base_ids, source_ids = (pair.corrupted_ids, pair.clean_ids) if denoise else (pair.clean_ids, pair.corrupted_ids)
        targets: list[int] = [pair.answer_id]
        counterfactuals: list[int | None] = [pair.counterfactual_id]
        length = int(base_ids.shape[0])
        positions = list(range(length)) if spec.positions == "all" else [length - 1]
        with frozen_parameters(model):
            source = forward_with_graph(arch, readout, [_entry_run(model, arch, source_ids)], targets,
                                        counterfactuals, True, probe=probe, differentiable=False, parts=parts,
                                        capped=True)
            base = forward_with_graph(arch, readout, [_entry_run(model, arch, base_ids)], targets, counterfactuals,
                                      True, probe=probe, parts=parts, capped=True)
            full, hidden_grads = node_gradients(base, retain=star and arch.n_layers > 1, resid=True)
        run = _Pass(arch, base, source, positions, {}, {})
        linear = [run.estimate(site, full, fixed=False) for site in sites]
        now = time.perf_counter()
        seconds["atp"] += now - started
        per_method = {"atp": linear}
        if star:
            fix_started = now
            query_change, key_change = _changes(base, source, qk, positions) if qk else ({}, {})
            run = _Pass(arch, base, source, positions, query_change, key_change)
            fixed = [run.estimate(site, full, fixed=True) if site.part in ("q", "k") else t
                     for site, t in zip(sites, linear, strict=True)]
            now = time.perf_counter()
            seconds["atp_qkfix"] += now - fix_started
            with frozen_parameters(model):
                per_method["atp_star"] = _graddrop(run, sites, hidden_grads, fixed)
            seconds["atp_star"] += time.perf_counter() - now
            per_method["atp_qkfix"] = fixed
        results.append(PairEstimates(
            base_metric=float(base.metric.detach()[0]),
            source_metric=float(source.metric[0]),
            values={m: [t.tolist() for t in per_method[m]] for m in methods},
        ))
        del run, base, source, full, hidden_grads  # the graph's last references: nothing of it outlives the pair
    return PatchAttributionResult(
        sites=[s.name for s in sites],
        methods=methods,
        estimated={m: ESTIMATED[m] for m in methods},
        pairs=results,
        cost=_costs(arch.n_layers, len(pairs), seconds, star),
        timings=seconds,
    )


def _costs(n_layers: int, n_pairs: int, seconds: dict[str, float], star: bool) -> dict[str, MethodCost]:
    """Per pair: the source's forward pass, the base's differentiable forward pass, one backward pass; GradDrop's
    L − 1 more from each layer ℓ down count ℓ/L of one. Seconds: the method's own work (AtP* includes AtP's and
    the fix's)."""
    per = max(n_pairs, 1)
    atp = seconds["atp"] / per
    costs = {"atp": MethodCost(2.0, 1.0, atp)}
    if star:
        fix = atp + seconds["atp_qkfix"] / per
        costs["atp_qkfix"] = MethodCost(2.0, 1.0, fix)
        dropped = sum(layer / n_layers for layer in range(1, n_layers))
        costs["atp_star"] = MethodCost(2.0, 1.0 + dropped, fix + seconds["atp_star"] / per)
    return costs
