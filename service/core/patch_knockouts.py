"""The knockout sets of a patching job: each a set of sites patched together in one run from the source run.

Pure, like service/core/patch_resolve.py, which calls it. The rules are the engine's `patch_set`
(worker/engine/patching.py: a set names at least one site, each once, each a site the model can patch) plus what
the results need: a set is named by its members joined with "+", so no set may repeat another, and a one-member set
may not be a site that `components` already patches on its own (two result rows would share a name). Every refusal
names `knockouts[i]`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from hydra_ablate_client.vocabulary import parse_patch_site
from service.core.errors import ValidationProblem

# One explicit site's canonical name ("mlp.03" → "mlp.3"), or the site's own 422 (range, head part) naming the field.
SiteCheck = Callable[[str, str], str]


def patch_knockouts(given: Sequence[Sequence[str]], sites: Sequence[str], canonical: SiteCheck) -> list[list[str]]:
    """The sets in canonical spelling, in the order given; ValidationProblem naming `knockouts[i]`."""
    single = set(sites)
    first_index: dict[frozenset[str], int] = {}
    sets: list[list[str]] = []
    for index, members in enumerate(given):
        field = f"knockouts[{index}]"
        if not members:
            raise ValidationProblem(
                f"knockout set {index} is empty: name at least one site (resid_pre.L, attn.L, mlp.L, head.L.H or "
                "head.L.H.q|k|v|pattern)",
                field,
            )
        names = []
        for name in members:
            try:
                parse_patch_site(name)
            except ValueError:
                raise ValidationProblem(
                    f"knockout set {index}: {name!r} is not one patching site; a set names explicit sites: "
                    "resid_pre.L, attn.L, mlp.L, head.L.H or head.L.H.q|k|v|pattern (give a layer's heads one by one)",
                    field,
                ) from None
            names.append(canonical(name, field))
        repeated = sorted(name for name, times in Counter(names).items() if times > 1)  # linear: sets can be long
        if repeated:
            raise ValidationProblem(
                f"knockout set {index} names {', '.join(repr(r) for r in repeated)} twice: name each site once", field
            )
        if len(names) == 1 and names[0] in single:
            raise ValidationProblem(
                f"knockout set {index} has the one member {names[0]!r}, which components already patch on its own: "
                "drop the set or the site",
                field,
            )
        key = frozenset(names)
        if key in first_index:
            raise ValidationProblem(
                f"knockout sets {first_index[key]} and {index} name the same sites: drop set {index}", field
            )
        first_index[key] = index
        sets.append(names)
    return sets

