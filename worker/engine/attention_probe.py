"""Attention probabilities and the queries and keys behind them, kept in the differentiable pass, and the softmax
recomputed exactly for patched queries or keys (AtP*'s QK fix, worker/engine/qk_fix.py).

Every supported family computes attention through transformers' attention interface: the attention module looks up
the function named by its config's `_attn_implementation` and calls it with the post-rotary (post-QK-norm) queries,
the keys and values (after the cache joined the clean prefix to the recomputed positions), the mask and the
module's own keywords (scaling, soft-capping). The probe registers one more implementation under its own name. It
calls the family's own eager attention (the `eager_attention_forward` of the module's modelling file: the model's
masking, scaling, soft-capping and grouped keys, nothing re-derived here), and keeps every call's tensors, so

- the probabilities are a tensor of the graph that the metric is differentiated against (∂m/∂A), and
- `AttentionCall.replay` recomputes them for other queries or keys with the very same function.

While `probed_attention` is active the model's configs name the probe; on exit they name what they named before,
whatever happened. The probe needs explicit masks (eager attention has no implicit causal mask): the differentiable
pass builds them (worker/engine/gradients.py passes `eager_attention=True` to the batch inputs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from worker.engine.architecture import Architecture

PROBE_IMPLEMENTATION = "hydra_attention_probe"

EagerAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def family_eager_attention(module: nn.Module) -> EagerAttention:
    """The eager attention function of the module's own modelling file (every supported family defines one)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise TypeError(f"{type(module).__name__}'s modelling file has no eager_attention_forward to probe")
    return eager  # type: ignore[no-any-return]


@dataclass
class AttentionCall:
    """One layer's attention in the differentiable pass (B rows, H query heads, KV key/value heads, P queries, K keys).

    The queries are the recomputed positions (the final one, or every position); the keys are every key those
    queries see, the clean prefix first, so the recomputed positions' keys are the last P.
    """

    module: nn.Module
    query: torch.Tensor  # (B, H, P, hd): post-rotary queries
    key: torch.Tensor  # (B, KV, K, hd): post-rotary keys
    value: torch.Tensor  # (B, KV, K, hd)
    mask: torch.Tensor | None  # additive, broadcasting to (B, H, P, K)
    keywords: dict[str, Any]  # scaling, dropout, soft-capping …: what the module passed
    probs: torch.Tensor  # (B, H, P, K): softmax of the attention logits, a tensor of the graph

    def attention_probs(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(B, H, P, K): the probabilities for these queries and keys, by the model's own attention function."""
        eager = family_eager_attention(self.module)
        _, probs = eager(self.module, query, key, self.value, self.mask, **self.keywords)
        return probs

    @torch.no_grad()
    def replay(self, query: torch.Tensor | None = None, key: torch.Tensor | None = None) -> torch.Tensor:
        """The probabilities with the queries and/or keys replaced (no graph): the softmax computed exactly."""
        q = self.query.detach() if query is None else query
        k = self.key.detach() if key is None else key
        return self.attention_probs(q, k)


@dataclass
class AttentionRecorder:
    """The calls of one pass, one per layer: the pass sets `layer` before it runs that layer's attention."""

    n_layers: int
    layer: int = -1
    calls: list[AttentionCall | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.calls = [None] * self.n_layers

    def keep(self, call: AttentionCall) -> None:
        if not 0 <= self.layer < self.n_layers:
            raise RuntimeError("the attention probe saw a call outside a layer of the differentiable pass")
        self.calls[self.layer] = call

    def call(self, layer: int) -> AttentionCall:
        kept = self.calls[layer]
        if kept is None:
            raise RuntimeError(f"layer {layer}'s attention was not probed")
        return kept


_ACTIVE: ContextVar[AttentionRecorder | None] = ContextVar("hydra_attention_recorder", default=None)


def _probe(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **keywords: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered implementation: the family's eager attention, its tensors kept by the active recorder."""
    output, probs = family_eager_attention(module)(module, query, key, value, attention_mask, **keywords)
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.keep(AttentionCall(module, query, key, value, attention_mask, dict(keywords), probs))
    return output, probs


# A new name in transformers' registry of attention functions; no existing entry changes.
AttentionInterface.register(PROBE_IMPLEMENTATION, _probe)


def _configs(arch: Architecture) -> list[Any]:
    """The distinct config objects the attention modules read `_attn_implementation` from."""
    seen: dict[int, Any] = {}
    for layer in range(arch.n_layers):
        config = getattr(arch.attn(layer), "config", None)
        if config is None:
            raise TypeError(f"{type(arch.attn(layer)).__name__} has no config naming its attention implementation")
        seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def probed_attention(arch: Architecture) -> Iterator[AttentionRecorder]:
    """Within: every attention call runs through the probe and is kept; on exit the configs are as before."""
    configs = _configs(arch)
    before = [config._attn_implementation for config in configs]
    recorder = AttentionRecorder(arch.n_layers)
    token = _ACTIVE.set(recorder)
    try:
        for config in configs:
            config._attn_implementation = PROBE_IMPLEMENTATION
        yield recorder
    finally:
        for config, name in zip(configs, before, strict=True):
            config._attn_implementation = name
        _ACTIVE.reset(token)
