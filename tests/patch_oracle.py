"""Brute-force activation patching: one full forward pass of the Hugging Face model per patch, with hooks.

The independent check on worker/engine/patching.py; it shares no code with the engine (module locations come from
tests/oracle.py's own `locate_parts` and the table below). Written to be obviously right, not fast:

* the source run (clean for denoise, corrupted for noise) is one plain forward pass whose activations are captured
  at every position with hooks;
* each patch is one full forward pass of the base prompt (corrupted for denoise, clean for noise), no cache, with
  one hook replacing the site's activation at one position by the source's;
* the metric is logit(answer) − logit(counterfactual) read off the model's own output logits.

Sites and their hooks:

- `resid_pre.L`: a forward pre-hook on block L replacing its `hidden_states` input;
- `attn.L` / `mlp.L`: a forward hook on the module whose output is what the block writes (tests/oracle.py);
- `head.L.H`: a forward pre-hook on the output projection replacing the head's slice of its input;
- `head.L.H.q|k|v`: a forward hook on the attention's `q_proj` / `k_proj` / `v_proj` replacing the head's columns;
- `head.L.H.pattern`: the model runs with eager attention, and the modelling file's `eager_attention_forward` is
  wrapped: for layer L's attention module it reads the probabilities, replaces head H's row at the patched query
  and recomputes that call's output as probabilities × values (the model's own function computes the rest).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tests.oracle import ModelParts, locate_parts

_located: dict[int, ModelParts] = {}


def _parts(model: Any) -> ModelParts:
    """tests/oracle.py's module locations, found once per model (locating copies the unembedding)."""
    if id(model) not in _located:
        _located[id(model)] = locate_parts(model)
    return _located[id(model)]


def _blocks(model: Any) -> list[nn.Module]:
    model_type = model.config.model_type
    if model_type in ("gpt2", "gptj"):
        return list(model.transformer.h)
    if model_type == "gpt_neox":
        return list(model.gpt_neox.layers)
    return list(model.model.layers)


def _attention(model: Any, layer: int) -> Any:
    block: Any = _blocks(model)[layer]
    model_type = model.config.model_type
    if model_type in ("gptj", "gpt2"):
        return block.attn
    return block.attention if model_type == "gpt_neox" else block.self_attn


def _wrap_eager(model: Any, layer: int, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[], None]:
    """Run the model with eager attention and layer `layer`'s eager attention call passing its probabilities
    (1, H, T, T) to `edit`, which returns replaced probabilities (or None to keep them); returns the undo."""
    attention = _attention(model, layer)
    modelling: Any = sys.modules[type(attention).__module__]
    inner = modelling.eager_attention_forward
    before = attention.config._attn_implementation

    def eager(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any) -> Any:
        output, probs = inner(module, query, key, value, mask, **kw)
        if module is not attention:
            return output, probs
        replaced = edit(probs)
        if replaced is None:
            return output, probs
        repeat = query.shape[1] // value.shape[1]
        values = torch.repeat_interleave(value, repeat, dim=1)
        return torch.matmul(replaced, values).transpose(1, 2).contiguous(), replaced

    modelling.eager_attention_forward = eager
    attention.config._attn_implementation = "eager"

    def undo() -> None:
        modelling.eager_attention_forward = inner
        attention.config._attn_implementation = before

    return undo


def _parse(site: str) -> tuple[str, int, int | None, str | None]:
    kind, *rest = site.split(".")
    return kind, int(rest[0]), int(rest[1]) if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None


def _module(model: Any, site: str) -> tuple[nn.Module, str]:
    """The hooked module of a site and how it is hooked: "input" (first input / hidden_states) or "output"."""
    parts = _parts(model)
    kind, layer, _head, part = _parse(site)
    if kind == "resid_pre":
        return _blocks(model)[layer], "input"
    if kind == "attn":
        return parts.attn[layer], "output"
    if kind == "mlp":
        return parts.mlp[layer], "output"
    if part is None:
        return parts.out_proj[layer], "input"
    return getattr(_attention(model, layer), f"{part}_proj"), "output"


def _columns(model: Any, site: str) -> slice:
    kind, _layer, head, _part = _parse(site)
    if kind != "head":
        return slice(None)
    assert head is not None
    head_dim = _parts(model).head_dim
    return slice(head * head_dim, (head + 1) * head_dim)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture(model: Any, ids: torch.Tensor, sites: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every site's activation (T, e) in one plain forward pass, and the final logits (V,)."""
    kept: dict[str, torch.Tensor] = {}
    handles: list[Any] = []
    for site in sites:
        _kind, layer, head, part = _parse(site)
        if part == "pattern":
            def keep_pattern(probs: torch.Tensor, site: str = site, head: Any = head) -> None:
                kept[site] = probs[0, head].detach().clone()  # (T, T): row p is query p's pattern
                return None

            handles.append(_Undo(_wrap_eager(model, layer, keep_pattern)))
            continue
        module, where = _module(model, site)

        if where == "input":
            def keep_input(_m: nn.Module, args: tuple, kwargs: dict, site: str = site) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                kept[site] = hidden[0].detach().clone()

            handles.append(module.register_forward_pre_hook(keep_input, with_kwargs=True))
        else:
            def keep_output(_m: nn.Module, _args: tuple, output: Any, site: str = site) -> None:
                kept[site] = _first(output)[0].detach().clone()

            handles.append(module.register_forward_hook(keep_output))
    try:
        logits = model(input_ids=ids.unsqueeze(0), logits_to_keep=1).logits[0, -1].double()
    finally:
        for handle in reversed(handles):  # wrapped functions unwrap in the reverse order
            handle.remove()
    return kept, logits


class _Undo:
    """A hook handle's `remove` for a wrapped function."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self.remove = undo


@torch.no_grad()
def patched_logits(
    model: Any, ids: torch.Tensor, patches: list[tuple[str, torch.Tensor]], position: int
) -> torch.Tensor:
    """The final logits (V,) of one full forward pass of `ids` with every (site, value) of `patches` replaced at
    `position`: one site, or a knockout set's together."""
    handles = [_hook(model, site, position, value) for site, value in patches]
    try:
        return model(input_ids=ids.unsqueeze(0), logits_to_keep=1).logits[0, -1].double()
    finally:
        for handle in reversed(handles):  # wrapped functions unwrap in the reverse order
            handle.remove()


def _hook(model: Any, site: str, position: int, value: torch.Tensor) -> Any:
    """A hook replacing `site` at `position` by `value` (registered; the caller removes it)."""
    _kind, layer, head, part = _parse(site)
    if part == "pattern":
        def replace_pattern(probs: torch.Tensor) -> torch.Tensor:
            probs = probs.clone()
            probs[0, head, position] = value.to(probs.dtype)
            return probs

        return _Undo(_wrap_eager(model, layer, replace_pattern))
    module, where = _module(model, site)
    cols = _columns(model, site)
    if where == "input":
        def replace_input(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                hidden = args[0].clone()
                hidden[0, position, cols] = value[cols].to(hidden.dtype)
                return (hidden, *args[1:]), kwargs
            hidden = kwargs["hidden_states"].clone()
            hidden[0, position, cols] = value[cols].to(hidden.dtype)
            return args, {**kwargs, "hidden_states": hidden}

        return module.register_forward_pre_hook(replace_input, with_kwargs=True)

    def replace_output(_m: nn.Module, _args: tuple, output: Any) -> Any:
        out = _first(output).clone()
        out[0, position, cols] = value[cols].to(out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return module.register_forward_hook(replace_output)


def oracle_patching(
    model: Any,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    answer: int,
    counterfactual: int,
    sites: list[str],
    direction: str,
    positions: str,
    knockouts: list[list[str]] | None = None,
) -> tuple[float, float, list[list[float]]]:
    """(clean metric, corrupted metric, patched metric [site or knockout set][position]) by one forward pass per
    patch (a knockout set's sites patched together in one)."""
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    rows = [[site] for site in sites] + [list(members) for members in knockouts or []]
    acts, _ = capture(model, source, sorted({site for row in rows for site in row}))
    _, clean_logits = capture(model, clean, [])
    _, corrupted_logits = capture(model, corrupted, [])

    def diff(logits: torch.Tensor) -> float:
        return float(logits[answer] - logits[counterfactual])

    length = int(clean.shape[0])
    columns = list(range(length)) if positions == "all" else [length - 1]
    patched = [
        [diff(patched_logits(model, base, [(site, acts[site][p]) for site in row], p)) for p in columns]
        for row in rows
    ]
    return diff(clean_logits), diff(corrupted_logits), patched
