"""The differentiable pass of attribution patching: the metric's gradient with respect to every component's output on
the run being intervened on (for an ablation job: the clean run), and the same gradient with one layer's backward
path dropped at a time (GradDrop). Estimates are made from these in worker/engine/attribution.py.

The pass re-runs the clean computation from the clean residual stream entering layer 0, with the model's own
modules and the residual wiring of worker/engine/ablated_runs.py, and keeps the tensors of the graph that matter:

    hidden[l]       (B, P, d)     the residual stream entering block l; hidden[N] enters the final norm
    layer_out[2l]   (B, P, d)     what attention l writes (after any post-norm): the component attn.l
    layer_out[2l+1] (B, P, d)     what MLP l writes: mlp.l
    head_in[l]      (B, P, H·hd)  the out-projection's input: head.l.h is its h-th slice of hd columns
    attention[l]                  queries, keys and probabilities of layer l (only when probed, for the QK fix)
    parts[(p, l)]   (B, P, ·)     the output of layer l's q, k or v projection (only those asked for: patching's
                                  head.L.H.q|k|v sites)
    metric          (B,)          the metric at the final position (worker/engine/readout.py; the model's own
                                  soft-capped logits with `capped`, as activation patching reads them)

P is the recomputed positions: with `positions: "final"` only the final token is recomputed (it attends to the
clean run's cached keys and values, exactly as the fast engine's ablated runs do), so B prompts share one batch
and the backward pass is one token deep; with `"all"` every position of one prompt is recomputed. Nothing before
the ablated positions can change, so these gradients are those of the full model.

GradDrop (Kramár et al. 2024, §3.1.2): for layer l, the gradient of the metric with the backward path through layer
l's residual contribution (its attention's and its MLP's writes) dropped. Dropping both writes leaves the residual
connection as the only path from hidden[l] to hidden[l+1], so that gradient is, at hidden[l], the full gradient at
hidden[l+1]; above layer l it is the full gradient, and every node of layer l gets zero. So one backward pass from
hidden[l], seeded with the full gradient at hidden[l+1], gives every node below layer l its GradDrop_l gradient
(`dropped_gradients`), and the L − 1 of them cost about (L − 1)/2 backward passes of the whole model in all.

Hygiene: the parameters' `requires_grad` is off during the pass (no parameter ever gets a `.grad`, and the backward
computes activation gradients only) and restored on exit; hooks are removed on exit; the gradients returned are
detached; the last backward pass frees the graph, and the caller drops the last reference to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from worker.engine.ablated_runs import _Inputs
from worker.engine.architecture import Architecture, head_part_projection
from worker.engine.attention_probe import AttentionCall, AttentionRecorder, probed_attention
from worker.engine.clean import CleanRun
from worker.engine.hooks import hooks_removed_on_exit, on_input, on_output
from worker.engine.readout import Readout


@dataclass
class Graph:
    """The tensors of one differentiable pass (shapes in the module docstring)."""

    hidden: list[torch.Tensor]  # N + 1
    layer_out: list[torch.Tensor]  # 2N
    head_in: list[torch.Tensor]  # N
    attention: list[AttentionCall] | None  # N, when probed
    metric: torch.Tensor  # (B,)
    parts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (part, layer) → (B, P, ·)


@dataclass(frozen=True)
class NodeGradients:
    """∂m/∂node for the nodes of layers 0 … `layers` − 1 (detached; the same shapes as the graph's tensors)."""

    layers: int
    layer_out: list[torch.Tensor]  # 2·layers × (B, P, d)
    head_in: list[torch.Tensor]  # layers × (B, P, H·hd)
    probs: list[torch.Tensor] | None  # layers × (B, H, P, K), when probed
    # With `resid`: ∂m/∂hidden[l] for l < layers (the residual stream entering each block: patching's resid_pre.L).
    hidden: list[torch.Tensor] | None = None
    parts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # the graph's parts of those layers


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter requires a gradient within; each gets its own `requires_grad` back on exit."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def metric_rows(
    readout: Readout, x: torch.Tensor, targets: list[int], counterfactuals: list[int | None], capped: bool = False
) -> torch.Tensor:
    """(B,) the metric of each row of x (B, d), row b read at its own target (worker/engine/readout.py): on the
    pre-cap logits, or with `capped` on the model's own (soft-capped) logits."""
    value = readout.capped_value if capped else readout.value
    return torch.cat([value(x[b : b + 1], targets[b], counterfactuals[b]) for b in range(x.shape[0])])


def forward_with_graph(
    arch: Architecture,
    readout: Readout,
    runs: list[CleanRun],
    targets: list[int],
    counterfactuals: list[int | None],
    all_positions: bool,
    probe: bool = False,
    differentiable: bool = True,
    parts: frozenset[tuple[str, int]] = frozenset(),
    capped: bool = False,
) -> Graph:
    """The differentiable pass over `runs` (several only for the final position; one row each); with
    `differentiable=False` the same pass without a graph (to read queries and keys). `parts`: the (q|k|v, layer)
    projection outputs to keep; `capped`: the metric on the model's soft-capped logits."""
    if all_positions and len(runs) > 1:
        raise ValueError("the differentiable pass over every position takes one prompt at a time")
    # The probe's eager attention has no implicit causal mask: let the batch inputs build every mask.
    batch_arch = replace(arch, eager_attention=True) if probe else arch
    rows = torch.arange(len(runs))
    inputs = _Inputs(batch_arch, runs, rows, all_positions)
    h = inputs.entering(0, rows).expand(len(runs), inputs.positions, arch.d_model)
    h = h.detach().clone().requires_grad_(differentiable)  # (B, P, d): the one leaf; every node descends from it
    hidden, layer_out, head_in = [h], [], []
    with (
        torch.enable_grad() if differentiable else torch.no_grad(),
        probed_attention(arch) if probe else nullcontext() as recorder,
        hooks_removed_on_exit() as handles,
    ):

        def keep_head_in(z: torch.Tensor) -> torch.Tensor:
            head_in.append(z)  # (B, P, H·hd), in layer order: each out-projection runs once per layer
            return z

        for layer in range(arch.n_layers):
            handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(keep_head_in)))
        kept_parts: dict[tuple[str, int], torch.Tensor] = {}
        for key in sorted(parts, key=lambda k: (k[1], k[0])):

            def keep_part(t: torch.Tensor, key: tuple[str, int] = key) -> torch.Tensor:
                kept_parts[key] = t  # (B, P, heads·hd): the projection's output, a tensor of the graph
                return t

            handles.append(head_part_projection(arch, key[1], key[0]).register_forward_hook(on_output(keep_part)))
        for layer in range(arch.n_layers):
            if recorder is not None:
                recorder.layer = layer
            attn = arch.attn_post_norm(layer)(inputs.attention(layer, arch.attn_norm(layer)(h)))  # (B, P, d)
            mlp_input = h if arch.parallel_blocks else h + attn
            mlp = arch.mlp_post_norm(layer)(arch.mlp(layer)(arch.mlp_norm(layer)(mlp_input)))  # (B, P, d)
            h = h + attn + mlp if arch.parallel_blocks else mlp_input + mlp
            layer_out += [attn, mlp]
            hidden.append(h)
        metric = metric_rows(readout, h[:, -1], targets, counterfactuals, capped)  # (B,)
    if len(head_in) != arch.n_layers:
        raise RuntimeError(f"expected {arch.n_layers} out-projection calls, saw {len(head_in)}")
    attention = None
    if isinstance(recorder, AttentionRecorder):
        attention = [recorder.call(layer) for layer in range(arch.n_layers)]
    if set(kept_parts) != set(parts):
        raise RuntimeError(f"expected the projections {sorted(parts)}, saw {sorted(kept_parts)}")
    return Graph(hidden=hidden, layer_out=layer_out, head_in=head_in, attention=attention, metric=metric,
                 parts=kept_parts)


def _grad(
    outputs: torch.Tensor, inputs: list[torch.Tensor], seed: torch.Tensor | None, retain: bool
) -> list[torch.Tensor]:
    """torch.autograd.grad, zeros for inputs the output does not depend on, detached."""
    with torch.enable_grad():
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=seed, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(inputs, grads, strict=True)]


def _probs(graph: Graph, layers: int) -> list[torch.Tensor]:
    return [call.probs for call in graph.attention[:layers]] if graph.attention is not None else []


def _nodes(graph: Graph, layers: int, resid: bool) -> list[torch.Tensor]:
    """The node tensors of layers 0 … layers − 1, in `_split`'s order."""
    hidden = graph.hidden[:layers] if resid else []
    parts = [t for (_, layer), t in sorted(graph.parts.items(), key=lambda kv: kv[0]) if layer < layers]
    return [*graph.layer_out[: 2 * layers], *graph.head_in[:layers], *_probs(graph, layers), *hidden, *parts]


def _split(graph: Graph, layers: int, grads: list[torch.Tensor], resid: bool) -> NodeGradients:
    n_out, n_in = 2 * layers, layers
    n_probs = layers if graph.attention is not None else 0
    at = n_out + n_in
    probs = grads[at : at + n_probs] if graph.attention is not None else None
    at += n_probs
    hidden = grads[at : at + layers] if resid else None
    at += layers if resid else 0
    keys = [key for key in sorted(graph.parts) if key[1] < layers]
    parts = dict(zip(keys, grads[at : at + len(keys)], strict=True))
    return NodeGradients(layers, grads[:n_out], grads[n_out : n_out + n_in], probs, hidden, parts)


def full_gradients(graph: Graph, retain: bool, resid: bool = False) -> tuple[NodeGradients, list[torch.Tensor]]:
    """∂m/∂node for every node, and ∂m/∂hidden[l] for l = 1 … N (the seeds of GradDrop). One backward pass.
    `resid`: the residual stream entering each block is a node too (NodeGradients.hidden).

    Rows are independent (each prompt's metric reads only its own row), so the gradient of the summed metric is
    every row's own gradient."""
    n = len(graph.head_in)
    nodes = _nodes(graph, n, resid)
    grads = _grad(graph.metric.sum(), [*nodes, *graph.hidden[1:]], None, retain)
    return _split(graph, n, grads[: len(nodes)], resid), grads[len(nodes) :]


def dropped_gradients(
    graph: Graph, hidden_grads: list[torch.Tensor], layer: int, retain: bool, resid: bool = False
) -> NodeGradients:
    """GradDrop_layer: ∂m/∂node with layer `layer`'s residual contribution's backward path dropped, for the nodes of
    layers 0 … layer − 1 (nodes of `layer` get zero and nodes above it the full gradient: the caller knows; with
    `resid`, hidden[layer] itself gets the full ∂m/∂hidden[layer + 1], the residual connection being its only path).

    `hidden_grads[l − 1]` is the full ∂m/∂hidden[l] (from `full_gradients`)."""
    if not 1 <= layer < len(graph.head_in):
        raise ValueError(f"GradDrop of layer {layer}: only layers 1 … N − 1 have nodes below them")
    seed = hidden_grads[layer]  # ∂m/∂hidden[layer + 1]: block `layer`'s output, above the dropped path
    nodes = _nodes(graph, layer, resid)
    return _split(graph, layer, _grad(graph.hidden[layer], nodes, seed, retain), resid)
