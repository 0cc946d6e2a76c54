"""The head response basis (docs/concepts/definitions.md, "Response basis"): what each head writes onto a metric
direction, from the input of the attention output projection, for both engines (the final position,
worker/engine/sweep.py, and every position, worker/engine/position_ablated_runs.py).

A head's write is its slice of W_O's input times its slice of W_O (the projection's bias is no head's). In a
post-norm block it is its share of what the block writes: that, through the post-norm's gain, divided by the
post-norm's scale of the whole attention output, so the heads of a layer add up to `attn.L`.
"""

from __future__ import annotations

import torch

from worker.engine.architecture import Architecture, weight_of


def out_proj_full(arch: Architecture, layer: int) -> torch.Tensor:
    """The output projection as (d_model, H·hd), so that a row z of its input writes z @ W.T (bias apart)."""
    weight = weight_of(arch.out_proj(layer))
    return weight.T if arch.family.out_proj_is_conv1d else weight


def head_directions(arch: Architecture, layer: int, u: torch.Tensor) -> torch.Tensor:
    """(P, H·hd): for each position, u_p (P, d) mapped back through W_O, so that z · dirs = head contributions · u_p.

    Post-norm blocks: u_p is first multiplied by the post-norm's gain, so that, divided by the post-norm's scale
    of the whole attention output (`head_writes`), z · dirs is each head's share of what the block writes.
    """
    if arch.post_norm:
        u = u * arch.attn_post_norm_gain(layer)
    return u @ out_proj_full(arch, layer).float()


def project_heads(arch: Architecture, z: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """(…, H, P): each head's contribution · u_p, from the out-projection input z (…, P, H·hd)."""
    per_head = (z.float() * dirs).unflatten(-1, (arch.n_heads, arch.head_dim)).sum(dim=-1)  # (…, P, H)
    return per_head.transpose(-1, -2)


def head_writes(arch: Architecture, layer: int, z: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """(…, H, P): what each head writes · u_p.

    Pre-norm blocks: its W_O slice times its slice of z. Post-norm blocks: that, through the post-norm with the
    scale s(a_p) of the whole attention output a_p = W_O z_p at that position, so the heads add up to `attn.L`.
    """
    writes = project_heads(arch, z, dirs)
    if arch.post_norm:
        writes = writes / arch.attn_post_norm_scale(layer, arch.out_proj(layer)(z)).unsqueeze(-2)
    return writes


def basis_width(arch: Architecture, heads_basis: bool) -> int:
    """Basis entries per layer: attn and mlp, or every head and the mlp."""
    return arch.n_heads + 1 if heads_basis else 2


def final_head_basis_writes(
    arch: Architecture, layer_out: torch.Tensor, head_in: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """(…, R): what every entry of the head basis (head.0.0, …, head.0.H−1, mlp.0, head.1.0, …) writes onto u at
    the final position, unscaled, float32.

    layer_out (…, 2N, d): every layer component's output (attn.0, mlp.0, …); head_in (…, N, H·hd): each layer's
    out-projection input, in the model's dtype (a post-norm block's scale is its own projection of it); u (d,).
    """
    per_layer = []
    for layer in range(arch.n_layers):
        dirs = head_directions(arch, layer, u.unsqueeze(0))  # (1, H·hd)
        heads = head_writes(arch, layer, head_in[..., layer, :].unsqueeze(-2), dirs).squeeze(-1)  # (…, H)
        mlp = (layer_out[..., 2 * layer + 1, :].float() * u).sum(dim=-1, keepdim=True)  # (…, 1)
        per_layer += [heads, mlp]
    return torch.cat(per_layer, dim=-1)
