"""What an ablated component's output is replaced with: resample sources, means, zeros
(docs/concepts/definitions.md)."""

from __future__ import annotations

import torch

from hydra_ablate_client.vocabulary import ResampleFrom
from worker.engine.clean import CleanRun
from worker.engine.components import Component
from worker.engine.errors import InputError


def resample_sources(
    n_prompts: int, samples: int, how: ResampleFrom, seed: int, groups: list[int] | None = None
) -> list[list[int]]:
    """For each prompt, `samples` distinct other prompts: (i+1..i+k) mod n, or drawn with the seed.

    With `groups` (one label per prompt), prompt i draws only among the other prompts of its own group: "next"
    takes the following members of the group cyclically, "random" the first `samples` of a seeded permutation of
    them. Without groups this is exactly the whole-job draw (the same pairing as before groups existed).
    """
    if groups is None:
        if not 1 <= samples <= n_prompts - 1:
            raise InputError(
                f"resample needs 1 ≤ resample_samples ≤ n_prompts − 1 (got {samples} for {n_prompts} prompts)"
            )
        if how == "next":
            return [[(i + j) % n_prompts for j in range(1, samples + 1)] for i in range(n_prompts)]
        generator = torch.Generator().manual_seed(seed)
        sources = []
        for i in range(n_prompts):
            others = torch.randperm(n_prompts - 1, generator=generator)[:samples]
            sources.append([int(o) + (1 if o >= i else 0) for o in others])
        return sources
    if len(groups) != n_prompts:
        raise InputError(f"{len(groups)} resample groups for {n_prompts} prompts")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    small = sorted({g for g, m in members.items() if len(m) - 1 < samples})
    if samples < 1 or small:
        raise InputError(f"resample within groups needs {samples + 1} prompts per group; groups {small} have fewer")
    generator = torch.Generator().manual_seed(seed)
    sources = []
    for i, g in enumerate(groups):
        group = members[g]
        at = group.index(i)
        if how == "next":
            sources.append([group[(at + j) % len(group)] for j in range(1, samples + 1)])
            continue
        others = torch.randperm(len(group) - 1, generator=generator)[:samples]
        sources.append([group[int(o) + (1 if o >= at else 0)] for o in others])
    return sources


def resample_sources_different_target(
    samples: int,
    how: ResampleFrom,
    seed: int,
    targets: list[int],
    clean_tops: list[int],
    groups: list[int] | None = None,
) -> list[list[int]]:
    """Like `resample_sources`, but prompt i draws only among the prompts j whose clean top token differs from its
    target (`clean_tops[j] != targets[i]`): a source that predicts the same token writes onto it too, and the
    ablation then removes little of the component's write. "next" takes the following allowed prompts cyclically,
    "random" the first `samples` of a seeded permutation of them."""
    n_prompts = len(targets)
    if len(clean_tops) != n_prompts or (groups is not None and len(groups) != n_prompts):
        raise InputError(f"{len(clean_tops)} clean top tokens and {n_prompts} targets")
    generator = torch.Generator().manual_seed(seed)
    sources = []
    for i in range(n_prompts):
        order = [(i + j) % n_prompts for j in range(1, n_prompts)]  # every other prompt, following i cyclically
        allowed = [
            j for j in order
            if clean_tops[j] != targets[i] and (groups is None or groups[j] == groups[i])
        ]
        if len(allowed) < samples:
            where = "of its relation " if groups is not None else ""
            raise InputError(
                f"resample_sources 'different_target': prompt {i} (target token id {targets[i]}) has only "
                f"{len(allowed)} prompt(s) {where}whose clean top token differs from its target, and resample_samples "
                f"is {samples}: add prompts with other answers, lower resample_samples, or use resample_sources 'any'"
            )
        if how == "next":
            sources.append(allowed[:samples])
            continue
        picked = torch.randperm(len(allowed), generator=generator)[:samples]
        sources.append([allowed[int(p)] for p in picked])
    return sources


def align_to_length(source: torch.Tensor, length: int) -> torch.Tensor:
    """Right-align a source's per-position rows (S, e) to `length` rows; missing early rows take the source's mean."""
    have = source.shape[0]
    if have >= length:
        return source[have - length :]
    filler = source.mean(dim=0, keepdim=True).expand(length - have, -1)
    return torch.cat([filler, source], dim=0)


def component_rows(run: CleanRun, component: Component, head_dim: int) -> torch.Tensor:
    """The clean rows (P, e) an ablation of `component` replaces: its output, or its head's slice of W_O's input."""
    if component.kind == "head":
        assert run.head_in is not None and component.head is not None
        cols = slice(component.head * head_dim, (component.head + 1) * head_dim)
        return run.head_in[component.layer, :, cols]
    slot = 2 * component.layer + (1 if component.kind == "mlp" else 0)
    return run.layer_out[slot]


class MeanActivations:
    """Running means of every layer output and head input, over the positions a scope ablates."""

    def __init__(self) -> None:
        self._layer_sum: torch.Tensor | None = None
        self._head_sum: torch.Tensor | None = None
        self._count = 0

    def add(self, run: CleanRun) -> None:
        layer = run.layer_out.sum(dim=1)
        heads = run.head_in.sum(dim=1) if run.head_in is not None else None
        self._layer_sum = layer if self._layer_sum is None else self._layer_sum + layer
        if heads is not None:
            self._head_sum = heads if self._head_sum is None else self._head_sum + heads
        self._count += run.layer_out.shape[1]

    def as_clean_run_rows(self, component: Component, head_dim: int) -> torch.Tensor:
        """The mean row (1, e) for `component`."""
        if self._layer_sum is None:
            raise InputError("mean ablation needs at least one reference prompt")
        if component.kind == "head":
            assert self._head_sum is not None and component.head is not None
            cols = slice(component.head * head_dim, (component.head + 1) * head_dim)
            return (self._head_sum[component.layer, cols] / self._count).unsqueeze(0)
        slot = 2 * component.layer + (1 if component.kind == "mlp" else 0)
        return (self._layer_sum[slot] / self._count).unsqueeze(0)
