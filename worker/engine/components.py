"""Components (attn.L, mlp.L, head.L.H; the grammar is hydra_ablate_client.vocabulary) and the downstream relation
between them."""

from __future__ import annotations

from dataclasses import dataclass

from hydra_ablate_client.vocabulary import parse_component
from worker.engine.errors import InputError


@dataclass(frozen=True)
class Component:
    kind: str  # "attn", "mlp" or "head"
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return f"head.{self.layer}.{self.head}" if self.kind == "head" else f"{self.kind}.{self.layer}"


def model_component(name: str, n_layers: int, n_heads: int) -> Component:
    """The model's component with this explicit name; raises InputError (a ValueError) with a readable reason."""
    try:
        parts = parse_component(name)
    except ValueError:
        parts = None
    if parts is None or not parts.explicit or parts.layer is None:
        raise InputError(f"bad component name '{name}': use attn.L, mlp.L or head.L.H")
    layer = parts.layer
    if layer >= n_layers:
        raise InputError(f"component '{name}': layer {layer} out of range (model has {n_layers} layers)")
    head = parts.head
    if head is not None and head >= n_heads:
        raise InputError(f"component '{name}': head {head} out of range (model has {n_heads} heads)")
    return Component(parts.kind, layer, head)


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
    """Can `other`'s output at the final position change when `ablated` is ablated there?
    (docs/concepts/definitions.md)"""
    if other.layer > ablated.layer:
        return True
    same_layer_mlp_reads_attn = other.layer == ablated.layer and other.kind == "mlp" and ablated.kind != "mlp"
    return same_layer_mlp_reads_attn and not parallel_blocks


def knockout_set(members: tuple[str, ...] | list[str], index: int, n_layers: int, n_heads: int) -> list[Component]:
    """The components of knockout set `index` (ablated together in one run); InputError saying what to change."""
    if not members:
        raise InputError(f"knockout set {index} is empty: name at least one component")
    components = [model_component(name, n_layers, n_heads) for name in members]
    seen: set[Component] = set()
    for c in components:
        if c in seen:
            raise InputError(f"knockout set {index} names '{c.name}' twice: name each component once")
        seen.add(c)
    layers_with_attn = {c.layer for c in components if c.kind == "attn"}
    inside = [c.name for c in components if c.kind == "head" and c.layer in layers_with_attn]
    if inside:
        raise InputError(
            f"knockout set {index} names {', '.join(inside)} and its attention layer: a head is part of attn.L, "
            "so ablating attn.L already ablates it; drop the head or the layer"
        )
    return components


def set_downstream(members: list[Component], other: Component, parallel_blocks: bool) -> bool:
    """Can `other`'s output at the final position respond when every member is ablated? A member's own output is
    replaced, so it is not a response, nor is a head of a member attention layer (the head basis): it is part of
    that output."""
    if other in members or (other.kind == "head" and Component("attn", other.layer) in members):
        return False
    return any(is_downstream(m, other, parallel_blocks) for m in members)
