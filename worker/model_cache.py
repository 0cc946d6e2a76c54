"""Loading models once per worker process and keeping them (LRU, bounded by count)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from service.schemas import ModelInfo
from worker.engine.architecture import check_supported, describe
from worker.model_sources import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    revision: str | None
    file_sha256: str | None

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_kwargs(source: ModelSource) -> dict[str, object]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def model_info(source: ModelSource) -> ModelInfo:
    """Shape facts from the config alone (no weights), for the API to validate jobs against."""
    config = AutoConfig.from_pretrained(source.location, **_load_kwargs(source))
    check_supported(config)
    n_heads = int(config.num_attention_heads)
    return ModelInfo(
        id=source.id,
        architecture=str(config.model_type),
        n_layers=int(config.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        d_model=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        parallel_blocks=config.model_type == "gpt_neox" and bool(getattr(config, "use_parallel_residual", True)),
        source=source.description,
    )


def load_model(source: ModelSource, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The real loading path: a GGUF file, a local folder, or a hub id (where the hub is reachable)."""
    kwargs = _load_kwargs(source)
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    model = model.to(device).eval()
    describe(model)  # refuse unsupported layouts before any job runs
    file_path = source.file_path()
    return LoadedModel(
        source=source,
        model=model,
        tokenizer=tokenizer,
        revision=getattr(model.config, "_commit_hash", None),
        file_sha256=_sha256(file_path) if file_path is not None else None,
    )


class ModelCache:
    """At most `capacity` loaded models per process; the least recently used is dropped first."""

    def __init__(self, sources: dict[str, ModelSource], capacity: int = 2, device: str = "cpu") -> None:
        self.sources = sources
        self.capacity = capacity
        self.device = device
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            if model_id not in self.sources:
                raise KeyError(f"this worker does not serve model '{model_id}'")
            log.info("loading model %s from %s", model_id, self.sources[model_id].description)
            loaded = load_model(self.sources[model_id], device=self.device)
            self._loaded[model_id] = loaded
            while len(self._loaded) > self.capacity:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("evicted model %s", evicted)
            return loaded
