"""Component names (attn.L, mlp.L, head.L.H) and the downstream relation between them."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.errors import InputError


@dataclass(frozen=True)
class Component:
    kind: str  # "attn", "mlp" or "head"
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return f"head.{self.layer}.{self.head}" if self.kind == "head" else f"{self.kind}.{self.layer}"


def parse_component(name: str, n_layers: int, n_heads: int) -> Component:
    """Parse an explicit name; raises InputError (a ValueError) with a readable reason."""
    parts = name.split(".")
    kind = parts[0]
    expected = 3 if kind == "head" else 2
    if kind not in ("attn", "mlp", "head") or len(parts) != expected or not all(p.isdigit() for p in parts[1:]):
        raise InputError(f"bad component name '{name}': use attn.L, mlp.L or head.L.H")
    layer = int(parts[1])
    if layer >= n_layers:
        raise InputError(f"component '{name}': layer {layer} out of range (model has {n_layers} layers)")
    head = int(parts[2]) if kind == "head" else None
    if head is not None and head >= n_heads:
        raise InputError(f"component '{name}': head {head} out of range (model has {n_heads} heads)")
    return Component(kind, layer, head)


def layer_components(n_layers: int) -> list[Component]:
    """The response basis: attn.0, mlp.0, attn.1, mlp.1, ..."""
    return [Component(kind, layer) for layer in range(n_layers) for kind in ("attn", "mlp")]


def head_basis_components(n_layers: int, n_heads: int) -> list[Component]:
    """The head response basis: head.0.0, …, head.0.H−1, mlp.0, head.1.0, … (attention split into its heads)."""
    return [
        c
        for layer in range(n_layers)
        for c in [*(Component("head", layer, h) for h in range(n_heads)), Component("mlp", layer)]
    ]


def is_downstream(ablated: Component, other: Component, parallel_blocks: bool) -> bool:
    """Can `other`'s output at the final position change when `ablated` is ablated there? (docs/definitions.md)"""
    if other.layer > ablated.layer:
        return True
    same_layer_mlp_reads_attn = other.layer == ablated.layer and other.kind == "mlp" and ablated.kind != "mlp"
    return same_layer_mlp_reads_attn and not parallel_blocks
