"""Where each component lives in a Hugging Face causal LM, per architecture family.

The engine never hard-codes module paths elsewhere: everything it touches is located here, so a new family is
one entry in `_FAMILIES`. A family says how a decoder block is wired, since the engine re-runs blocks itself:

- pre-norm blocks (Llama and most others): `x + attn(norm(x))`, then `x + mlp(norm(x))`;
- post-norm blocks (OLMo 2: no pre-norms; Gemma 2/3: both, "sandwich"): the component's output is the post-norm's
  output, `x + post_norm(attn(pre_norm(x)))`: what a component writes into the residual stream is what it is;
- parallel blocks (GPT-J, Pythia): attention and MLP read the same block input, `x + attn(n1(x)) + mlp(n2(x))`.

Attention variants (grouped/multi-query, QK-norm, logit soft-capping, partial rotary) live inside the model's own
attention module and need nothing here; sliding windows (Mistral, Gemma 2/3, Qwen) and per-layer rotary tables
(Gemma 3) do, because the engine builds the attention masks and position embeddings of the rows it recomputes.
MoE MLPs (Mixtral, Qwen-MoE) are the `mlp.L` component as a whole: router and experts are inside the module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, cast

import torch
from torch import nn

# A loaded Hugging Face causal LM (a PreTrainedModel). Where its blocks, norms and rotary tables live differs per
# family (model.layers, transformer.h, gpt_neox.layers ...), and torch types every module attribute
# `Tensor | Module`: the per-family accessors below take the model untyped.
HFModel: TypeAlias = Any


def weight_of(module: nn.Module) -> torch.Tensor:
    """A module's `weight` parameter (torch types module attributes `Tensor | Module`)."""
    return cast(torch.Tensor, module.weight)


class UnsupportedArchitecture(ValueError):
    """The model cannot be decomposed into components writing to one residual stream (or its layout is unknown)."""


@dataclass(frozen=True)
class Family:
    """How to find the blocks of one model family, and how a block is wired."""

    blocks: Callable[[HFModel], nn.ModuleList]
    attn: str  # attribute of a block whose output[0] is the attention output (before any post-norm)
    mlp: str
    out_proj: str  # attribute of the attention module: the projection whose input is the concatenated heads
    out_proj_is_conv1d: bool
    final_norm: Callable[[HFModel], nn.Module]
    norm_kind: str  # "rms" or "layer"
    attn_norm: str | None  # attribute of a block: the norm before attention (None: OLMo 2 has none)
    mlp_norm: str | None  # attribute of a block: the norm before the MLP
    rotary: Callable[[HFModel], nn.Module] | None  # the model's rotary embedding, None for learned positions
    cache_keyword: str  # the keyword under which the attention module takes its key/value cache
    attn_post_norm: str | None = None  # attribute of a block: the norm applied to the attention output (post-norm)
    mlp_post_norm: str | None = None
    gain_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    rotary_per_layer_type: bool = False  # Gemma 3: local and global layers use different rotary tables
    parallel: Callable[[object], bool] = lambda config: False


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

_GEMMA = Family(
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
    gain_offset=1.0,
)

# Gemma 2 and 3: "sandwich" blocks, a norm before and after each of attention and MLP.
_GEMMA_SANDWICH = Family(
    blocks=lambda m: m.model.layers,
    attn="self_attn",
    mlp="mlp",
    out_proj="o_proj",
    out_proj_is_conv1d=False,
    final_norm=lambda m: m.model.norm,
    norm_kind="rms",
    attn_norm="input_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    rotary=lambda m: m.model.rotary_emb,
    cache_keyword="cache",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    gain_offset=1.0,
)

_FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,  # the sparse MoE block is the `mlp` attribute
    "qwen2": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,  # QK-norm is inside the attention module
    "qwen3_moe": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,  # fused qkv and gate/up projections; o_proj is a plain Linear
    "gemma": _GEMMA,
    "gemma2": _GEMMA_SANDWICH,
    "gemma3_text": replace(_GEMMA_SANDWICH, rotary_per_layer_type=True),
    "olmo2": Family(
        blocks=lambda m: m.model.layers,
        attn="self_attn",
        mlp="mlp",
        out_proj="o_proj",
        out_proj_is_conv1d=False,
        final_norm=lambda m: m.model.norm,
        norm_kind="rms",
        attn_norm=None,
        mlp_norm=None,
        rotary=lambda m: m.model.rotary_emb,
        cache_keyword="cache",
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    ),
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
    "gptj": Family(
        blocks=lambda m: m.transformer.h,
        attn="attn",
        mlp="mlp",
        out_proj="out_proj",
        out_proj_is_conv1d=False,
        final_norm=lambda m: m.transformer.ln_f,
        norm_kind="layer",
        attn_norm="ln_1",
        mlp_norm="ln_1",  # one norm feeds both branches
        rotary=lambda m: m.transformer.rotary_emb,
        cache_keyword="cache",
        parallel=lambda config: True,
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
        parallel=lambda config: _config_flag(config, "use_parallel_residual", True),
    ),
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))

# What /v1/models calls each model_type (keys: exactly the supported architectures; tests check).
FAMILY_NAMES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral (MoE)",
    "qwen2": "Qwen 2 / 2.5",
    "qwen2_moe": "Qwen 2 MoE",
    "qwen3": "Qwen 3",
    "qwen3_moe": "Qwen 3 MoE",
    "phi3": "Phi-3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "olmo2": "OLMo 2",
    "gpt2": "GPT-2",
    "gptj": "GPT-J",
    "gpt_neox": "GPT-NeoX (Pythia)",
}

# Families the engine knows it cannot decompose, with the reason (anything else unknown is refused generically).
_NOT_DECOMPOSABLE = {
    "gemma3n": "Gemma 3n keeps several residual streams (AltUp) and feeds per-layer inputs to every block, so no "
    "single residual stream sums the components' outputs",
    "mamba": "Mamba has no attention or MLP blocks writing into a residual stream that a final readout sums",
    "falcon_mamba": "Falcon-Mamba has no attention or MLP blocks writing into a residual stream that a final readout "
    "sums",
    "recurrent_gemma": "RecurrentGemma's recurrent blocks carry state across positions outside the residual stream",
}


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
    sliding_windows: tuple[int | None, ...]  # per layer: how many keys a query sees (itself included), None = all
    layer_types: tuple[str, ...] | None  # per layer, for per-layer-type rotary tables (Gemma 3)
    final_logit_softcap: float | None  # Gemma 2: logits = cap · tanh(z / cap)
    eager_attention: bool  # attention runs without SDPA's implicit causal mask: the engine passes every mask

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.attn)

    @property
    def cache_keyword(self) -> str:
        """The keyword under which this transformers release's attention module takes its key/value cache."""
        return cache_keyword(type(self.attn(0)), self.family.cache_keyword)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.family.mlp)

    def _norm(self, layer: int, name: str | None) -> nn.Module:
        return nn.Identity() if name is None else getattr(self.blocks[layer], name)

    def attn_norm(self, layer: int) -> nn.Module:
        return self._norm(layer, self.family.attn_norm)

    def mlp_norm(self, layer: int) -> nn.Module:
        return self._norm(layer, self.family.mlp_norm)

    def attn_post_norm(self, layer: int) -> nn.Module:
        return self._norm(layer, self.family.attn_post_norm)

    def mlp_post_norm(self, layer: int) -> nn.Module:
        return self._norm(layer, self.family.mlp_post_norm)

    @property
    def post_norm(self) -> bool:
        """A component's output is a norm's output: not linear in its heads (their deltas are computed, not summed)."""
        return self.family.attn_post_norm is not None

    def attn_writer(self, layer: int) -> nn.Module:
        """The module whose output is what attention writes into the residual stream (the `attn.L` component)."""
        return self.attn_post_norm(layer) if self.family.attn_post_norm else self.attn(layer)

    def mlp_writer(self, layer: int) -> nn.Module:
        return self.mlp_post_norm(layer) if self.family.mlp_post_norm else self.mlp(layer)

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(self.attn(layer), self.family.out_proj)

    def head_weight(self, layer: int, head: int) -> torch.Tensor:
        """W_O restricted to one head: (d_model, head_dim), so that contribution = z_head @ W.T."""
        weight = weight_of(self.out_proj(layer))
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return weight[cols, :].T if self.family.out_proj_is_conv1d else weight[:, cols]

    def post_norm_head_change(
        self, layer: int, head: int, head_in: torch.Tensor, replacement: torch.Tensor
    ) -> torch.Tensor:
        """A head's Δ in a post-norm block at each of P positions, (P, d) float32: the attention output's change
        when only that head's slice of W_O's input (head_in, (P, H·hd)) is replaced by `replacement` (P, hd).

        The post-norm is not linear, so the head's write is not its W_O slice times its change; every other input
        of the block's output is its clean value at each position, so this change is exactly the ablation's.
        """
        ablated = head_in.clone()
        ablated[:, head * self.head_dim : (head + 1) * self.head_dim] = replacement.to(ablated.dtype)
        written = self.attn_post_norm(layer)(self.out_proj(layer)(torch.stack([head_in, ablated])))
        return written[0].float() - written[1].float()

    def attn_post_norm_scale(self, layer: int, attention: torch.Tensor) -> torch.Tensor:
        """The attention post-norm's RMS divisor s(a) of each row of the attention output a (…, d), float32."""
        norm = self.attn_post_norm(layer)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        return torch.sqrt(attention.float().pow(2).mean(dim=-1) + eps)

    def attn_post_norm_gain(self, layer: int) -> torch.Tensor:
        """The attention post-norm's effective gain g (Gemma stores g − 1), float32."""
        weight = weight_of(self.attn_post_norm(layer)).float()
        return weight + self.family.gain_offset if self.family.gain_offset else weight

    def norm_eps(self) -> float:
        norm = self.final_norm
        return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))

    def norm_weight(self) -> torch.Tensor:
        """The final norm's effective gain g (Gemma stores g − 1)."""
        weight = weight_of(self.final_norm)
        return weight + self.family.gain_offset if self.family.gain_offset else weight

    def position_embeddings(self, layer: int, probe: torch.Tensor, position_ids: torch.Tensor) -> object:
        """The rotary (cos, sin) of `position_ids` for one layer's attention (None for learned positions)."""
        if self.rotary is None:
            return None
        if self.family.rotary_per_layer_type and self.layer_types is not None:
            return self.rotary(probe, position_ids, self.layer_types[layer])
        return self.rotary(probe, position_ids)

    def rotary_key(self, layer: int) -> str:
        """Layers with the same key share position embeddings."""
        if self.family.rotary_per_layer_type and self.layer_types is not None:
            return self.layer_types[layer]
        return "all"


def _config_flag(config: object, name: str, default: bool) -> bool:
    value = getattr(config, name, default)
    return bool(default if value is None else value)


def has_parallel_blocks(config: object) -> bool:
    """Attention and MLP read the same block input (GPT-J; Pythia, where GPT-NeoX defaults to it)."""
    family = _FAMILIES.get(str(getattr(config, "model_type", "")))
    return family is not None and family.parallel(config)


def sliding_windows(config: object, n_layers: int) -> tuple[int | None, ...]:
    """Per layer, the number of keys a query attends to (itself included), as the model's own masks build them.

    Models with `layer_types` (Gemma 2/3, Qwen 2/3, Qwen2-MoE) window only their "sliding_attention" layers; the
    others (Mistral, Mixtral, Phi-3, Qwen3-MoE) window every layer when `sliding_window` is set.
    """
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return (None,) * n_layers
    if layer_types is not None:
        return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types[:n_layers])
    return (int(window),) * n_layers


def has_post_norm(config: object) -> bool:
    """Whether the model's blocks normalise the attention output before adding it to the residual stream (OLMo 2,
    Gemma 2 and 3): what the API needs to refuse the knockout sets the engine cannot separate (sweep.knockout_sets)."""
    family = _FAMILIES.get(str(getattr(config, "model_type", "")))
    return family is not None and family.attn_post_norm is not None


def head_basis_refusal(config: object) -> str | None:
    """Why the head response basis has no definition for this model (None: it has one), at any position.

    In a post-norm block a head's basis output is its share of the block's output at the block's own scale
    (docs/concepts/definitions.md, "Response basis"); an output-projection bias is rescaled by the post-norm without
    being any head's, so the heads would not add up to their layer.
    """
    model_type = str(getattr(config, "model_type", ""))
    family = _FAMILIES.get(model_type)
    if family is None or family.attn_post_norm is None or not getattr(config, "attention_bias", False):
        return None
    return (
        f"response_basis 'heads' is not defined for this '{model_type}' model: its blocks normalise the attention "
        "output after an output projection with a bias, which the norm rescales but no head writes, so the heads' "
        "shares would not add up to their layer; use response_basis 'layers' (head components are still measured)"
    )


def final_logit_softcap(config: object) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


# transformers renamed the cache argument of models and attention modules (`past_key_values` in 5.17, `cache` by
# 5.24); a module's own name is read off its forward's signature, the family's name tried first, then these.
_CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past", "past_key_value")
_cache_keyword_of: dict[tuple[type[nn.Module], str], str] = {}  # the signature is read once per class


def cache_keyword(module: type[nn.Module], preferred: str = "cache") -> str:
    """The keyword under which `module`'s forward takes its key/value cache in the installed transformers."""
    key = (module, preferred)
    if key not in _cache_keyword_of:
        parameters = inspect.signature(module.forward).parameters
        names = (preferred, *_CACHE_KEYWORDS)
        _cache_keyword_of[key] = next((name for name in names if name in parameters), preferred)
    return _cache_keyword_of[key]


def _gptj_rotary_is_model_level() -> bool:
    """GPT-J's rotary embedding is one module of the model (an argument of each attention) in newer transformers
    releases (5.24); older ones (5.17) compute it inside each attention module, which the engine does not drive."""
    from transformers.models.gptj import modeling_gptj

    return "position_embeddings" in inspect.signature(modeling_gptj.GPTJAttention.forward).parameters


def attention_implementation(config: object) -> str:
    """SDPA, except where the model's attention needs eager (Gemma 2's attention-logit soft-capping)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def check_supported(config: object) -> None:
    """Refuse, with a reason, what the engine cannot decompose; shared by the worker's model registry."""
    model_type = str(getattr(config, "model_type", "?"))
    if model_type in _NOT_DECOMPOSABLE:
        reason = _NOT_DECOMPOSABLE[model_type]
        raise UnsupportedArchitecture(f"architecture '{model_type}' cannot be decomposed: {reason}")
    if model_type not in _FAMILIES:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if model_type == "gptj" and not _gptj_rotary_is_model_level():
        import transformers

        raise UnsupportedArchitecture(
            f"'gptj' needs a newer transformers than {transformers.__version__} here: its GPT-J computes the rotary "
            "embedding inside each attention module, which the engine does not drive (5.24 has the model-level one)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture(
            f"'{model_type}' with bidirectional attention: an ablation at the final position would change every "
            "earlier position too, which is not a causal decoder; not supported"
        )


def describe(model: nn.Module) -> Architecture:
    """Locate the components of a loaded model, or raise UnsupportedArchitecture."""
    lm: HFModel = model
    config = lm.config
    check_supported(config)
    family = _FAMILIES[config.model_type]
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or d_model // n_heads)
    blocks = family.blocks(model)
    layer_types = getattr(config, "layer_types", None)
    return Architecture(
        model_type=config.model_type,
        family=family,
        blocks=blocks,
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        d_model=d_model,
        vocab_size=int(lm.get_output_embeddings().weight.shape[0]),
        parallel_blocks=family.parallel(config),
        final_norm=family.final_norm(model),
        unembed=lm.get_output_embeddings(),
        rotary=family.rotary(model) if family.rotary is not None else None,
        sliding_windows=sliding_windows(config, len(blocks)),
        layer_types=tuple(layer_types) if layer_types is not None else None,
        final_logit_softcap=final_logit_softcap(config),
        eager_attention=getattr(config, "_attn_implementation", "sdpa") != "sdpa",
    )


# --- a head's query, key and value (activation patching's head.L.H.q|k|v sites) ----------------------------------

# Families whose attention computes q, k and v in one fused projection: a head's query, key or value is not the
# output of a module of its own, and the engine does not address columns of a fused output.
_FUSED_QKV = {
    "gpt2": "GPT-2 computes q, k and v in one fused projection (c_attn)",
    "gpt_neox": "GPT-NeoX (Pythia) computes q, k and v in one fused, per-head interleaved projection "
    "(query_key_value)",
    "phi3": "Phi-3 computes q, k and v in one fused projection (qkv_proj)",
}
# Families whose QK-norm normalises the whole projection (every head together): one head's query or key before the
# norm is not that head's alone after it.
_WHOLE_PROJECTION_QK_NORM = {"olmo2": "OLMo 2 normalises the query and key projections over all heads together"}


def head_part_refusal(arch: Architecture, part: str) -> str | None:
    """Why a head's `part` ("q", "k", "v", "pattern") cannot be patched on this model (None: it can). Attention
    patterns can be patched on every family: they are replaced inside transformers' attention interface."""
    model_type = arch.model_type
    if part == "pattern":
        return None  # replaced inside transformers' attention interface (worker/engine/attention_patterns.py)
    if model_type in _FUSED_QKV:
        return f"{_FUSED_QKV[model_type]}; patch head.L.H (the head's output) instead"
    if part in ("q", "k") and model_type in _WHOLE_PROJECTION_QK_NORM:
        return f"{_WHOLE_PROJECTION_QK_NORM[model_type]}; patch head.L.H.v or head.L.H instead"
    if part in ("k", "v") and arch.n_kv_heads < arch.n_heads:
        group = arch.n_heads // arch.n_kv_heads
        return (
            f"this model's keys and values are shared by groups of {group} query heads ({arch.n_heads} query heads, "
            f"{arch.n_kv_heads} key/value heads: grouped- or multi-query attention), so no {part} belongs to one "
            "head; patch head.L.H.q or head.L.H instead"
        )
    return None


def head_part_projection(arch: Architecture, layer: int, part: str) -> nn.Module:
    """The projection whose output holds every head's `part` ("q", "k" or "v"), head-major columns of head_dim."""
    return getattr(arch.attn(layer), f"{part}_proj")
