"""Loading models once per worker process and keeping them (LRU, bounded by count and by parameter memory).

`HYDRA_MODEL_CACHE_SIZE` (2) models at most, and, when `HYDRA_MODEL_CACHE_BYTES` is set, at most that many bytes
of parameters (and buffers) summed over the cached models: before a model loads, the least recently used ones are
dropped until its estimated size (from its config, on the meta device: no weights) fits. A model larger than the
whole budget still loads, alone.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hydra_ablate_client.wire import ModelInfo
from worker.builtin_models import sha256_file
from worker.devices import device_name, normalise_device
from worker.engine.architecture import (
    FAMILY_NAMES,
    attention_implementation,
    check_supported,
    describe,
    final_logit_softcap,
    has_parallel_blocks,
    has_post_norm,
    head_basis_refusal,
)
from worker.engine.clean import CleanRunCache
from worker.engine.errors import InputError
from worker.model_sources import ModelSource
from worker.worker_settings import DEFAULT_CLEAN_CACHE_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    revision: str | None
    file_sha256: str | None
    # The clean runs of this model's recent prompts, on its device (worker/engine/clean.py): the chunks of a job
    # share their sources' clean passes instead of each running them again.
    clean_runs: CleanRunCache = field(default_factory=lambda: CleanRunCache(DEFAULT_CLEAN_CACHE_BYTES), compare=False)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)


# Loading chatter that is not a problem: transformers' and gguf's progress bars (GGUF de-quantisation, "Loading
# weights") and their advice-level warnings. In a worker they reach the log as one WARNING line per bar update,
# in the terminal of `hydra-ablate serve` / `demo` beside the CLI's own progress bar.
_QUIET_WARNING_MODULES = r"(transformers|gguf|huggingface_hub|tokenizers)(\.|$)"


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the progress bars, info lines and warnings of loading a model, for the duration of the load only.

    Errors stay visible: exceptions propagate as they are, and transformers' ERROR-level log lines are kept.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()  # transformers' own bars ("Loading weights") and huggingface_hub's
    hf_logging.set_verbosity_error()
    if gguf_tqdm is not None:  # the GGUF de-quantisation bar is a plain tqdm of that module
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_QUIET_WARNING_MODULES)
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm  # type: ignore[attr-defined]
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()


def _load_kwargs(source: ModelSource) -> dict[str, object]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def model_info(source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ModelInfo:
    """Shape facts from the config alone (no weights), for the API to validate jobs against, plus where and in what
    precision this worker runs the model."""
    with quiet_loading():
        config = AutoConfig.from_pretrained(source.location, **_load_kwargs(source))
    check_supported(config)
    n_heads = int(config.num_attention_heads)
    return ModelInfo(
        family=FAMILY_NAMES[str(config.model_type)],
        dtype=str(dtype).removeprefix("torch."),
        device=normalise_device(device),
        device_name=device_name(device),
        final_logit_softcap=final_logit_softcap(config),
        head_basis_refusal=head_basis_refusal(config),
        id=source.id,
        architecture=str(config.model_type),
        n_layers=int(config.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        d_model=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        parallel_blocks=has_parallel_blocks(config),
        post_norm=has_post_norm(config),
        source=source.kind,  # not the location: the model list is open to callers without a key
        about=source.about,
        licence=source.licence,
    )


def tokenizer_json(source: ModelSource) -> str | None:
    """The model's fast tokenizer as Hugging Face `tokenizers` JSON (None for slow tokenizers)."""
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source.location, **_load_kwargs(source))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None


def load_model(source: ModelSource, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The real loading path: a GGUF file, a local folder, or a hub id (where the hub is reachable)."""
    kwargs = _load_kwargs(source)
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        # SDPA (eager only where the model's attention needs it); the engine passes explicit masks wherever SDPA's
        # implicit causal mask would not do (eager attention, sliding windows, padded batches).
        config = AutoConfig.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, attn_implementation=attention_implementation(config), **kwargs
        )
    # transformers wraps `to` with functools.wraps, whose `_Wrapped` type is no method: mypy takes `device` for self.
    model = model.to(device).eval()  # type: ignore[arg-type]
    describe(model)  # refuse unsupported layouts before any job runs
    file_path = source.file_path()
    return LoadedModel(
        source=source,
        model=model,
        tokenizer=tokenizer,
        revision=getattr(model.config, "_commit_hash", None),
        file_sha256=source.recorded_sha256 or (sha256_file(file_path) if file_path is not None else None),
    )


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (tied weights counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def estimate_bytes(source: ModelSource, dtype: torch.dtype = torch.float32) -> int:
    """A model's parameter bytes once loaded in `dtype`, from its config alone (built on the meta device)."""
    with quiet_loading():
        config = AutoConfig.from_pretrained(source.location, **_load_kwargs(source))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return parameter_bytes(model)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """HYDRA_DTYPE: float32 (default, exact to 1e-4), bfloat16 or float16 (GPU; docs/concepts/precision.md)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"HYDRA_DTYPE must be one of {', '.join(DTYPES)}, got {name!r}") from None


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelNotServed(InputError):
    """A job reached a worker that does not serve its model (HYDRA_MODELS differs between workers?)."""


class ModelCache:
    """At most `capacity` loaded models per process, and at most `max_bytes` of their parameters (when set).

    The least recently used model is dropped first. `loader` and `estimator` are the real loading path by default
    (tests pass stand-ins).
    """

    def __init__(
        self,
        sources: dict[str, ModelSource],
        capacity: int = 2,
        device: str = "cpu",
        max_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        clean_cache_bytes: int = DEFAULT_CLEAN_CACHE_BYTES,
        loader: Callable[[ModelSource, str], LoadedModel] | None = None,
        estimator: Callable[[ModelSource], int] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"the model cache needs room for at least one model, got capacity {capacity}")
        self.sources = sources
        self.capacity = capacity
        self.device = device
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.clean_cache_bytes = clean_cache_bytes
        self._loader = loader or (lambda source, device: load_model(source, device=device, dtype=dtype))
        self._estimator = estimator or (lambda source: estimate_bytes(source, dtype))
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def cached(self) -> list[str]:
        """Model ids, least recently used first."""
        return list(self._loaded)

    @property
    def used_bytes(self) -> int:
        return sum(self._bytes.values())

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            if model_id not in self.sources:
                raise ModelNotServed(f"this worker does not serve model '{model_id}'")
            source = self.sources[model_id]
            self._make_room(self._estimate(source))
            log.info("loading model %s from %s", model_id, source.description)
            loaded = self._loader(source, self.device)
            loaded.clean_runs.max_bytes = self.clean_cache_bytes
            self._loaded[model_id] = loaded
            self._bytes[model_id] = parameter_bytes(loaded.model)
            self._make_room(0, keep=model_id)  # the estimate may have been low
            return loaded

    def _estimate(self, source: ModelSource) -> int:
        if self.max_bytes is None:
            return 0
        try:
            return int(self._estimator(source))
        except Exception as error:  # noqa: BLE001 - no estimate: the budget is enforced after loading instead
            log.warning("cannot estimate the size of model %s before loading it: %s", source.id, error)
            return 0

    def _over(self, incoming: int, extra_slot: int) -> bool:
        if len(self._loaded) + extra_slot > self.capacity:
            return True
        return self.max_bytes is not None and self.used_bytes + incoming > self.max_bytes

    def _make_room(self, incoming: int, keep: str | None = None) -> None:
        """Drop least recently used models until `incoming` more bytes (and one more model, unless `keep`) fit."""
        extra_slot = 0 if keep is not None else 1
        evicted = False
        while self._over(incoming, extra_slot):
            candidates = [model_id for model_id in self._loaded if model_id != keep]
            if not candidates:
                if keep is not None and self.max_bytes is not None:
                    log.warning(
                        "model %s needs %d bytes, more than the whole cache budget of %d bytes; keeping it alone",
                        keep, self.used_bytes + incoming, self.max_bytes,
                    )
                break
            victim = candidates[0]
            del self._loaded[victim]
            freed = self._bytes.pop(victim, 0)
            evicted = True
            log.info("evicted model %s (%d bytes of parameters)", victim, freed)
        if evicted:
            _release_memory(self.device)
