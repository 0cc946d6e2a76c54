"""Activation patching between a clean and a corrupted prompt (docs/concepts/patching.md).

For each pair (clean and corrupted token ids of one length, an answer and a counterfactual token) the *base* run
is the corrupted one for `denoise` (the clean activation is patched in) and the clean one for `noise` (the corrupted
activation is patched in); the other run is the *source*. A patch replaces one site's activation at one position of
the base run by the source's and reads the metric, logit(answer) − logit(counterfactual) at the final position.

Speed: a patch at layer L and position p leaves everything before layer L, and every position before p, as in the
base run. So each patched run enters the stack at layer L with the base run's residual stream, recomputes only the
positions p … T−1, and attends to the base run's cached keys and values of positions 0 … p−1. The patches of one
position are batched together, sorted by entry layer (the rows active at a layer are a prefix of the batch). The
blocks are driven with the model's own modules; only the residual wiring is written here. A prompt's run
(`PatchRun`: one forward pass keeping every position) is a function of the model and its tokens alone, so with the
model's clean-run cache (worker/engine/clean.py) each prompt runs once for every pair, chunk and job that patches it.

Shapes: T tokens, W = T − p recomputed positions, N layers, H heads of width hd, d model width, B rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import DynamicCache

from hydra_ablate_client.vocabulary import (
    PatchDirection,
    PatchMetric,
    PositionScope,
    knockout_name,
    parse_patch_site,
)
from worker.engine.ablated_runs import PrefixCache
from worker.engine.architecture import Architecture, cache_keyword, describe, head_part_projection, head_part_refusal
from worker.engine.attention_patterns import PatternEdit, patterns_of
from worker.engine.clean import CleanRun, CleanRunCache
from worker.engine.errors import InputError
from worker.engine.hooks import hooks_removed_on_exit, on_input, on_output
from worker.engine.readout import Readout

# Pairs whose clean and corrupted metrics differ by less than this (in logits) get no patching score: the score
# divides by that difference, and a near-zero one turns noise into arbitrarily large scores.
PAIR_EPSILON = 1e-3
DEFAULT_BATCH_ROWS = 256


@dataclass(frozen=True)
class Site:
    """One patching site: kind "resid_pre", "attn", "mlp" or "head"; a head's part "q", "k", "v" or None (output)."""

    kind: str
    layer: int
    head: int | None = None
    part: str | None = None

    @property
    def name(self) -> str:
        if self.kind != "head":
            return f"{self.kind}.{self.layer}"
        return f"head.{self.layer}.{self.head}" + (f".{self.part}" if self.part else "")


def model_site(name: str, arch: Architecture) -> Site:
    """The model's site with this name; InputError (a ValueError) saying what to change."""
    try:
        parts = parse_patch_site(name)
    except ValueError as error:
        raise InputError(str(error)) from None
    if parts.layer >= arch.n_layers:
        raise InputError(f"site '{name}': layer {parts.layer} out of range (the model has {arch.n_layers} layers)")
    if parts.head is not None and parts.head >= arch.n_heads:
        raise InputError(f"site '{name}': head {parts.head} out of range (the model has {arch.n_heads} heads)")
    if parts.part is not None:
        reason = head_part_refusal(arch, parts.part)
        if reason is not None:
            raise InputError(f"site '{name}' cannot be patched on this '{arch.model_type}' model: {reason}")
    return Site(parts.kind, parts.layer, parts.head, parts.part)


@dataclass(frozen=True)
class PatchSpec:
    sites: tuple[str, ...]
    direction: PatchDirection = "denoise"
    positions: PositionScope = "final"  # "all": each site at every position, one column per position
    metric: PatchMetric = "logit_diff"
    epsilon: float = PAIR_EPSILON
    # Knockout sets of sites, each patched together in one run and reported after `sites`, named by its members
    # joined with "+" ("head.9.6+head.9.9").
    knockouts: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class PatchPair:
    clean_ids: torch.Tensor  # (T,) long
    corrupted_ids: torch.Tensor  # (T,) long, the same length
    answer_id: int
    counterfactual_id: int


@dataclass
class PairPatching:
    """One pair's patching results: lists over sites (outer) and patched positions (inner)."""

    clean_metric: float
    corrupted_metric: float
    flagged: bool  # |clean − corrupted| < epsilon: no patching score
    positions: list[int]  # the patched positions: [T − 1] for "final", 0 … T − 1 for "all"
    patched_metric: list[list[float]]
    patching_score: list[list[float | None]]


@dataclass
class PatchResult:
    sites: list[str]
    direction: PatchDirection
    positions: PositionScope
    epsilon: float
    pairs: list[PairPatching]
    # The score of the pairs' mean metrics, [site][position]: (mean patched − mean corrupted) / (mean clean − mean
    # corrupted) for denoise (the mirror for noise), over every pair. Per-pair scores of pairs with small gaps are
    # noisy; this is TransformerLens' batch-mean convention. None when the mean gap is under epsilon, or (positions
    # "all") when the pairs' lengths differ, so that their position columns do not line up.
    pooled_score: list[list[float | None]] | None = None


def pooled_scores(
    pairs: list[PairPatching], direction: str, epsilon: float, positions: str
) -> list[list[float | None]] | None:
    """PatchResult.pooled_score of these pairs (None when their position columns differ: every position of prompts
    of different lengths; the final position always lines up)."""
    if not pairs or (positions == "all" and any(p.positions != pairs[0].positions for p in pairs)):
        return None
    n = len(pairs)
    clean = sum(p.clean_metric for p in pairs) / n
    corrupted = sum(p.corrupted_metric for p in pairs) / n
    patched = torch.tensor([p.patched_metric for p in pairs], dtype=torch.float64).mean(dim=0).tolist()
    return [[patching_score(v, clean, corrupted, direction, epsilon) for v in row] for row in patched]


def patching_score(patched: float, clean: float, corrupted: float, direction: str, epsilon: float) -> float | None:
    """0: the patch changed nothing; 1: it moved the metric all the way to the source run's value.

    denoise: (patched − corrupted) / (clean − corrupted), TransformerLens' normalised logit difference;
    noise: the mirror, (patched − clean) / (corrupted − clean). None when |clean − corrupted| < epsilon.
    """
    if abs(clean - corrupted) < epsilon:
        return None
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    return (patched - base) / (source - base)


@dataclass(frozen=True)
class PatchCapture:
    """What a patching run keeps of its prompt's pass (the key of its entry in the clean-run cache, beside the token
    ids): every position's activations, keys and values, and the outputs of these head-part projections."""

    parts: frozenset[tuple[str, int]]  # ("q"|"k"|"v", layer)


@dataclass(frozen=True)
class PatchRun:
    """What a patch reads from the base run or takes from the source run, at every position.

    Never modified once made (the clean-run cache shares it between jobs, pairs and roles): the source's attention
    patterns go into a copy (`_with_patterns`)."""

    block_in: torch.Tensor  # (N, T, d): the residual stream entering each block (resid_pre)
    attn: torch.Tensor  # (N, T, d): what attention writes (after any post-norm)
    mlp: torch.Tensor  # (N, T, d)
    head_in: torch.Tensor  # (N, T, H·hd): the output projection's input (every head's output)
    parts: dict[tuple[str, int], torch.Tensor]  # ("q"|"k"|"v", layer) → (T, heads·hd) projection outputs;
    # ("pattern", layer) → (H, T, T) attention probabilities (source run only, added by `_with_patterns`)
    keys: list[torch.Tensor]  # per layer (1, KV, T, hd): cached keys (after rotary)
    values: list[torch.Tensor]
    x_final: torch.Tensor  # (d,): the residual stream entering the final norm at the final position
    logits_final: torch.Tensor  # (V,)

    def nbytes(self) -> int:
        tensors = [self.block_in, self.attn, self.mlp, self.head_in, self.x_final, self.logits_final,
                   *self.parts.values(), *self.keys, *self.values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def as_clean_run(self, all_positions: bool, with_heads: bool) -> CleanRun | None:
        """The clean run of scope "final" of this prompt (worker/engine/clean.py), from views of this run: `_record`
        makes the forward call `run_clean` makes for that scope (one unpadded prompt, a cache built without the
        config, logits of the final position) and captures the same modules' tensors, so these are its very values.
        None for scope "all", which `run_clean` computes without a cache."""
        if all_positions:
            return None
        n, length = int(self.block_in.shape[0]), int(self.block_in.shape[1])
        return CleanRun(
            layer_out=torch.stack([self.attn[:, -1:], self.mlp[:, -1:]], dim=1).reshape(2 * n, 1, -1),
            block_in=self.block_in[:, -1:],
            head_in=self.head_in[:, -1:] if with_heads else None,
            x_final=self.x_final,
            logits_final=self.logits_final,
            length=length,
            past_keys=[k[:, :, :-1] for k in self.keys],
            past_values=[v[:, :, :-1] for v in self.values],
        )


@torch.no_grad()
def _record(model: nn.Module, arch: Architecture, ids: torch.Tensor, parts: frozenset[tuple[str, int]]) -> PatchRun:
    """One forward pass of one prompt, keeping every position's activations and keys/values."""
    n = arch.n_layers
    kept: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key: tuple[str, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(t: torch.Tensor) -> torch.Tensor:
            kept[key] = t[0].clone()
            return t

        return edit

    def keep_block_in(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            assert isinstance(hidden, torch.Tensor)
            kept[("resid_pre", layer)] = hidden[0].clone()

        return hook

    final: list[torch.Tensor] = []

    def keep_x(x: torch.Tensor) -> torch.Tensor:
        final.append(x[0, -1].clone())
        return x

    with hooks_removed_on_exit() as handles:
        for layer in range(n):
            handles.append(arch.blocks[layer].register_forward_pre_hook(keep_block_in(layer), with_kwargs=True))
            handles.append(arch.attn_writer(layer).register_forward_hook(on_output(keep(("attn", layer)))))
            handles.append(arch.mlp_writer(layer).register_forward_hook(on_output(keep(("mlp", layer)))))
            handles.append(arch.out_proj(layer).register_forward_pre_hook(on_input(keep(("head", layer)))))
        for part, layer in parts:
            projection = head_part_projection(arch, layer, part)
            handles.append(projection.register_forward_hook(on_output(keep((part, layer)))))
        handles.append(arch.final_norm.register_forward_pre_hook(on_input(keep_x)))
        cache = DynamicCache()  # built without the config: keeps every position of sliding-window layers too
        output = model(
            input_ids=ids.unsqueeze(0), use_cache=True, logits_to_keep=1, **{cache_keyword(type(model)): cache}
        )
    cached = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    cached = getattr(cached, "self_attention_cache", cached)
    layers = cached.layers  # type: ignore[union-attr]
    return PatchRun(
        block_in=torch.stack([kept[("resid_pre", layer)] for layer in range(n)]),
        attn=torch.stack([kept[("attn", layer)] for layer in range(n)]),
        mlp=torch.stack([kept[("mlp", layer)] for layer in range(n)]),
        head_in=torch.stack([kept[("head", layer)] for layer in range(n)]),
        parts={key: kept[key] for key in parts},
        keys=[layer.keys for layer in layers],
        values=[layer.values for layer in layers],
        x_final=final[0],
        logits_final=output.logits[0, -1].float(),
    )


def _recorded(
    model: nn.Module, arch: Architecture, ids: torch.Tensor, parts: frozenset[tuple[str, int]],
    cache: CleanRunCache | None,
) -> PatchRun:
    """`_record`, or the same run kept by `cache` from an earlier pair, chunk or job (any role: clean or corrupted)."""
    if cache is None:
        return _record(model, arch, ids, parts)
    return cache.get_entry(ids, PatchCapture(parts), lambda: _record(model, arch, ids, parts))


@torch.no_grad()
def _with_patterns(arch: Architecture, run: PatchRun, layers: set[int]) -> PatchRun:
    """A copy of `run` (its tensors shared) whose `parts` add each layer's attention probabilities (H, T, T), by the
    layer's own attention on the run's block input (worker/engine/attention_patterns.py)."""
    if not layers:
        return run
    parts = dict(run.parts)
    length = int(run.block_in.shape[1])
    position_ids = torch.arange(length, device=run.block_in.device).unsqueeze(0)
    probe = run.block_in[0, :1].unsqueeze(0)
    for layer in sorted(layers):
        kwargs: dict[str, object] = {"attention_mask": _mask(arch, layer, 0, length, run.block_in)}
        embeddings = arch.position_embeddings(layer, probe, position_ids)
        if embeddings is not None:
            kwargs["position_embeddings"] = embeddings
        edit = PatternEdit()
        with patterns_of(arch.attn(layer), edit):
            arch.attn(layer)(arch.attn_norm(layer)(run.block_in[layer].unsqueeze(0)), **kwargs)
        assert edit.kept is not None
        parts[("pattern", layer)] = edit.kept[0]
    return replace(run, parts=parts)


def _mask(arch: Architecture, layer: int, start: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """The additive mask (1, 1, W, T) of queries start … T−1 over keys 0 … T−1: causal and within the layer's window.

    Always explicit: with a cached prefix the queries are not the keys, so no implicit causal mask is right.
    """
    query = torch.arange(start, length, device=like.device).unsqueeze(1)
    keys = torch.arange(length, device=like.device).unsqueeze(0)
    allowed = keys <= query
    window = arch.sliding_windows[layer]
    if window is not None:
        allowed = allowed & (keys > query - window)
    mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[None, None]


def _columns(site: Site, head_dim: int) -> slice:
    assert site.head is not None, "a head site names its head"
    return slice(site.head * head_dim, (site.head + 1) * head_dim)


def _replace_rows(rows: list[int], cols: list[slice], values: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An edit putting value k into row rows[k], first recomputed position, columns cols[k]."""

    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        for row, col, value in zip(rows, cols, values, strict=True):
            t[row, 0, col] = value.to(t.dtype)
        return t

    return edit


@torch.no_grad()
def patched_final(
    arch: Architecture, base: PatchRun, source: PatchRun, patches: list[tuple[Site, ...]], start: int, length: int
) -> torch.Tensor:
    """The residual stream entering the final norm at the final position (B, d) of each patched run, each run
    patching its sites (one, or a knockout set's together) at position `start`; only positions start … T−1 are
    recomputed, from the run's lowest site's layer on."""
    order = sorted(range(len(patches)), key=lambda b: min(s.layer for s in patches[b]))
    rows = [patches[b] for b in order]
    entry = torch.tensor([min(s.layer for s in row) for row in rows])
    like = base.block_in
    width = length - start
    hidden = torch.empty(len(rows), width, arch.d_model, dtype=like.dtype, device=like.device)
    cache = PrefixCache([k[:, :, :start] for k in base.keys], [v[:, :, :start] for v in base.values])
    position_ids = torch.arange(start, length, device=like.device).unsqueeze(0)
    probe = like[0, :1].unsqueeze(0)
    rotary: dict[str, object] = {}
    masks: dict[int | None, torch.Tensor] = {}  # per sliding-window size
    for layer in range(int(entry.min()), arch.n_layers):
        active = int((entry <= layer).sum())
        entering = (entry == layer).nonzero().flatten()
        if entering.numel():
            hidden[entering] = base.block_in[layer, start:]  # every row enters at its lowest site's layer
        at_layer = [(b, site) for b in range(active) for site in rows[b] if site.layer == layer]
        for b, site in at_layer:
            if site.kind == "resid_pre":
                hidden[b, 0] = source.block_in[layer, start]
        h = hidden[:active]

        def picked(kind: str, part: str | None = None) -> list[tuple[int, Site]]:
            return [(b, site) for b, site in at_layer if site.kind == kind and site.part == part]  # noqa: B023

        with hooks_removed_on_exit() as handles:
            heads = picked("head")
            if heads:
                cols = [_columns(site, arch.head_dim) for _, site in heads]
                values = [source.head_in[layer, start, c] for c in cols]
                replace = on_input(_replace_rows([b for b, _ in heads], cols, values))
                handles.append(arch.out_proj(layer).register_forward_pre_hook(replace))
            for part in ("q", "k", "v"):
                chosen = picked("head", part)
                if chosen:
                    cols = [_columns(site, arch.head_dim) for _, site in chosen]
                    values = [source.parts[(part, layer)][start, c] for c in cols]
                    edit = on_output(_replace_rows([b for b, _ in chosen], cols, values))
                    handles.append(head_part_projection(arch, layer, part).register_forward_hook(edit))
            patterns = picked("head", "pattern")
            pattern_edit = PatternEdit(
                replace={
                    (b, site.head): source.parts[("pattern", layer)][site.head, start, : start + 1]
                    for b, site in patterns
                    if site.head is not None
                }
            )
            key = arch.rotary_key(layer)
            if key not in rotary:
                rotary[key] = arch.position_embeddings(layer, probe, position_ids)
            window = arch.sliding_windows[layer]
            if window not in masks:
                masks[window] = _mask(arch, layer, start, length, like)
            kwargs: dict[str, object] = {"attention_mask": masks[window], arch.cache_keyword: cache}
            if rotary[key] is not None:
                kwargs["position_embeddings"] = rotary[key]
            if patterns:
                with patterns_of(arch.attn(layer), pattern_edit):
                    output = arch.attn(layer)(arch.attn_norm(layer)(h), **kwargs)
            else:
                output = arch.attn(layer)(arch.attn_norm(layer)(h), **kwargs)
        attn = arch.attn_post_norm(layer)(output[0] if isinstance(output, tuple) else output)
        for b, _ in picked("attn"):
            attn[b, 0] = source.attn[layer, start]
        mlp_input = h if arch.parallel_blocks else h + attn
        mlp = arch.mlp_post_norm(layer)(arch.mlp(layer)(arch.mlp_norm(layer)(mlp_input)))
        for b, _ in picked("mlp"):
            mlp[b, 0] = source.mlp[layer, start]
        hidden[:active] = h + attn + mlp if arch.parallel_blocks else mlp_input + mlp
    restore = torch.empty(len(rows), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(rows))
    return hidden[restore, -1]


ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class PatchingCancelled(RuntimeError):
    """Raised between pairs when `should_stop` says so."""


def patch_set(members: tuple[str, ...], index: int, arch: Architecture) -> tuple[Site, ...]:
    """Knockout set `index` of sites patched together; InputError saying what to change."""
    if not members:
        raise InputError(f"knockout set {index} is empty: name at least one site")
    sites = tuple(model_site(name, arch) for name in members)
    for k, site in enumerate(sites):
        if site in sites[:k]:
            raise InputError(f"knockout set {index} names '{site.name}' twice: name each site once")
    return sites


def check_pair(pair: PatchPair, index: int) -> None:
    """Clean and corrupted prompts must have the same number of tokens (a patch aligns them position by position)."""
    clean, corrupted = int(pair.clean_ids.shape[0]), int(pair.corrupted_ids.shape[0])
    if clean != corrupted:
        raise InputError(
            f"pair {index}: the clean prompt has {clean} tokens and the corrupted one {corrupted}; patching aligns "
            "them position by position, so make them the same length"
        )
    if clean == 0:
        raise InputError(f"pair {index}: the prompts are empty")


@torch.no_grad()
def run_patching(
    model: nn.Module,
    spec: PatchSpec,
    pairs: list[PatchPair],
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    cache: CleanRunCache | None = None,
) -> PatchResult:
    """Every site of `spec` patched at the final position or at every position, for every pair.

    `cache`: the model's clean-run cache (worker/engine/clean.py), which keeps each prompt's run for the other pairs,
    chunks and jobs that patch it (and serves an ablation job's clean runs of the same prompts); None runs every
    pair's two passes."""
    arch = describe(model)
    sites: list[tuple[Site, ...]] = [(model_site(name, arch),) for name in spec.sites]
    sites += [patch_set(members, k, arch) for k, members in enumerate(spec.knockouts)]
    if not sites:
        raise InputError("patching needs at least one site or knockout set")
    for i, pair in enumerate(pairs):
        check_pair(pair, i)
    readout = Readout(arch, "logit_diff")
    wanted = {(s.part, s.layer) for row in sites for s in row if s.part is not None}
    parts = frozenset(key for key in wanted if key[0] != "pattern")  # patterns: from the block input, per job
    results = []
    total = sum(len(sites) * (int(p.clean_ids.shape[0]) if spec.positions == "all" else 1) for p in pairs)
    done = 0
    for pair in pairs:
        if should_stop is not None and should_stop():
            raise PatchingCancelled("patching cancelled")
        clean = _recorded(model, arch, pair.clean_ids, parts, cache)
        corrupted = _recorded(model, arch, pair.corrupted_ids, parts, cache)
        base, source = (corrupted, clean) if spec.direction == "denoise" else (clean, corrupted)
        source = _with_patterns(arch, source, {layer for part, layer in wanted if part == "pattern"})
        answer, counterfactual = pair.answer_id, pair.counterfactual_id

        # The model's own output logits (soft-capped where the model caps them), like the patched runs' below.
        clean_metric = float(clean.logits_final[answer] - clean.logits_final[counterfactual])
        corrupted_metric = float(corrupted.logits_final[answer] - corrupted.logits_final[counterfactual])
        length = int(pair.clean_ids.shape[0])
        positions = list(range(length)) if spec.positions == "all" else [length - 1]
        patched = torch.empty(len(sites), len(positions))
        for column, start in enumerate(positions):
            for first in range(0, len(sites), batch_rows):
                chunk = sites[first : first + batch_rows]
                x = patched_final(arch, base, source, chunk, start, length)
                values = readout.capped_value(x.float(), answer, counterfactual)
                patched[first : first + len(chunk), column] = values.cpu()
                done += len(chunk)
            if on_progress is not None:
                on_progress(done, total)
        rows = patched.tolist()
        results.append(
            PairPatching(
                clean_metric=clean_metric,
                corrupted_metric=corrupted_metric,
                flagged=abs(clean_metric - corrupted_metric) < spec.epsilon,
                positions=positions,
                patched_metric=rows,
                patching_score=[
                    [patching_score(v, clean_metric, corrupted_metric, spec.direction, spec.epsilon) for v in row]
                    for row in rows
                ],
            )
        )
    return PatchResult(
        sites=[knockout_name([s.name for s in row]) for row in sites],
        direction=spec.direction,
        positions=spec.positions,
        epsilon=spec.epsilon,
        pairs=results,
        pooled_score=pooled_scores(results, spec.direction, spec.epsilon, spec.positions),
    )
