"""The clean run of one prompt: every layer component's output, the heads' inputs to W_O, and the readout inputs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import nn
from transformers import DynamicCache

from worker.engine.architecture import Architecture, cache_keyword
from worker.engine.hooks import hooks_removed_on_exit, on_input, on_output


@dataclass(frozen=True)
class CleanRun:
    """Clean activations of one prompt; positions are all T (scope "all") or just the final one (scope "final")."""

    layer_out: torch.Tensor  # (2N, P, d): attn.0, mlp.0, attn.1, ... in response-basis order
    block_in: torch.Tensor  # (N, P, d): the residual stream entering each block
    head_in: torch.Tensor | None  # (N, P, H·hd): input of the output projection, when heads are ablated
    x_final: torch.Tensor  # (d,): residual stream entering the final norm at the final position
    logits_final: torch.Tensor  # (V,)
    length: int
    past_keys: list[torch.Tensor]  # per layer (1, KV, T−1, hd): the prefix's keys (scope "final" only)
    past_values: list[torch.Tensor]
    x_all: torch.Tensor | None = None  # (T, d): residual stream entering the final norm at every position ("all")

    def final_layer_out(self) -> torch.Tensor:
        return self.layer_out[:, -1, :]

    def nbytes(self) -> int:
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            tensors = value if isinstance(value, list) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return total


TokenKey = bytes  # a prompt's token ids as bytes
# What an entry captured of its prompt's pass: (all positions, with heads) for a clean run of the ablation engines,
# another engine's own capture (a hashable it names, e.g. worker/engine/patching.py's) for its runs.
Capture = Hashable
EntryKey = tuple[TokenKey, Capture]
# Top tokens remembered apart from the runs: an int and a key of a few hundred bytes each, so 200,000 of them stay
# within a few tens of MiB whatever the vocabulary.
DEFAULT_MAX_TOPS = 200_000


class Cached(Protocol):
    """What the cache keeps: one unpadded prompt's pass, its size, and its final logits (for `top_token`)."""

    @property
    def logits_final(self) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


@runtime_checkable
class CoversCleanRuns(Protocol):
    """An entry whose pass captured everything some clean run holds, the very tensors `run_clean` would compute (the
    same forward call, the same hooks' captures), so that it can serve that run without a pass of its own."""

    def as_clean_run(self, all_positions: bool, with_heads: bool) -> CleanRun | None: ...


E = TypeVar("E", bound=Cached)


def token_key(token_ids: torch.Tensor) -> TokenKey:
    return bytes(token_ids.cpu().numpy().tobytes())


class CleanRunCache:
    """Clean runs of one model kept across sweeps, least recently used first out, at most `max_bytes` in all.

    The chunks of a job each need the clean runs of their prompts and of those prompts' resample sources (every
    prompt of the job for mean ablation over its own prompts): without this, a job of n prompts with s sources
    each ran up to n·(1 + s) clean passes, the same prompts again in every chunk; with it, n. A clean run is a
    function of the model and the token ids alone (one unpadded prompt, no batching), so a cached run is the very
    tensors a new pass would compute, not an approximation. Runs are never modified after they are made (CleanRun
    is frozen and the engine only reads its tensors). Owned by the loaded model (worker/model_cache.py): a model
    evicted from a worker takes its clean runs with it.

    Entries are keyed by the token ids and what the pass captured (`Capture`): the ablation engines' clean runs by
    (all positions, with heads), the patching engine's runs of a pair's prompts (every position, keys and values)
    by its own capture, under the same byte budget and order. A prompt's runs are the same whichever job or role
    (clean, corrupted, resample source) asks. An entry that covers a clean run (`CoversCleanRuns`) serves a request
    for that run when the run itself is not kept: the clean run of an ablation job at the final position comes from
    a patching job's run of the same prompt, without a pass or an entry of its own.

    Apart from the runs, it remembers each prompt's clean top token (`top_token`), which outlives the run's
    eviction: `resample_sources: "different_target"` needs the top token of every prompt of the job in every
    chunk, and a run holds the whole final logit vector (1 MiB on a 262k vocabulary), so a job of more prompts
    than the byte budget holds would otherwise run every prompt's clean pass again in each chunk.
    """

    def __init__(self, max_bytes: int, max_tops: int = DEFAULT_MAX_TOPS) -> None:
        self.max_bytes = max_bytes
        self.max_tops = max_tops
        self._runs: OrderedDict[EntryKey, tuple[Cached, int]] = OrderedDict()  # key -> (entry, its bytes)
        self._captures: dict[TokenKey, set[Capture]] = {}  # token ids -> the captures kept of them
        self._tops: OrderedDict[TokenKey, int] = OrderedDict()  # token ids -> clean top token id
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def bytes(self) -> int:
        return self._bytes

    def top_token(self, token_ids: torch.Tensor) -> int | None:
        """The clean top token at the final position of a prompt whose run this cache has seen; None otherwise."""
        ids = token_key(token_ids)
        with self._lock:
            top = self._tops.get(ids)
            if top is not None:
                self._tops.move_to_end(ids)
            return top

    def _remember_top(self, ids: TokenKey, run: Cached) -> None:  # called with the lock held
        if self.max_tops <= 0:
            return
        self._tops[ids] = int(run.logits_final.argmax())
        self._tops.move_to_end(ids)
        while len(self._tops) > self.max_tops:
            self._tops.popitem(last=False)

    def _kept(self, key: EntryKey) -> Cached | None:  # called with the lock held; counts a hit
        kept = self._runs.get(key)
        if kept is None:
            return None
        self._runs.move_to_end(key)
        self.hits += 1
        return kept[0]

    def _covering(self, ids: TokenKey, all_positions: bool, with_heads: bool) -> CleanRun | None:
        """The clean run served by another kept entry of these tokens (called with the lock held; counts a hit)."""
        for capture in self._captures.get(ids, ()):
            entry = self._runs[(ids, capture)][0]
            if isinstance(entry, CoversCleanRuns):
                run = entry.as_clean_run(all_positions, with_heads)
                if run is not None:
                    self._runs.move_to_end((ids, capture))
                    self.hits += 1
                    return run
        return None

    def _keep(self, key: EntryKey, entry: Cached) -> None:
        size = entry.nbytes()
        with self._lock:
            self.misses += 1
            self._remember_top(key[0], entry)
            if size > self.max_bytes or key in self._runs:
                return
            self._runs[key] = (entry, size)
            self._captures.setdefault(key[0], set()).add(key[1])
            self._bytes += size
            while self._bytes > self.max_bytes:
                (ids, capture), (_, evicted_size) = self._runs.popitem(last=False)
                self._bytes -= evicted_size
                captures = self._captures[ids]
                captures.discard(capture)
                if not captures:
                    del self._captures[ids]

    def get(self, token_ids: torch.Tensor, all_positions: bool, with_heads: bool,
            compute: Callable[[], CleanRun]) -> CleanRun:
        """The clean run of these tokens: kept, served by an entry that covers it, or computed (and kept)."""
        key: EntryKey = (token_key(token_ids), (all_positions, with_heads))
        with self._lock:
            kept = self._kept(key)
            if kept is not None:
                assert isinstance(kept, CleanRun)
                return kept
            covered = self._covering(key[0], all_positions, with_heads)
            if covered is not None:
                return covered
        run = compute()
        self._keep(key, run)
        return run

    def get_entry(self, token_ids: torch.Tensor, capture: Capture, compute: Callable[[], E]) -> E:
        """Another engine's run of these tokens under its own `capture` (always the type `compute` returns)."""
        key: EntryKey = (token_key(token_ids), capture)
        with self._lock:
            kept = self._kept(key)
        if kept is not None:
            return cast(E, kept)  # one capture, one type: only `compute`s of this capture made entries under it
        entry = compute()
        self._keep(key, entry)
        return entry


@torch.no_grad()
def run_clean(
    model: nn.Module, arch: Architecture, token_ids: torch.Tensor, *, all_positions: bool, with_heads: bool
) -> CleanRun:
    """One forward pass of one unpadded prompt, capturing what the sweep needs."""
    keep = slice(None) if all_positions else slice(-1, None)
    layer_out: list[torch.Tensor | None] = [None] * (2 * arch.n_layers)
    head_in: list[torch.Tensor | None] = [None] * arch.n_layers
    block_in: list[torch.Tensor | None] = [None] * arch.n_layers
    captured: dict[str, torch.Tensor] = {}

    def keeper(slot: int):
        def keep_output(out: torch.Tensor) -> torch.Tensor:
            layer_out[slot] = out[0, keep].clone()
            return out

        return keep_output

    def keep_head_in(layer: int):
        def keep_input(z: torch.Tensor) -> torch.Tensor:
            head_in[layer] = z[0, keep].clone()
            return z

        return keep_input

    def keep_block_in(layer: int):
        def keep_input(_module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            assert isinstance(hidden, torch.Tensor)
            block_in[layer] = hidden[0, keep].clone()

        return keep_input

    def keep_x(x: torch.Tensor) -> torch.Tensor:
        captured["x"] = x[0, -1].clone()
        if all_positions:
            captured["x_all"] = x[0].clone()
        return x

    with hooks_removed_on_exit() as handles:
        for layer in range(arch.n_layers):
            handles.append(arch.attn_writer(layer).register_forward_hook(on_output(keeper(2 * layer))))
            handles.append(arch.mlp_writer(layer).register_forward_hook(on_output(keeper(2 * layer + 1))))
            handles.append(arch.blocks[layer].register_forward_pre_hook(keep_block_in(layer), with_kwargs=True))
            if with_heads:
                handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(keep_head_in(layer))))
        handles.append(arch.final_norm.register_forward_pre_hook(on_input(keep_x)))
        # A cache built without the config keeps every position of every layer: a sliding-window layer's own cache
        # would drop the keys beyond its window, which the padded batches of fast.py still index by position.
        cache = None if all_positions else DynamicCache()
        output = model(
            input_ids=token_ids.unsqueeze(0), use_cache=not all_positions, logits_to_keep=1,
            **{cache_keyword(type(model)): cache},
        )
    logits = output.logits[0, -1]
    past_keys, past_values = _prefix_cache(output) if not all_positions else ([], [])

    return CleanRun(
        layer_out=torch.stack([t for t in layer_out if t is not None]),
        block_in=torch.stack([t for t in block_in if t is not None]),
        head_in=torch.stack([t for t in head_in if t is not None]) if with_heads else None,
        x_final=captured["x"],
        logits_final=logits.float(),
        length=int(token_ids.shape[0]),
        past_keys=past_keys,
        past_values=past_values,
        x_all=captured.get("x_all"),
    )


def _prefix_cache(output: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values (after rotary embedding) of every position but the last, per layer."""
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    cache = getattr(cache, "self_attention_cache", cache)
    layers = cache.layers  # type: ignore[union-attr]
    return [layer.keys[:, :, :-1].clone() for layer in layers], [layer.values[:, :, :-1].clone() for layer in layers]
