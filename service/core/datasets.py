"""Built-in prompt sets, shipped inside the package so a job can name one instead of uploading prompts.

known_1000: the ROME "known facts" prompts (see service/core/data/ATTRIBUTION.md).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import msgspec

from hydra_ablate_client.wire import DatasetRef, PromptFields


class KnownFact(msgspec.Struct):
    """The fields of a known_1000 record that the service uses (the file has more)."""

    prompt: str
    attribute: str
    relation_id: str
    subject: str = ""
    known_id: int = -1


@cache
def load(name: str) -> tuple[KnownFact, ...]:
    """Parsed once per process: the file is ~300 kB and every job naming it would otherwise re-read it."""
    if name != "known_1000":
        raise KeyError(f"unknown dataset {name!r}")
    raw = resources.files("service.core").joinpath("data", "known_1000.json").read_bytes()
    return tuple(msgspec.json.decode(raw, type=list[KnownFact]))


def relations(name: str) -> list[str]:
    return sorted({fact.relation_id for fact in load(name)})


def _slice(ref: DatasetRef) -> list[KnownFact]:
    facts = [f for f in load(ref.name) if ref.relation is None or f.relation_id == ref.relation]
    end = None if ref.limit is None else ref.offset + ref.limit
    return facts[ref.offset : end]


def select(ref: DatasetRef) -> tuple[list[str], list[str]]:
    """Prompts and answers of the slice; answers start with a space so they tokenise as the next word."""
    chosen = _slice(ref)
    return [f.prompt for f in chosen], [" " + f.attribute for f in chosen]


def prompt_fields(ref: DatasetRef) -> list[PromptFields]:
    """The slice's records as result tables show them: relation, subject and answer (without the leading space)."""
    return [
        PromptFields(relation=f.relation_id, subject=f.subject, answer=f.attribute, dataset_index=f.known_id)
        for f in _slice(ref)
    ]


def select_relations(ref: DatasetRef) -> list[str]:
    """The relation (Wikidata property) of every prompt of the slice, in `select`'s order."""
    return [f.relation_id for f in _slice(ref)]
