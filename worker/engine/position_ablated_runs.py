"""Ablated runs of one prompt measured at every position, each entering the stack at its own layer.

The same resume-at-layer scheme as worker/engine/ablated_runs.py (whose block driving, `drive_rows`, it shares): a run
that ablates a component of layer L starts at L from the clean block input, rows sorted by entry layer so the rows
active at layer l are a prefix of the batch, and the heads of one layer share a batch. What differs is the output:
instead of every layer output at the final position, each row returns, for every entry of the response basis and
every position p, the change of that entry's output projected onto the metric's direction u_p at p (unscaled), and
the residual stream entering the final norm at every position. Projecting inside the loop keeps the memory at
(rows × basis × positions) numbers instead of (rows × basis × positions × d_model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.ablated_runs import AblatedRun, _Inputs, drive_rows, entry_order
from worker.engine.architecture import Architecture
from worker.engine.clean import CleanRun
from worker.engine.head_basis import basis_width, head_directions, head_writes, project_heads


@dataclass(frozen=True)
class ProjectedOutputs:
    change: torch.Tensor  # (B, R, P): (out_d(ablated) − out_d(clean)) · u_p for every basis entry d, float32
    x: torch.Tensor  # (B, P, d): the residual stream entering the final norm, float32


@torch.no_grad()
def run_ablated_projected(
    arch: Architecture, run: CleanRun, batch: list[AblatedRun], u: torch.Tensor, heads_basis: bool
) -> ProjectedOutputs:
    """Every row of `batch` (ablations of one prompt at every position), outputs in the batch's order."""
    if heads_basis and run.head_in is None:
        raise ValueError("the head response basis needs the clean run's head inputs")
    order, restore = entry_order(batch)
    rows = [batch[b] for b in order]
    inputs = _Inputs(arch, [run], torch.zeros(len(rows), dtype=torch.long), all_positions=True)
    width = basis_width(arch, heads_basis)
    change = torch.zeros(len(rows), arch.n_layers * width, inputs.positions, dtype=torch.float32, device=u.device)
    like = run.block_in
    hidden = torch.empty(len(rows), inputs.positions, arch.d_model, dtype=like.dtype, device=like.device)
    for step in drive_rows(arch, inputs, rows, hidden, keep_head_in=heads_basis):
        layer, active = step.layer, step.active
        base = layer * width
        mlp_slot = 2 * layer + 1
        change[:active, base + width - 1] = ((step.mlp.float() - run.layer_out[mlp_slot].float()) * u).sum(dim=-1)
        if heads_basis:
            assert run.head_in is not None and step.head_in is not None
            dirs = head_directions(arch, layer, u)
            if arch.post_norm:  # each head's share changes with the block's scale: writes, not their difference
                clean = head_writes(arch, layer, run.head_in[layer], dirs)
                heads = head_writes(arch, layer, step.head_in, dirs) - clean
            else:
                heads = project_heads(arch, step.head_in.float() - run.head_in[layer].float(), dirs)
            change[:active, base : base + arch.n_heads] = heads
        else:
            change[:active, base] = ((step.attn.float() - run.layer_out[2 * layer].float()) * u).sum(dim=-1)
    return ProjectedOutputs(change=change[restore], x=hidden[restore].float())
