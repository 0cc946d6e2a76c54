"""A built-in paired dataset for activation patching: indirect-object-identification (IOI) style prompts.

Each clean prompt introduces two people, then has one of them (the subject) give something to the other (the
indirect object); the answer is the indirect object's name, the counterfactual the subject's. Two orders, as in
Wang et al. (2022): ABBA ("When Anna and Ben …, Ben gave … to" → Anna) and BABA ("When Ben and Anna …, Ben gave …
to" → Anna). The corrupted prompt is the same sentence with three other, different names in the three name slots,
so it carries no information about who the indirect object is, and it has the same number of tokens as the clean
one, since every name is one token on the chosen model's tokenizer (the caller's `encode`).

The templates, names, places and objects are this project's own. No torch here: the tokenizer is passed in.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

IoiOrder = Literal["ABBA", "BABA"]
IOI_ORDERS: tuple[IoiOrder, ...] = ("ABBA", "BABA")

# {first} and {second} are the two people introduced, {giver} the one who gives (the subject, the second-mentioned
# in ABBA and the first-mentioned in BABA); the prompt ends just before the indirect object's name.
TEMPLATES: tuple[str, ...] = (
    "When {first} and {second} went to the {place}, {giver} gave a {object} to",
    "After {first} and {second} arrived at the {place}, {giver} handed a {object} to",
    "Once {first} and {second} had reached the {place}, {giver} passed the {object} to",
    "While {first} and {second} were waiting at the {place}, {giver} offered a {object} to",
    "{first} and {second} spent the afternoon at the {place}, and then {giver} lent a {object} to",
    "Yesterday {first} and {second} met at the {place}. Later, {giver} sent a {object} to",
    "Then {first} and {second} walked into the {place}, where {giver} showed a {object} to",
    "On Sunday {first} and {second} cleaned the {place}, and afterwards {giver} threw the {object} to",
)

NAMES: tuple[str, ...] = (
    "Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo", "Maria",
    "Noah", "Olivia", "Paul", "Rachel", "Sam", "Sarah", "Tom", "Victor", "Wendy", "Adam", "Alice", "Amy", "Andrew",
    "Beth", "Bob", "Carl", "Chris", "Daniel", "Diana", "Eric", "Eva", "George", "Hannah", "Helen", "Ian", "James",
    "Jane", "John", "Julia", "Kevin", "Laura", "Lisa", "Lucy", "Mark", "Mary", "Max", "Michael", "Nick", "Peter",
    "Robert", "Rose", "Ruth", "Simon", "Steve", "Susan", "Thomas", "Tim", "Tony", "William", "Zoe", "Oscar", "Ella",
    "Martin", "Nina", "Alex", "Jason", "Karen",
)
PLACES: tuple[str, ...] = (
    "market", "station", "library", "garden", "beach", "school", "office", "museum", "harbour", "kitchen", "park",
    "hospital", "theatre", "bakery", "river",
)
OBJECTS: tuple[str, ...] = (
    "book", "letter", "ball", "drink", "key", "ticket", "hat", "ring", "map", "cake", "pen", "basket", "lamp", "coin",
    "bag",
)

Encode = Callable[[str], Sequence[int]]  # text → token ids, without special tokens


@dataclass(frozen=True)
class IoiPair:
    clean: str
    corrupted: str
    answer: str  # " " + the indirect object's name
    counterfactual: str  # " " + the subject's name
    order: IoiOrder
    template: int  # index into TEMPLATES


def single_token_names(encode: Encode, names: Sequence[str] = NAMES) -> list[str]:
    """The names that are one token, with their leading space, on this tokenizer (as they appear mid-sentence).

    A name at the start of a template has no leading space; templates that start with a name are kept only when
    that form is one token too (checked per prompt in `ioi_pairs`)."""
    return [name for name in names if len(encode(" " + name)) == 1]


def ioi_pairs(
    n: int, seed: int, encode: Encode, orders: Sequence[IoiOrder] = IOI_ORDERS
) -> list[IoiPair]:
    """`n` pairs drawn with `seed`, orders alternating; every pair's prompts have the same number of tokens.

    ValueError when fewer than five names survive the one-token filter (two clean names and three corrupted ones
    must differ)."""
    if n < 1:
        raise ValueError(f"the IOI generator needs n ≥ 1 pairs (got {n})")
    if not orders or any(order not in IOI_ORDERS for order in orders):
        raise ValueError(f"IOI orders must be among {', '.join(IOI_ORDERS)} (got {list(orders)})")
    names = single_token_names(encode)
    if len(names) < 5:
        raise ValueError(
            f"only {len(names)} of the {len(NAMES)} candidate names are one token on this tokenizer; "
            "the IOI generator needs at least 5"
        )
    rng = random.Random(seed)
    pairs: list[IoiPair] = []
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise ValueError("could not draw IOI pairs whose clean and corrupted prompts tokenise to equal lengths")
        order = orders[len(pairs) % len(orders)]
        template_index = rng.randrange(len(TEMPLATES))
        template = TEMPLATES[template_index]
        io, subject, c1, c2, c3 = rng.sample(names, 5)
        place, thing = rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (io, subject) if order == "ABBA" else (subject, io)
        clean = template.format(first=first, second=second, giver=subject, place=place, object=thing)
        corrupted = template.format(first=c1, second=c2, giver=c3, place=place, object=thing)
        if len(encode(clean)) != len(encode(corrupted)):
            continue  # a name at the start of a sentence that is not one token there
        pairs.append(IoiPair(clean, corrupted, " " + io, " " + subject, order, template_index))
    return pairs
