"""Ablated runs that reuse the clean computation: each run starts at its own layer from the clean residual stream.

An ablation at layer L leaves everything before L unchanged, so a run enters the stack at L with the clean block
input. With `positions: "final"` it also leaves every earlier position unchanged, so only the final token is
recomputed, attending to the clean run's cached keys and values. The blocks are driven with the model's own
modules (norms, attention, MLP, rotary embedding); only the residual wiring is written here.

Rows are sorted by entry layer, so the rows active at layer l are a prefix of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from worker.engine.architecture import Architecture
from worker.engine.clean import CleanRun
from worker.engine.components import Component
from worker.engine.hooks import hooks_removed_on_exit, on_input
from worker.engine.memory import BatchBudget, release_cached_memory


@dataclass(frozen=True)
class AblatedRun:
    """One row of an ablated batch: which component, replaced by which rows (P, e) at the ablated positions.

    A knockout set (several components ablated together in one run) is one row: its first member here, the others
    in `also`, each with its own replacement."""

    component: Component
    replacement: torch.Tensor
    also: tuple[AblatedRun, ...] = ()

    def members(self) -> list[AblatedRun]:
        """Every component this row replaces, one single-component AblatedRun each."""
        return [AblatedRun(self.component, self.replacement), *self.also]

    @property
    def entry_layer(self) -> int:
        """The first layer this row's run differs from the clean run at: its lowest member's."""
        return min([self.component.layer, *(a.component.layer for a in self.also)])


@dataclass(frozen=True)
class AblatedOutputs:
    layer_out_final: torch.Tensor  # (B, 2N, d): every layer component's output at the final position
    x_final: torch.Tensor  # (B, d): the residual stream entering the final norm
    # (B, N, H·hd): each layer's out-projection input at the final position, in the model's dtype (keep_head_in)
    head_in_final: torch.Tensor | None = None


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


def _head_slice(component: Component, head_dim: int) -> slice:
    """The columns of the attention output projection's input that one head writes."""
    assert component.head is not None, "a head component names its head"
    return slice(component.head * head_dim, (component.head + 1) * head_dim)


def _edits_by_layer(arch: Architecture, batch: list[AblatedRun]) -> list[LayerEdits]:
    members = [(b, m) for b, a in enumerate(batch) for m in a.members()]  # a knockout set edits one row many times
    edits = []
    for layer in range(arch.n_layers):
        def rows(kind: str, layer: int = layer) -> list[tuple[int, AblatedRun]]:
            return [(b, m) for b, m in members if m.component.kind == kind and m.component.layer == layer]

        attn, mlp, heads = rows("attn"), rows("mlp"), rows("head")
        edits.append(
            LayerEdits(
                attn_rows=[b for b, _ in attn],
                attn_values=torch.stack([m.replacement for _, m in attn]) if attn else None,
                mlp_rows=[b for b, _ in mlp],
                mlp_values=torch.stack([m.replacement for _, m in mlp]) if mlp else None,
                head_rows=[b for b, _ in heads],
                head_slices=[_head_slice(m.component, arch.head_dim) for _, m in heads],
                head_values=[m.replacement for _, m in heads],
            )
        )
    return edits


def _replace_heads(edits: LayerEdits):
    def edit(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        for row, cols, value in zip(edits.head_rows, edits.head_slices, edits.head_values, strict=True):
            z[row, :, cols] = value.to(z.dtype)
        return z

    return edit


class PaddedPrefixCache:
    """The prefix caches of several prompts, left-padded to one length; each row reads its own prompt's."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], row_prompt: torch.Tensor) -> None:
        self.keys = keys  # per layer (G, KV, P_max, hd)
        self.values = values
        self.row_prompt = row_prompt

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: object, **__: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.row_prompt[: key_states.shape[0]]
        keys = torch.cat([self.keys[layer_idx][rows], key_states], dim=2)
        values = torch.cat([self.values[layer_idx][rows], value_states], dim=2)
        return keys, values


def _left_pad(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """(1, KV, P_i, hd) each → (G, KV, length, hd), real positions at the right."""
    padded = tensors[0].new_zeros(len(tensors), tensors[0].shape[1], length, tensors[0].shape[3])
    for g, t in enumerate(tensors):
        if t.shape[2]:
            padded[g, :, length - t.shape[2] :] = t[0]
    return padded


class _Inputs:
    """What the rows of a batch read from the clean runs: block inputs, clean outputs, keys and values, positions.

    One prompt: everything broadcasts. Several prompts (scope "final" only): each row gathers its own prompt's,
    the prefixes are left-padded and masked, and each row's position id is its own prompt's final position.
    """

    def __init__(self, arch: Architecture, runs: list[CleanRun], row_prompt: torch.Tensor, all_positions: bool):
        self.arch = arch
        self.single = len(runs) == 1
        self.row_prompt = row_prompt
        first = runs[0]
        device = first.block_in.device
        self.positions = first.block_in.shape[1]
        self.block_in = torch.stack([r.block_in for r in runs])  # (G, N, P, d)
        self.clean_final = torch.stack([r.final_layer_out() for r in runs])  # (G, 2N, d)
        self.eager = arch.eager_attention
        self.longest_prefix = 0
        self.first_real: torch.Tensor | None = None
        self.cache: PrefixCache | PaddedPrefixCache | None
        if self.single:
            position_ids = torch.arange(first.length - self.positions, first.length, device=device).unsqueeze(0)
            self.cache = None if all_positions else PrefixCache(first.past_keys, first.past_values)
            self.length = first.length
        else:
            assert not all_positions, "prompts are batched together only for the final position"
            lengths = torch.tensor([r.length for r in runs], device=device)
            longest = int(lengths.max()) - 1
            position_ids = (lengths - 1)[row_prompt].unsqueeze(1)  # (B, 1)
            self.cache = PaddedPrefixCache(
                [_left_pad([r.past_keys[layer] for r in runs], longest) for layer in range(arch.n_layers)],
                [_left_pad([r.past_values[layer] for r in runs], longest) for layer in range(arch.n_layers)],
                row_prompt,
            )
            self.longest_prefix = longest
            self.first_real = (longest - (lengths - 1))[row_prompt]  # (B,): where each row's real prefix starts
        self.position_ids = position_ids
        self.probe = self.block_in[0, 0, :1].unsqueeze(0)
        self._rotary: dict[str, object] = {}
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def entering(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        return self.block_in[self.row_prompt[rows], layer] if not self.single else self.block_in[0, layer]

    def clean_outputs(self) -> torch.Tensor:
        return self.clean_final[self.row_prompt]

    def _position_embeddings(self, layer: int, active: int) -> object:
        key = self.arch.rotary_key(layer)
        if key not in self._rotary:
            self._rotary[key] = self.arch.position_embeddings(layer, self.probe, self.position_ids)
        embeddings = self._rotary[key]
        if self.single or embeddings is None:
            return embeddings
        return tuple(t[:active] for t in embeddings)  # type: ignore[attr-defined]

    def _mask(self, window: int | None) -> torch.Tensor | None:
        """The additive attention mask of every row for one window size (None: no mask is needed).

        Keys are the clean prefix then the recomputed positions. A key is visible when it is a real position (not
        left padding), not in the future, and within the layer's sliding window (`window` keys, the query's own
        included). Eager attention has no implicit causal mask, so it gets an explicit one for several positions.
        """
        if window in self._masks:
            return self._masks[window]
        dtype, device = self.block_in.dtype, self.block_in.device
        allowed: torch.Tensor | None = None
        if not self.single:
            assert self.first_real is not None
            keys = torch.arange(self.longest_prefix + 1, device=device)
            allowed = keys.unsqueeze(0) >= self.first_real.unsqueeze(1)  # (B, K)
            if window is not None:
                allowed = allowed & (keys >= self.longest_prefix + 1 - window).unsqueeze(0)
            allowed = allowed[:, None, None, :]
        elif self.cache is not None:  # one prompt, final position: the query sees the prefix and itself
            if window is not None and self.length > window:
                keys = torch.arange(self.length, device=device)
                allowed = (keys >= self.length - window)[None, None, None, :]
        elif self.eager or (window is not None and self.length > window):  # one prompt, every position
            query = torch.arange(self.length, device=device).unsqueeze(1)
            keys = torch.arange(self.length, device=device).unsqueeze(0)
            allowed = keys <= query
            if window is not None:
                allowed = allowed & (keys > query - window)
            allowed = allowed[None, None]
        mask = None
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        self._masks[window] = mask
        return mask

    def attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        active = x.shape[0]
        mask = self._mask(self.arch.sliding_windows[layer])
        kwargs: dict[str, object] = {
            "attention_mask": mask if mask is None or mask.shape[0] == 1 else mask[:active],
            self.arch.cache_keyword: self.cache,
        }
        embeddings = self._position_embeddings(layer, active)
        if embeddings is not None:
            kwargs["position_embeddings"] = embeddings
        output = self.arch.attn(layer)(x, **kwargs)
        return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class LayerStep:
    """One layer of a batch driven by `drive_rows`: what the active rows' attention and MLP wrote."""

    layer: int
    active: int  # rows 0..active−1 have entered the stack by this layer
    attn: torch.Tensor  # (active, P, d): attention's write (after any post-norm, with replacements)
    mlp: torch.Tensor  # (active, P, d)
    head_in: torch.Tensor | None  # (active, P, H·hd): W_O's input with the replaced heads (keep_head_in only)


def entry_order(rows: list[AblatedRun]) -> tuple[list[int], torch.Tensor]:
    """(order, restore): rows sorted by entry layer (stable), and the index that puts outputs back in row order."""
    order = sorted(range(len(rows)), key=lambda b: rows[b].entry_layer)
    restore = torch.empty(len(rows), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(rows))
    return order, restore


def drive_rows(
    arch: Architecture, inputs: _Inputs, rows: list[AblatedRun], hidden: torch.Tensor, keep_head_in: bool = False
) -> Iterator[LayerStep]:
    """Run rows sorted by entry layer through the blocks, each from its own layer with the clean block input.

    `hidden` (B, P, d) is the residual stream of every row, updated in place; after the last layer it is what
    enters the final norm. Yields each layer's writes of the active rows (a prefix of the batch).
    """
    edits = _edits_by_layer(arch, rows)
    entry = torch.tensor([a.entry_layer for a in rows])
    for layer in range(arch.n_layers):
        active = int((entry <= layer).sum())
        entering = (entry == layer).nonzero().flatten()
        if entering.numel():
            hidden[entering] = inputs.entering(layer, entering)
        if active == 0:
            continue
        h = hidden[:active]
        layer_edits = edits[layer]
        captured: dict[str, torch.Tensor] = {}

        def keep_z(z: torch.Tensor, captured: dict[str, torch.Tensor] = captured) -> torch.Tensor:
            captured["z"] = z
            return z

        with hooks_removed_on_exit() as handles:
            if layer_edits.head_rows:
                handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(_replace_heads(layer_edits))))
            if keep_head_in:  # registered after the replacement, so it sees the replaced heads
                handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(keep_z)))
            attn = inputs.attention(layer, arch.attn_norm(layer)(h))
        attn = arch.attn_post_norm(layer)(attn)  # identity unless post-norm blocks: replacements are its outputs
        if layer_edits.attn_rows:
            assert layer_edits.attn_values is not None  # stacked whenever there are rows
            attn = attn.clone()
            attn[layer_edits.attn_rows] = layer_edits.attn_values.to(attn.dtype)  # type: ignore[union-attr]
        mlp_input = h if arch.parallel_blocks else h + attn
        mlp = arch.mlp_post_norm(layer)(arch.mlp(layer)(arch.mlp_norm(layer)(mlp_input)))
        if layer_edits.mlp_rows:
            assert layer_edits.mlp_values is not None  # stacked whenever there are rows
            mlp = mlp.clone()
            mlp[layer_edits.mlp_rows] = layer_edits.mlp_values.to(mlp.dtype)  # type: ignore[union-attr]
        hidden[:active] = mlp_input + mlp if not arch.parallel_blocks else h + attn + mlp
        yield LayerStep(layer=layer, active=active, attn=attn, mlp=mlp, head_in=captured.get("z"))


@torch.no_grad()
def run_ablated_rows(
    arch: Architecture,
    runs: list[CleanRun],
    batch: list[tuple[int, AblatedRun]],
    all_positions: bool,
    keep_head_in: bool = False,
) -> AblatedOutputs:
    """Run each row (prompt index into `runs`, ablation) from its own layer on; outputs in the batch's order.
    `keep_head_in`: also every layer's out-projection input at the final position (the clean runs must have it)."""
    order, restore = entry_order([ablation for _, ablation in batch])
    rows = [batch[b][1] for b in order]
    row_prompt = torch.tensor([batch[b][0] for b in order])
    inputs = _Inputs(arch, runs, row_prompt, all_positions)
    like = runs[0].block_in
    hidden = torch.empty(len(rows), inputs.positions, arch.d_model, dtype=like.dtype, device=like.device)
    layer_out_final = inputs.clean_outputs()
    head_in_final = _clean_head_in_final(runs)[row_prompt.to(like.device)] if keep_head_in else None  # (B, N, H·hd)
    for step in drive_rows(arch, inputs, rows, hidden, keep_head_in=keep_head_in):
        layer_out_final[: step.active, 2 * step.layer] = step.attn[:, -1]
        layer_out_final[: step.active, 2 * step.layer + 1] = step.mlp[:, -1]
        if head_in_final is not None:  # rows that enter later keep their prompt's clean input here
            assert step.head_in is not None
            head_in_final[: step.active, step.layer] = step.head_in[:, -1]
    return AblatedOutputs(
        layer_out_final=layer_out_final[restore].float(),
        x_final=hidden[restore, -1].float(),
        head_in_final=None if head_in_final is None else head_in_final[restore.to(like.device)],
    )


def _clean_head_in_final(runs: list[CleanRun]) -> torch.Tensor:
    """(G, N, H·hd): every prompt's clean out-projection inputs at its final position."""
    if any(run.head_in is None for run in runs):
        raise ValueError("the head response basis needs the clean runs' head inputs")
    return torch.stack([run.head_in[:, -1] for run in runs if run.head_in is not None])


def run_ablated(
    arch: Architecture,
    prompts: list[tuple[CleanRun, list[AblatedRun]]],
    all_positions: bool,
    batch_tokens: int | BatchBudget,
    keep_head_in: bool = False,
) -> list[AblatedOutputs]:
    """Every ablated run of several prompts, batched within the budget (rows × longest prompt, × 2 for "all");
    prompts share batches only at the final position. One AblatedOutputs per prompt.

    A batch that runs out of device memory is retried in halves, and the halved budget holds for the rest of the
    sweep (`BatchBudget`); a single row that does not fit fails with `BatchDoesNotFit` and the reason.
    `keep_head_in`: each row's out-projection inputs at the final position too (the head response basis).
    """
    budget = batch_tokens if isinstance(batch_tokens, BatchBudget) else BatchBudget(batch_tokens)
    runs = [run for run, _ in prompts]
    per_row = max(run.length for run in runs) * (2 if all_positions else 1)
    rows = [(p, ablation) for p, (_, ablations) in enumerate(prompts) for ablation in ablations]
    if all_positions and len(prompts) > 1:
        raise ValueError("all-position ablations are batched one prompt at a time")
    device = runs[0].block_in.device
    parts = []
    start = 0
    while start < len(rows):
        chunk = rows[start : start + max(1, budget.tokens // per_row)]
        used = sorted({p for p, _ in chunk})
        local = {p: k for k, p in enumerate(used)}
        try:
            part = run_ablated_rows(
                arch, [runs[p] for p in used], [(local[p], a) for p, a in chunk], all_positions, keep_head_in
            )
        except torch.OutOfMemoryError as error:
            release_cached_memory(device)
            budget.halve(per_row, len(chunk), error)
            continue
        parts.append(part)
        start += len(chunk)
    layer_out = torch.cat([part.layer_out_final for part in parts])
    x_final = torch.cat([part.x_final for part in parts])
    head_in = torch.cat([p.head_in_final for p in parts if p.head_in_final is not None]) if keep_head_in else None
    outputs, offset = [], 0
    for _, ablations in prompts:
        n = len(ablations)
        span = slice(offset, offset + n)
        outputs.append(AblatedOutputs(
            layer_out_final=layer_out[span], x_final=x_final[span],
            head_in_final=None if head_in is None else head_in[span],
        ))
        offset += n
    return outputs
