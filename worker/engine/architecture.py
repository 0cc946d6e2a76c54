"""Where each component lives in a Hugging Face causal LM, per architecture family.

The engine never hard-codes module paths elsewhere: everything it touches is located here, so a new family is
one entry in `_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """The model cannot be decomposed linearly at the readout (or its layout is unknown)."""


@dataclass(frozen=True)
class Family:
    """How to find the blocks of one model family."""

    blocks: Callable[[nn.Module], nn.ModuleList]
    attn: str  # attribute of a block whose output[0] is the attention output
    mlp: str
    out_proj: str  # attribute of the attention module: the projection whose input is the concatenated heads
    out_proj_is_conv1d: bool
    final_norm: Callable[[nn.Module], nn.Module]
    norm_kind: str  # "rms" or "layer"
    attn_norm: str  # attribute of a block: the norm before attention
    mlp_norm: str  # attribute of a block: the norm before the MLP
    rotary: Callable[[nn.Module], nn.Module] | None  # the model's rotary embedding, None for learned positions
    cache_keyword: str  # the keyword under which the attention module takes its key/value cache


_LLAMA_LIKE = Family(
    blocks=lambda m: m.model.layers,
    attn="self_attn",
    mlp="mlp",
    out_proj="o_proj",
    out_proj_is_conv1d=False,
    final_norm=lambda m: m.model.norm,
    norm_kind="rms",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    rotary=lambda m: m.model.rotary_emb,
    cache_keyword="cache",
)

_FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": Family(
        blocks=lambda m: m.transformer.h,
        attn="attn",
        mlp="mlp",
        out_proj="c_proj",
        out_proj_is_conv1d=True,
        final_norm=lambda m: m.transformer.ln_f,
        norm_kind="layer",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        rotary=None,
        cache_keyword="cache",
    ),
    "gpt_neox": Family(
        blocks=lambda m: m.gpt_neox.layers,
        attn="attention",
        mlp="mlp",
        out_proj="dense",
        out_proj_is_conv1d=False,
        final_norm=lambda m: m.gpt_neox.final_layer_norm,
        norm_kind="layer",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        rotary=lambda m: m.gpt_neox.rotary_emb,
        cache_keyword="layer_past",
    ),
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))


@dataclass(frozen=True)
class Architecture:
    """A located model: its blocks, readout and shape facts."""

    model_type: str
    family: Family
    blocks: nn.ModuleList
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    parallel_blocks: bool
    final_norm: nn.Module
    unembed: nn.Module
    rotary: nn.Module | None

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.attn)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.mlp)

    def attn_norm(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.attn_norm)

    def mlp_norm(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.mlp_norm)

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(self.attn(layer), self.family.out_proj)

    def head_weight(self, layer: int, head: int) -> torch.Tensor:
        """W_O restricted to one head: (d_model, head_dim), so that contribution = z_head @ W.T."""
        weight = self.out_proj(layer).weight
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return weight[cols, :].T if self.family.out_proj_is_conv1d else weight[:, cols]

    def norm_eps(self) -> float:
        norm = self.final_norm
        return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))

    def norm_weight(self) -> torch.Tensor:
        return self.final_norm.weight


def _config_flag(config: object, name: str, default: bool) -> bool:
    value = getattr(config, name, default)
    return bool(default if value is None else value)


def has_parallel_blocks(config: object) -> bool:
    """Attention and MLP read the same block input (Pythia); GPT-NeoX defaults to it."""
    return getattr(config, "model_type", None) == "gpt_neox" and _config_flag(config, "use_parallel_residual", True)


def check_supported(config: object) -> None:
    """Refuse, with a reason, what the engine cannot decompose; shared by the worker's model registry."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "final_logit_softcapping", None):
        raise UnsupportedArchitecture(
            f"'{model_type}' caps its final logits (soft-capping), which makes the readout non-linear: "
            "direct effects would not add up; not supported"
        )
    if model_type not in _FAMILIES:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def describe(model: nn.Module) -> Architecture:
    """Locate the components of a loaded model, or raise UnsupportedArchitecture."""
    config = model.config
    check_supported(config)
    family = _FAMILIES[config.model_type]
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or d_model // n_heads)
    blocks = family.blocks(model)
    return Architecture(
        model_type=config.model_type,
        family=family,
        blocks=blocks,
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        d_model=d_model,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        parallel_blocks=has_parallel_blocks(config),
        final_norm=family.final_norm(model),
        unembed=model.get_output_embeddings(),
        rotary=family.rotary(model) if family.rotary is not None else None,
    )
