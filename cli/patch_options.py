"""`hydra-ablate submit`'s activation-patching flags (--pairs, --intervention, --direction, --epsilon) as JobRequest
fields. The pairs are checked by the API on submit (token lengths, one-token answers); here only the file's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAIR_KEYS = ("clean", "corrupted", "answer", "counterfactual")


class PairsFileError(ValueError):
    """The --pairs file cannot be read as a list of pairs, or the flags contradict each other (the message says
    what to change)."""


def load_pairs(path: str) -> list[dict[str, Any]]:
    """A JSON file holding a list of pairs, or an object whose `pairs` is one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PairsFileError(f"cannot read pairs file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise PairsFileError(f"pairs file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    if not isinstance(data, list) or not all(isinstance(pair, dict) for pair in data):
        raise PairsFileError(
            f"pairs file {path} must hold a list of pairs, each {{{', '.join(repr(k) for k in PAIR_KEYS)}}}"
        )
    return data


def patch_options(
    intervention: str | None,
    pairs_file: str | None,
    pair_dataset: str | None,
    limit: int | None,
    direction: str | None,
    epsilon: float | None,
) -> dict[str, Any]:
    """The JobRequest fields these flags give (None: not given); --pairs or --pair-dataset alone means intervention
    'patch'; --limit sizes the pair dataset."""
    pairs = None if pairs_file is None else load_pairs(pairs_file)
    if pairs is not None and pair_dataset is not None:
        raise PairsFileError("--pairs and --pair-dataset are alternatives: give one source of pairs")
    dataset = None if pair_dataset is None else {"name": pair_dataset, **({"limit": limit} if limit else {})}
    if (pairs is not None or dataset is not None) and intervention is None:
        intervention = "patch"
    return {"intervention": intervention, "pairs": pairs, "pair_dataset": dataset, "direction": direction,
            "epsilon": epsilon}
