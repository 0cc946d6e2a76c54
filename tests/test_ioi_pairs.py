"""The built-in IOI-style paired dataset (service/core/ioi_pairs.py) on the SmolLM2 tokenizer."""

from __future__ import annotations

import re

import pytest

from service.core.ioi_pairs import NAMES, TEMPLATES, ioi_pairs, single_token_names
from tests.tiny_models import load_tokenizer


def _encode(text: str) -> list[int]:
    return list(load_tokenizer()(text, add_special_tokens=False)["input_ids"])


def test_pairs_are_seeded_sized_and_aligned() -> None:
    pairs = ioi_pairs(40, seed=3, encode=_encode)
    assert len(pairs) == 40
    assert pairs == ioi_pairs(40, seed=3, encode=_encode)
    assert pairs != ioi_pairs(40, seed=4, encode=_encode)
    assert {p.order for p in pairs} == {"ABBA", "BABA"}
    names = set(single_token_names(_encode))
    for p in pairs:
        assert len(_encode(p.clean)) == len(_encode(p.corrupted))
        assert len(_encode(p.answer)) == 1 and len(_encode(p.counterfactual)) == 1
        io, subject = p.answer.strip(), p.counterfactual.strip()
        clean_names = [w for w in re.findall(r"[A-Z][a-z]+", p.clean) if w in names]
        corrupted_names = [w for w in re.findall(r"[A-Z][a-z]+", p.corrupted) if w in names]
        # ABBA: IO, S, then S gives; BABA: S, IO, then S gives. Corrupted: three different other names.
        assert clean_names == ([io, subject, subject] if p.order == "ABBA" else [subject, io, subject])
        assert len(set(corrupted_names)) == 3 and not set(corrupted_names) & {io, subject}
        assert p.clean.endswith(" to") and p.corrupted.endswith(" to")
        assert 0 <= p.template < len(TEMPLATES)


def test_one_token_filter_and_refusals() -> None:
    survivors = single_token_names(_encode)
    assert len(survivors) >= 60 and set(survivors) <= set(NAMES)
    # A tokenizer that splits every name leaves too few: the generator says so instead of drawing from nothing.
    with pytest.raises(ValueError, match="candidate names are one token"):
        ioi_pairs(3, 0, lambda text: list(text.encode()))
    with pytest.raises(ValueError, match="n ≥ 1"):
        ioi_pairs(0, 0, _encode)
    with pytest.raises(ValueError, match="orders must be among"):
        ioi_pairs(2, 0, _encode, orders=["ABAB"])  # type: ignore[list-item]
