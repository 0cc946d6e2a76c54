"""The measures of one prompt, as functions over tensors (docs/concepts/definitions.md).

Every function takes rows with arbitrary leading axes (ablated runs, and later positions) and reduces only the
model axis `d`, so a per-position variant passes tensors with a position axis and gets one value per position.
"""

from __future__ import annotations

import torch


def read_direct(vectors: torch.Tensor, u: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """f(v) / s for residual-stream vectors (..., d): what each writes onto the metric's direction, read with `scale`
    (a number, or a tensor broadcasting against the leading axes)."""
    return (vectors.float() @ u.float()) / scale


def ablated_profile(layer_out: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Δ̃unembed(k, l): every layer component's direct effect in the ablated runs, (..., 2N, d) → (..., 2N).

    `scale` is the final norm's scale per run (...,): the clean one for `norm_scale: "clean"`, the run's own for
    `"ablated"`, so that profile − clean profile is the response of every downstream component."""
    return read_direct(layer_out, u, scale.unsqueeze(-1))


def compensatory_effect(response: torch.Tensor) -> torch.Tensor:
    """The paper's CE (Eq. 33–34): the downstream components' responses summed, (..., R) → (...).

    `response` is already zero outside the downstream set, which is the paper's set (attention ablated at m:
    attention from m+1, MLPs from m; MLP ablated at m: both from m+1), less the same-layer MLP of parallel blocks,
    whose output cannot change. The final norm's change of scale is not part of it."""
    return response.sum(dim=-1)


def decompose(
    total: torch.Tensor, direct: torch.Tensor, response: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(compensatory_effect, norm_response) in float64, with norm_response = DE − TE − CE."""
    ce = compensatory_effect(response.double())
    return ce, direct.double() - total.double() - ce
