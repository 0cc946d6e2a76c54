"""Ablated runs that reuse the clean computation: each run starts at its own layer from the clean residual stream.

An ablation at layer L leaves everything before L unchanged, so a run enters the stack at L with the clean block
input. With `positions: "final"` it also leaves every earlier position unchanged, so only the final token is
recomputed, attending to the clean run's cached keys and values. The blocks are driven with the model's own
modules (norms, attention, MLP, rotary embedding); only the residual wiring is written here.

Rows are sorted by entry layer, so the rows active at layer l are a prefix of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.architecture import Architecture
from worker.engine.clean import CleanRun
from worker.engine.components import Component
from worker.engine.hooks import hooks_removed_on_exit, on_input


@dataclass(frozen=True)
class AblatedRun:
    """One row of an ablated batch: which component, replaced by which rows (P, e) at the ablated positions."""

    component: Component
    replacement: torch.Tensor


@dataclass(frozen=True)
class AblatedOutputs:
    layer_out_final: torch.Tensor  # (B, 2N, d): every layer component's output at the final position
    x_final: torch.Tensor  # (B, d): the residual stream entering the final norm


class PrefixCache:
    """Stands in for a transformers Cache: joins the clean prefix's keys/values to the new position's."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: object, **__: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = key_states.shape[0]
        keys = torch.cat([self.keys[layer_idx].expand(rows, -1, -1, -1), key_states], dim=2)
        values = torch.cat([self.values[layer_idx].expand(rows, -1, -1, -1), value_states], dim=2)
        return keys, values


@dataclass(frozen=True)
class LayerEdits:
    """Which rows of the active prefix get which replacement at one layer."""

    attn_rows: list[int]
    attn_values: torch.Tensor | None  # (n, P, d)
    mlp_rows: list[int]
    mlp_values: torch.Tensor | None
    head_rows: list[int]
    head_slices: list[slice]
    head_values: list[torch.Tensor]  # each (P, hd)


def _edits_by_layer(arch: Architecture, batch: list[AblatedRun]) -> list[LayerEdits]:
    edits = []
    for layer in range(arch.n_layers):
        def rows(kind: str, layer: int = layer) -> list[int]:
            return [b for b, a in enumerate(batch) if a.component.kind == kind and a.component.layer == layer]

        attn, mlp, heads = rows("attn"), rows("mlp"), rows("head")
        edits.append(
            LayerEdits(
                attn_rows=attn,
                attn_values=torch.stack([batch[b].replacement for b in attn]) if attn else None,
                mlp_rows=mlp,
                mlp_values=torch.stack([batch[b].replacement for b in mlp]) if mlp else None,
                head_rows=heads,
                head_slices=[
                    slice(batch[b].component.head * arch.head_dim, (batch[b].component.head + 1) * arch.head_dim)
                    for b in heads
                ],
                head_values=[batch[b].replacement for b in heads],
            )
        )
    return edits


def _replace_heads(edits: LayerEdits):  # noqa: ANN202 - returns a pre-hook edit
    def edit(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        for row, cols, value in zip(edits.head_rows, edits.head_slices, edits.head_values, strict=True):
            z[row, :, cols] = value.to(z.dtype)
        return z

    return edit


def _attention(
    arch: Architecture, layer: int, x: torch.Tensor, position_embeddings: object, cache: PrefixCache | None
) -> torch.Tensor:
    kwargs: dict[str, object] = {"attention_mask": None, arch.family.cache_keyword: cache}
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    output = arch.attn(layer)(x, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_ablated_batch(
    arch: Architecture, run: CleanRun, batch: list[AblatedRun], all_positions: bool
) -> AblatedOutputs:
    """Run the batch's rows from their own layers on; returns final-position outputs in the batch's order."""
    order = sorted(range(len(batch)), key=lambda b: batch[b].component.layer)
    rows = [batch[b] for b in order]
    edits = _edits_by_layer(arch, rows)
    entry = torch.tensor([a.component.layer for a in rows])
    n_rows, positions = len(rows), run.block_in.shape[1]
    device = run.block_in.device

    cache = None if all_positions else PrefixCache(run.past_keys, run.past_values)
    position_ids = torch.arange(run.length - positions, run.length, device=device).unsqueeze(0)
    position_embeddings = arch.rotary(run.block_in[:1], position_ids) if arch.rotary is not None else None

    hidden = torch.empty(n_rows, positions, arch.d_model, dtype=run.block_in.dtype, device=device)
    layer_out_final = run.final_layer_out().unsqueeze(0).repeat(n_rows, 1, 1)
    for layer in range(arch.n_layers):
        active = int((entry <= layer).sum())
        entering = (entry == layer).nonzero().flatten()
        if entering.numel():
            hidden[entering] = run.block_in[layer]
        if active == 0:
            continue
        h = hidden[:active]
        layer_edits = edits[layer]
        with hooks_removed_on_exit() as handles:
            if layer_edits.head_rows:
                handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(_replace_heads(layer_edits))))
            attn = _attention(arch, layer, arch.attn_norm(layer)(h), position_embeddings, cache)
        if layer_edits.attn_rows:
            attn = attn.clone()
            attn[layer_edits.attn_rows] = layer_edits.attn_values.to(attn.dtype)
        mlp_input = h if arch.parallel_blocks else h + attn
        mlp = arch.mlp(layer)(arch.mlp_norm(layer)(mlp_input))
        if layer_edits.mlp_rows:
            mlp = mlp.clone()
            mlp[layer_edits.mlp_rows] = layer_edits.mlp_values.to(mlp.dtype)
        hidden[:active] = mlp_input + mlp if not arch.parallel_blocks else h + attn + mlp
        layer_out_final[:active, 2 * layer] = attn[:, -1]
        layer_out_final[:active, 2 * layer + 1] = mlp[:, -1]

    restore = torch.empty(n_rows, dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(n_rows)
    return AblatedOutputs(layer_out_final=layer_out_final[restore].float(), x_final=hidden[restore, -1].float())


def run_ablated(
    arch: Architecture, run: CleanRun, ablations: list[AblatedRun], all_positions: bool, batch_tokens: int
) -> AblatedOutputs:
    """All of a prompt's ablated runs, in batches of at most `batch_tokens` rows × prompt length (× 2 for "all")."""
    per_row = max(1, run.length if not all_positions else run.length * 2)
    rows_per_batch = max(1, batch_tokens // per_row)
    parts = [
        run_ablated_batch(arch, run, ablations[start : start + rows_per_batch], all_positions)
        for start in range(0, len(ablations), rows_per_batch)
    ]
    return AblatedOutputs(
        layer_out_final=torch.cat([p.layer_out_final for p in parts]),
        x_final=torch.cat([p.x_final for p in parts]),
    )
