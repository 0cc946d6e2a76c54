"""AtP for a head's query or key, linearised and with AtP*'s QK fix (Kramár et al. 2024, §3.1.1).

A query or key reaches the metric only through its head's attention probabilities A (B, H, P, K), so for a patch
that moves the queries (or keys) from their clean values to ñ:

    linear AtP   (n − ñ) · ∂m/∂n      = ∂m/∂A · J_A (n − ñ)        (the softmax linearised: a JVP of A)
    QK fix       ∂m/∂A · (A(n) − A(ñ))                              (the softmax recomputed exactly for ñ)

both in this service's sign (clean − patched, like `total_effect`); the paper's Î is their negative. The paper
defines the fix per query position (its Eq. 7) and per key position, summing over the queries that see the key
(its Eqs. 9–10); a node here is a head's query or key at the ablated positions (the final one, or every one), so
the probabilities are recomputed once with all of them patched and the change summed over every (query, key) pair
of the head. With one ablated position this is exactly the paper's definition.

Keys on grouped-query models: a key belongs to a key/value head that several query heads read. `head.L.H.k` is
the key as query head H reads it: only head H's probabilities count, so the other heads of its group see their
clean keys (patching the group's key for all its heads is the sum over the group, to first order and for the
fix alike). Both functions below patch every head at once and read each head's own probabilities: a head's
probabilities depend only on its own query and its group's key.

Queries and keys here are the post-rotary (post-QK-norm) tensors the attention function receives; a resample
source's rows are its own, right-aligned as for every other component (worker/engine/replacements.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.attention_probe import AttentionCall


@dataclass(frozen=True)
class QKRows:
    """The queries and keys of one prompt's recomputed positions, every layer (P positions)."""

    query: torch.Tensor  # (N, H, P, hd)
    key: torch.Tensor  # (N, KV, P, hd)


def rows_of(calls: list[AttentionCall], row: int) -> QKRows:
    """Batch row `row`'s queries and the keys of its recomputed positions (the last P of its keys)."""
    positions = calls[0].query.shape[2]
    return QKRows(
        query=torch.stack([c.query[row].detach() for c in calls]),
        key=torch.stack([c.key[row, :, -positions:].detach() for c in calls]),
    )


def patched_keys(call: AttentionCall, new_rows: torch.Tensor) -> torch.Tensor:
    """(B, KV, K, hd): the call's keys with the last P (the recomputed positions) replaced by `new_rows`."""
    positions = new_rows.shape[2]
    keys = call.key.detach().clone()
    keys[:, :, -positions:] = new_rows.to(keys.dtype)
    return keys


def _per_head(change: torch.Tensor, probs_grad: torch.Tensor) -> torch.Tensor:
    """(B, H): Σ over a head's (query, key) pairs of a change of A times ∂m/∂A."""
    return (change.float() * probs_grad.float()).sum(dim=(-1, -2))


def qk_fixed(call: AttentionCall, probs_grad: torch.Tensor, query: torch.Tensor | None = None,
             key: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H): ∂m/∂A · (A(clean) − A(patched)), the patched probabilities recomputed exactly.

    `query` (B, H, P, hd) replaces the queries, `key` (B, KV, K, hd) the keys (`patched_keys`)."""
    return _per_head(call.probs.detach() - call.replay(query, key), probs_grad)


def qk_linear(call: AttentionCall, probs_grad: torch.Tensor, query: torch.Tensor | None = None,
              key: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H): (n − ñ) · ∂m/∂n for each head's query or key, ∂m/∂n = J_Aᵀ ∂m/∂A through the head's own softmax
    (plain AtP: the softmax linearised at the clean queries and keys).

    A key/value head's key is read by `group` query heads; each head's share of ∂m/∂key is taken in its own
    backward pass through the probabilities, `group` passes for all heads (head h reads key head h // group)."""
    q, k = call.query.detach(), call.key.detach()
    patched = query is not None
    if patched == (key is not None):
        raise ValueError("patch the queries or the keys")
    clean = q if patched else k
    moved = (clean - (query if patched else key).to(clean.dtype)).float()  # type: ignore[union-attr]
    x = clean.clone().requires_grad_(True)
    with torch.enable_grad():
        probs = call.attention_probs(x, k) if patched else call.attention_probs(q, x)
    heads = probs.shape[1]
    group = 1 if patched else heads // k.shape[1]
    out = torch.zeros(probs.shape[0], heads, dtype=torch.float32, device=probs.device)
    for j in range(group):
        mask = torch.zeros(heads, dtype=probs_grad.dtype, device=probs_grad.device)
        mask[j::group] = 1.0  # heads j, j + group, …: one per key/value head
        (grad,) = torch.autograd.grad(probs, x, probs_grad * mask.view(1, -1, 1, 1), retain_graph=j < group - 1)
        out[:, j::group] = (moved * grad.float()).sum(dim=(-1, -2))
    return out
