"""Built-in natural-text corpora: documents a job can name instead of uploading texts.

known_1000_text: no permissively licensed natural-text corpus ships inside an installable PyPI or Debian package
that this project could depend on (NLTK's corpora and the Wikipedia tools download at run time; the Debian fortune
databases carry mixed, unclear licences), so the corpus is built from the known_1000 facts (MIT licence, Meng et
al. 2022, see service/core/data/ATTRIBUTION.md): each fact's prompt completed with its answer and a full stop
("Vinson Massif is located in the continent of Antarctica."), `FACTS_PER_DOCUMENT` consecutive facts per document.
That is short encyclopaedic English, not the open web text of Rushing & Nanda 2024; a job gives its own `texts`
for anything else.
"""

from __future__ import annotations

from hydra_ablate_client.wire import CorpusRef, DatasetRef
from service.core import datasets

FACTS_PER_DOCUMENT = 12
CORPORA: dict[str, str] = {
    "known_1000_text": (
        "known_1000 facts completed with their answers, 12 per document (101 documents); MIT licence, "
        "Meng et al. 2022 (service/core/data/ATTRIBUTION.md)"
    ),
}


def documents(name: str) -> list[str]:
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}")
    prompts, answers = datasets.select(DatasetRef(name="known_1000"))
    sentences = [f"{prompt}{answer}." for prompt, answer in zip(prompts, answers, strict=True)]
    return [" ".join(sentences[i : i + FACTS_PER_DOCUMENT]) for i in range(0, len(sentences), FACTS_PER_DOCUMENT)]


def select(ref: CorpusRef) -> list[str]:
    docs = documents(ref.name)
    end = None if ref.limit is None else ref.offset + ref.limit
    return docs[ref.offset : end]
