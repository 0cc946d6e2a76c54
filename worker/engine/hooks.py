"""Hooks that capture or replace component outputs, and a context that always removes them.

A worker lives for days and runs many jobs on one cached model: a hook left behind would silently ablate the next
job, so every hook is registered through `hooks_removed_on_exit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.hooks import RemovableHandle

# Takes a module's output (or first input) and returns the tensor to pass on in its place.
OutputEdit = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def hooks_removed_on_exit() -> Iterator[list[RemovableHandle]]:
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def on_output(edit: OutputEdit) -> Callable[..., object]:
    """A forward hook applying `edit` to the module's tensor output (or the first item of a tuple output)."""

    def hook(_module: object, _inputs: tuple[object, ...], output: object) -> object:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        assert isinstance(output, torch.Tensor)
        return edit(output)

    return hook


def on_input(edit: OutputEdit) -> Callable[..., object]:
    """A forward pre-hook applying `edit` to the module's first positional input."""

    def hook(_module: object, inputs: tuple[object, ...]) -> tuple[object, ...]:
        first = inputs[0]
        assert isinstance(first, torch.Tensor)
        return (edit(first), *inputs[1:])

    return hook
