"""Ablated runs of one prompt measured at every position, each entering the stack at its own layer.

The same resume-at-layer scheme as worker/engine/fast.py (whose per-layer edits and block driving it reuses): a run
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

from worker.engine.architecture import Architecture, weight_of
from worker.engine.clean import CleanRun
from worker.engine.fast import AblatedRun, _edits_by_layer, _Inputs, _replace_heads
from worker.engine.hooks import hooks_removed_on_exit, on_input


@dataclass(frozen=True)
class ProjectedOutputs:
    change: torch.Tensor  # (B, R, P): (out_d(ablated) − out_d(clean)) · u_p for every basis entry d, float32
    x: torch.Tensor  # (B, P, d): the residual stream entering the final norm, float32


def out_proj_full(arch: Architecture, layer: int) -> torch.Tensor:
    """The output projection as (d_model, H·hd), so that a row z of its input writes z @ W.T (bias apart)."""
    weight = weight_of(arch.out_proj(layer))
    return weight.T if arch.family.out_proj_is_conv1d else weight


def head_directions(arch: Architecture, layer: int, u: torch.Tensor) -> torch.Tensor:
    """(P, H·hd): for each position, u_p mapped back through W_O, so that z · dirs = head contributions · u_p."""
    return u @ out_proj_full(arch, layer).float()


def project_heads(arch: Architecture, z: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """(…, H, P): each head's contribution · u_p, from the out-projection input z (…, P, H·hd)."""
    per_head = (z.float() * dirs).unflatten(-1, (arch.n_heads, arch.head_dim)).sum(dim=-1)  # (…, P, H)
    return per_head.transpose(-1, -2)


def basis_width(arch: Architecture, heads_basis: bool) -> int:
    """Basis entries per layer: attn and mlp, or every head and the mlp."""
    return arch.n_heads + 1 if heads_basis else 2


@torch.no_grad()
def run_ablated_projected(
    arch: Architecture, run: CleanRun, batch: list[AblatedRun], u: torch.Tensor, heads_basis: bool
) -> ProjectedOutputs:
    """Every row of `batch` (ablations of one prompt at every position), outputs in the batch's order."""
    if heads_basis and run.head_in is None:
        raise ValueError("the head response basis needs the clean run's head inputs")
    order = sorted(range(len(batch)), key=lambda b: batch[b].component.layer)
    rows = [batch[b] for b in order]
    edits = _edits_by_layer(arch, rows)
    entry = torch.tensor([a.component.layer for a in rows])
    n_rows = len(rows)
    inputs = _Inputs(arch, [run], torch.zeros(n_rows, dtype=torch.long), all_positions=True)
    positions = inputs.positions
    width = basis_width(arch, heads_basis)
    change = torch.zeros(n_rows, arch.n_layers * width, positions, dtype=torch.float32, device=u.device)
    hidden = torch.empty(n_rows, positions, arch.d_model, dtype=run.block_in.dtype, device=run.block_in.device)
    for layer in range(arch.n_layers):
        active = int((entry <= layer).sum())
        entering = (entry == layer).nonzero().flatten()
        if entering.numel():
            hidden[entering] = inputs.entering(layer, entering)
        if active == 0:
            continue
        h = hidden[:active]
        layer_edits = edits[layer]
        captured: dict[str, torch.Tensor] = {}

        def keep_z(z: torch.Tensor, captured: dict[str, torch.Tensor] = captured) -> torch.Tensor:
            captured["z"] = z
            return z

        with hooks_removed_on_exit() as handles:
            if layer_edits.head_rows:
                handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(_replace_heads(layer_edits))))
            if heads_basis:  # registered after the replacement, so it sees the replaced heads
                handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(keep_z)))
            attn = inputs.attention(layer, arch.attn_norm(layer)(h))
        if layer_edits.attn_rows:
            attn = attn.clone()
            attn[layer_edits.attn_rows] = layer_edits.attn_values.to(attn.dtype)  # type: ignore[union-attr]
        mlp_input = h if arch.parallel_blocks else h + attn
        mlp = arch.mlp(layer)(arch.mlp_norm(layer)(mlp_input))
        if layer_edits.mlp_rows:
            mlp = mlp.clone()
            mlp[layer_edits.mlp_rows] = layer_edits.mlp_values.to(mlp.dtype)  # type: ignore[union-attr]
        hidden[:active] = mlp_input + mlp if not arch.parallel_blocks else h + attn + mlp

        base = layer * width
        mlp_slot = 2 * layer + 1
        change[:active, base + width - 1] = ((mlp.float() - run.layer_out[mlp_slot].float()) * u).sum(dim=-1)
        if heads_basis:
            assert run.head_in is not None
            z_change = captured["z"].float() - run.head_in[layer].float()
            change[:active, base : base + arch.n_heads] = project_heads(arch, z_change, head_directions(arch, layer, u))
        else:
            change[:active, base] = ((attn.float() - run.layer_out[2 * layer].float()) * u).sum(dim=-1)

    restore = torch.empty(n_rows, dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(n_rows)
    return ProjectedOutputs(change=change[restore], x=hidden[restore].float())
