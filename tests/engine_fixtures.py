"""Pytest fixtures for engine tests: tiny saved-and-reloaded models and tokenised prompts.

Import the fixtures explicitly in a test module (`from tests.engine_fixtures import tiny_models, prompt_set`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from tests.tiny_models import TINY_ARCHS, build_tiny_model, load_tiny_model, load_tokenizer

# Different lengths on purpose (right-aligned resampling, shorter-source rule).
PROMPTS = (
    "The capital of France is",
    "When the music stopped, everyone in the crowded hall turned to look at",
    "Water boils at",
    "In 1969 the first people to walk on the Moon were Neil Armstrong and",
)
ANSWERS = (" Paris", " the", " 100", " Buzz")
COUNTERFACTUALS = (" London", " a", " zero", " Michael")
MEAN_REFERENCE = (
    "A quick brown fox jumps over the lazy dog because",
    "Seven",
    "The river flows",
)


@dataclass(frozen=True)
class PromptSet:
    token_ids: list[torch.Tensor]
    target_ids: list[int]
    counterfactual_ids: list[int]
    mean_reference_ids: list[torch.Tensor]


def _ids(text: str) -> torch.Tensor:
    return torch.tensor(load_tokenizer()(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@pytest.fixture(scope="session")
def prompt_set() -> PromptSet:
    return PromptSet(
        token_ids=[_ids(p) for p in PROMPTS],
        target_ids=[int(_ids(a)[0]) for a in ANSWERS],
        counterfactual_ids=[int(_ids(c)[0]) for c in COUNTERFACTUALS],
        mean_reference_ids=[_ids(p) for p in MEAN_REFERENCE],
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(arch)`: the folder of a tiny model saved with save_pretrained (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch, seed=TINY_ARCHS.index(arch))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], PreTrainedModel]:
    """`tiny_models(arch)`: the tiny model loaded with AutoModelForCausalLM.from_pretrained (eval, float32)."""
    loaded: dict[str, PreTrainedModel] = {}

    def get(arch: str) -> PreTrainedModel:
        if arch not in loaded:
            loaded[arch] = load_tiny_model(tiny_model_dir(arch))
        return loaded[arch]

    return get
