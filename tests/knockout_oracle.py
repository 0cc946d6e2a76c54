"""Brute-force joint knockouts: every member of a set replaced together in one full forward pass, with hooks.

The independent check on the engine's knockout sets (worker/engine/sweep.py); it shares no code with the engine.
Built on tests/oracle.py's one-component machinery: the other members' replacement hooks are registered before
`run_model` registers the first member's and its capture hooks, so the captures see every replacement.

Measures of a set S (docs/concepts/definitions.md, the single-component definitions with S in place of c):

* TE: the metric of the clean run less that of the joint run;
* DE and Δunembed: the members' Δ (clean write − ablated write) and clean writes at the final position, summed; a
  post-norm block's member heads are taken together, from a run with only them replaced (their layer's attention
  output, clean less ablated), since the norm mixes them;
* responses: every layer component downstream of some member and not itself a member, its output in the joint run
  less in the clean run; where a member head is part of that attention layer, its own change (its replacement less
  its clean slice, through its W_O slice) is not a response and is taken out; with `response_basis: "heads"` every
  head and MLP instead (tests/oracle.py basis_output: a head's write from the captured input of W_O, by hand), a
  member head being an entry of its own, so nothing is taken out, and a member attention layer's heads being part
  of the member (no response);
* CE: the responses summed; the norm's response: DE − TE − CE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tests.oracle import (
    Ablation,
    Component,
    ModelParts,
    Readout,
    RunRecord,
    basis_output,
    downstream,
    layer_of,
    layer_output,
    locate_parts,
    metric_direction,
    metric_from_logits,
    metric_logits,
    parse_component,
    position_basis,
    replacement_space_output,
    resample_values,
    run_model,
    to_residual,
)


def run_joint(model: Any, parts: ModelParts, ids: torch.Tensor, ablations: list[Ablation]) -> RunRecord:
    """One full forward pass with every ablation applied together."""
    handles = []
    for ablation in ablations[1:]:
        comp = ablation.component
        if comp.kind == "head":
            assert comp.head is not None
            lo, hi = comp.head * parts.head_dim, (comp.head + 1) * parts.head_dim

            def replace_head(_m: Any, args: tuple, lo: int = lo, hi: int = hi, values: dict = ablation.values) -> tuple:
                x = args[0].clone()
                for p, v in values.items():
                    x[0, p, lo:hi] = v.to(x.dtype)
                return (x, *args[1:])

            handles.append(parts.out_proj[comp.layer].register_forward_pre_hook(replace_head))
        else:
            module = parts.attn[comp.layer] if comp.kind == "attn" else parts.mlp[comp.layer]

            def replace_output(_m: Any, _args: tuple, output: Any, values: dict = ablation.values) -> Any:
                out = (output[0] if isinstance(output, tuple) else output).clone()
                for p, v in values.items():
                    out[0, p, :] = v.to(out.dtype)
                return (out, *output[1:]) if isinstance(output, tuple) else out

            handles.append(module.register_forward_hook(replace_output))
    try:
        return run_model(model, parts, ids, ablations[0])
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class KnockoutMeasures:
    total_effect: float
    direct_effect: float
    unembed_effect: float
    response: list[float]
    compensatory_effect: float
    norm_response: float


def oracle_knockout(
    model: Any,
    ids: torch.Tensor,
    members: list[str],
    target: int,
    ablation: str,
    positions: str,
    norm_scale: str,
    source_ids: torch.Tensor | None = None,
    response_basis: str = "layers",
) -> KnockoutMeasures:
    """The measures of one knockout set on one prompt (metric `logit`; `zero` or `resample` from `source_ids`;
    responses over the layer or the head basis)."""
    parts = locate_parts(model)
    readout = Readout(parts)
    basis = position_basis(parts, response_basis == "heads")
    T = int(ids.shape[0])
    comps = [parse_component(name) for name in members]
    rec_c = run_model(model, parts, ids)
    rec_s = run_model(model, parts, source_ids) if source_ids is not None else None
    wanted = [T - 1] if positions == "final" else list(range(T))

    def values(comp: Component) -> dict[int, torch.Tensor]:
        clean_rep = replacement_space_output(parts, rec_c, comp)
        if ablation == "zero":
            return {p: torch.zeros(clean_rep.shape[1], dtype=torch.float64) for p in wanted}
        assert rec_s is not None
        return resample_values(replacement_space_output(parts, rec_s, comp), T, positions)

    ablations = [Ablation(c, values(c)) for c in comps]
    rec_a = run_joint(model, parts, ids, ablations)
    w = metric_direction(parts, "logit", target, None)
    s_clean = readout.scale(rec_c.x_final)
    s_abl = readout.scale(rec_a.x_final)

    def read(v: torch.Tensor) -> float:
        return readout.f(w, v) / s_clean

    te = metric_from_logits(metric_logits(rec_c, "logit"), "logit", target, None) - metric_from_logits(
        metric_logits(rec_a, "logit"), "logit", target, None
    )
    delta = torch.zeros(rec_c.x_final.shape[0], dtype=torch.float64)
    written = torch.zeros_like(delta)
    post_norm_heads: dict[int, list[Ablation]] = {}
    for a in ablations:
        if a.component.kind == "head" and parts.post_norm:
            post_norm_heads.setdefault(a.component.layer, []).append(a)
            continue
        clean_rep = replacement_space_output(parts, rec_c, a.component)
        delta += to_residual(parts, a.component, clean_rep[T - 1] - a.values[T - 1])
        written += to_residual(parts, a.component, clean_rep[T - 1])
    for layer, heads in post_norm_heads.items():
        name = f"attn.{layer}"
        alone = run_joint(model, parts, ids, heads)
        zeroed = run_joint(
            model, parts, ids,
            [Ablation(a.component, {T - 1: torch.zeros_like(a.values[T - 1])}) for a in heads],
        )
        delta += layer_output(rec_c, name) - layer_output(alone, name)
        written += layer_output(rec_c, name) - layer_output(zeroed, name)
    de = read(delta)

    down = set().union(*(downstream(m, parts.n_layers, parts.parallel) for m in members))
    response = []
    for d in basis:
        if d in members or layer_of(d) in members or layer_of(d) not in down:  # a member attn.L's heads are in it
            response.append(0.0)
            continue
        out_a, out_c = basis_output(parts, rec_a, d, T - 1), basis_output(parts, rec_c, d, T - 1)
        if norm_scale == "clean":
            r = read(out_a - out_c)
        else:
            r = readout.f(w, out_a) / s_abl - read(out_c)
        for a in ablations:  # a member head inside this attention layer (layer basis): its own change is no response
            if a.component.kind == "head" and d == f"attn.{a.component.layer}":
                clean_rep = replacement_space_output(parts, rec_c, a.component)
                clean_write = to_residual(parts, a.component, clean_rep[T - 1])
                replaced_write = to_residual(parts, a.component, a.values[T - 1])
                if norm_scale == "clean":
                    r -= read(replaced_write - clean_write)
                else:
                    r -= readout.f(w, replaced_write) / s_abl - read(clean_write)
        response.append(r)
    ce = sum(response)
    return KnockoutMeasures(
        total_effect=te, direct_effect=de, unembed_effect=read(written), response=response,
        compensatory_effect=ce, norm_response=de - te - ce,
    )
