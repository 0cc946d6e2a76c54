"""The hooks of the attribution tests' autograd references (tests/test_attribution.py,
tests/test_position_attribution.py, tests/test_patch_attribution.py): capture what every layer's attention and MLP
write into the residual stream, the input of every output projection and the pre-cap logits on one forward pass of
the Hugging Face model, so that a test differentiates its metric with respect to them by torch.autograd; and detach
a layer's writes (GradDrop).

The references check the engine (worker/engine) independently, so nothing here imports it: the model's parts come
from tests/oracle.py's `locate_parts`, described here by what these hooks read of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], None]
ForwardPreHook = Callable[[nn.Module, tuple[Any, ...]], None]


class WriteParts(Protocol):
    """What the capture hooks need of a model's parts (tests/oracle.py's `ModelParts` has them)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def attn(self) -> Sequence[nn.Module]: ...

    @property
    def mlp(self) -> Sequence[nn.Module]: ...

    @property
    def out_proj(self) -> Sequence[nn.Module]: ...

    @property
    def lm_head(self) -> nn.Module | None: ...


class Detached:
    """Forward hooks that detach a module's output: its backward path is dropped, its forward value unchanged."""

    @staticmethod
    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0].detach(), *output[1:])
        return output.detach()


def keep(captured: dict[str, torch.Tensor], name: str) -> ForwardHook:
    """A forward hook that keeps the module's output (its first element for a tuple) as `captured[name]`."""

    def hook(_m: nn.Module, _a: tuple[Any, ...], output: Any) -> None:
        captured[name] = output[0] if isinstance(output, tuple) else output

    return hook


def keep_in(captured: dict[str, torch.Tensor], name: str) -> ForwardPreHook:
    """A forward pre-hook that keeps the module's first input as `captured[name]`."""

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        captured[name] = args[0]

    return hook


def capture_writes(
    parts: WriteParts, dropped_layer: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[RemovableHandle]]:
    """Hooks that capture, on the next forward pass, every layer's attention and MLP writes (`attn.L`, `mlp.L`) and
    out-projection input (`z.L`), and the lm_head's output (`logits`: pre-cap on soft-capped models, which cap the
    model's output after it); with the writes of `dropped_layer` detached (GradDrop). Returns the captures, the
    logits and the handles, which the caller removes."""
    captured: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    handles: list[RemovableHandle] = []
    assert parts.lm_head is not None
    handles.append(parts.lm_head.register_forward_hook(keep(raw, "logits")))
    for layer in range(parts.n_layers):
        handles.append(parts.attn[layer].register_forward_hook(keep(captured, f"attn.{layer}")))
        handles.append(parts.mlp[layer].register_forward_hook(keep(captured, f"mlp.{layer}")))
        handles.append(parts.out_proj[layer].register_forward_pre_hook(keep_in(captured, f"z.{layer}")))
        if layer == dropped_layer:  # registered after the capture: the captured tensor is the undetached one
            handles.append(parts.attn[layer].register_forward_hook(Detached.hook))
            handles.append(parts.mlp[layer].register_forward_hook(Detached.hook))
    return captured, raw, handles
