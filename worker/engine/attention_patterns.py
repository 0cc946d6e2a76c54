"""Reading and replacing attention patterns (activation patching's `head.L.H.pattern` sites).

Every supported family computes attention through transformers' attention interface (worker/engine/
attention_probe.py): the attention module looks up the function its config's `_attn_implementation` names. This
module registers one more under its own name. It runs the family's own eager attention (masking, scaling,
soft-capping, grouped keys: nothing re-derived here), then, where asked, replaces rows of the probabilities and
recomputes the output from them: output = probs · values, heads moved back behind positions, as every family's
eager attention does (dropout is off in evaluation).

While `patterns_of` is active the layer's configs name this implementation; on exit they name what they named
before, whatever happened. The engine passes explicit masks, which eager attention needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from worker.engine.attention_probe import family_eager_attention

PATTERN_IMPLEMENTATION = "hydra_attention_patterns"


@dataclass
class PatternEdit:
    """What one attention call keeps and replaces: `replace[(row, head)]` is the probability row (K,) that takes the
    place of that row's and head's first query's; `kept` is the call's probabilities (B, H, P, K) after the edit."""

    replace: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    kept: torch.Tensor | None = None


_ACTIVE: ContextVar[PatternEdit | None] = ContextVar("hydra_attention_patterns", default=None)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **keywords: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered implementation: the family's eager attention, with the active edit's rows replaced."""
    output, probs = family_eager_attention(module)(module, query, key, value, attention_mask, **keywords)
    edit = _ACTIVE.get()
    if edit is None:
        return output, probs
    if edit.replace:
        probs = probs.clone()
        for (row, head), replacement in edit.replace.items():
            probs[row, head, 0, : replacement.shape[0]] = replacement.to(probs.dtype)
            probs[row, head, 0, replacement.shape[0] :] = 0
        groups = query.shape[1] // value.shape[1]  # query heads per key/value head
        values = value.repeat_interleave(groups, dim=1) if groups > 1 else value  # (B, H, K, hd)
        output = torch.matmul(probs, values).transpose(1, 2).contiguous()  # (B, P, H, hd)
    edit.kept = probs
    return output, probs


# A new name in transformers' registry of attention functions; no existing entry changes.
AttentionInterface.register(PATTERN_IMPLEMENTATION, _attention)


@contextmanager
def patterns_of(attention: nn.Module, edit: PatternEdit) -> Iterator[PatternEdit]:
    """Within: `attention`'s calls run through the pattern implementation with `edit`; on exit its config is as
    before."""
    config: Any = getattr(attention, "config", None)
    if config is None:
        raise TypeError(f"{type(attention).__name__} has no config naming its attention implementation")
    before = config._attn_implementation
    token = _ACTIVE.set(edit)
    try:
        config._attn_implementation = PATTERN_IMPLEMENTATION
        yield edit
    finally:
        config._attn_implementation = before
        _ACTIVE.reset(token)
