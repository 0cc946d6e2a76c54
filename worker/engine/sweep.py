"""The ablation sweep: clean runs, replacements, batched ablated runs (worker/engine/ablated_runs.py), then measures.

Read top to bottom; every measure is defined in docs/concepts/definitions.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from hydra_ablate_client.vocabulary import NormScaleMode, knockout_name
from worker.engine.ablated_runs import AblatedOutputs, AblatedRun, run_ablated
from worker.engine.architecture import Architecture, describe, head_basis_refusal
from worker.engine.clean import CleanRun, CleanRunCache, run_clean
from worker.engine.components import (
    Component,
    head_basis_components,
    is_downstream,
    knockout_set,
    layer_components,
    model_component,
    set_downstream,
)
from worker.engine.errors import InputError
from worker.engine.head_basis import final_head_basis_writes
from worker.engine.measures import ablated_profile, decompose, read_direct
from worker.engine.memory import (
    DEFAULT_BATCH_TOKENS,
    BatchBudget,
    BatchDoesNotFit,
    device_batch_tokens,
    release_cached_memory,
)
from worker.engine.readout import Readout
from worker.engine.replacements import (
    MeanActivations,
    align_to_length,
    component_rows,
    resample_sources,
    resample_sources_different_target,
)
from worker.engine.types import DrawMeasures, PatchSample, PromptMeasures, SweepInputs, SweepResult, SweepSpec

ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]
PhaseCallback = Callable[[str], None]  # "clean_passes", then "ablating"


class SweepCancelled(RuntimeError):
    """Raised between prompts when `should_stop` says so."""


@torch.no_grad()
def run_sweep(
    model: nn.Module,
    spec: SweepSpec,
    inputs: SweepInputs,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    on_phase: PhaseCallback | None = None,
    clean_cache: CleanRunCache | None = None,
) -> SweepResult:
    """Every measure of docs/concepts/definitions.md for every prompt × component of `spec`.

    `batch_tokens=None`: the budget comes from the device (worker/engine/memory.py: free CUDA memory once the clean
    runs are resident, the fixed default on a CPU). `clean_cache`: clean runs kept from earlier sweeps on this model
    (the other chunks of a job); None computes every one.
    """
    arch = describe(model)
    components = [model_component(name, arch.n_layers, arch.n_heads) for name in spec.components]
    sets = knockout_sets(arch, spec)
    heads_basis = spec.response_basis == "heads"
    refusal = head_basis_refusal(model.config) if heads_basis else None
    if refusal is not None:
        raise InputError(refusal)
    basis = head_basis_components(arch.n_layers, arch.n_heads) if heads_basis else layer_components(arch.n_layers)
    n_prompts = len(inputs.token_ids)
    all_positions = spec.positions == "all"
    ablated = [*components, *(c for members in sets for c in members)]
    with_heads = heads_basis or any(c.kind == "head" for c in ablated)
    readout = Readout(arch, spec.metric)

    def clean(ids: torch.Tensor) -> CleanRun:
        return clean_run(model, arch, ids, all_positions=all_positions, with_heads=with_heads, cache=clean_cache)

    candidates = list(range(n_prompts)) if inputs.measure_indices is None else list(inputs.measure_indices)
    if on_phase is not None:
        on_phase("clean_passes")
    runs: dict[int, CleanRun] = {}

    def clean_top(i: int) -> int:  # "different_target" sources: every prompt's clean top token
        if i not in runs:
            known = clean_cache.top_token(inputs.token_ids[i]) if clean_cache is not None else None
            if known is not None:  # seen by an earlier chunk: no clean pass (its run may have been evicted)
                return known
            runs[i] = clean(inputs.token_ids[i])  # kept: this prompt may be measured or a source here
        return int(runs[i].logits_final.argmax())

    sources = job_sources(spec, inputs, clean_top)
    runs.update({i: clean(inputs.token_ids[i]) for i in candidates if i not in runs})
    measured = _correct_only(candidates, runs, inputs.target_ids) if spec.only_correct else candidates
    means = complete_clean_runs(runs, spec, inputs, measured, sources, lambda i: clean(inputs.token_ids[i]), clean)
    budget = BatchBudget(job_batch_tokens(model, arch, runs, batch_tokens, all_positions))
    samples = len(sources[0]) if spec.ablation == "resample" else 1
    n_rows = len(components) + len(sets)  # a knockout set is one row per run, like one component
    total = len(candidates) * n_rows * samples
    done = (len(candidates) - len(measured)) * n_rows * samples  # left-out prompts count as done
    measures: list[PromptMeasures] = []
    rows_per_prompt = n_rows * samples
    if on_phase is not None:
        on_phase("ablating")
    for group in _prompt_groups(measured, runs, rows_per_prompt, all_positions, budget):
        if should_stop is not None and should_stop():
            raise SweepCancelled("sweep cancelled")
        work = []
        for i in group:
            run = runs[i]
            work.append((run, prompt_ablations(arch, spec, components, run, runs, sources[i], means, sets)))
        outputs_per_run = run_ablated(arch, work, all_positions, budget, keep_head_in=heads_basis)
        for i, (run, ablations), outputs in zip(group, work, outputs_per_run, strict=True):
            target = inputs.target_ids[i] if inputs.target_ids is not None else int(run.logits_final.argmax())
            counterfactual = inputs.counterfactual_ids[i] if inputs.counterfactual_ids is not None else None
            measure = _measure(
                arch, readout, run, ablations, outputs, basis, target, counterfactual, samples, sources[i],
                spec.norm_scale, spec.keep_samples, draw_seeds(spec),
            )
            measure.index = i
            measures.append(measure)
            runs[i] = replace(run, past_keys=[], past_values=[])  # the prefix cache is needed only while measuring
            done += len(ablations)
            if on_progress is not None:  # per prompt, not per batch: progress moves smoothly on long prompts
                on_progress(done, total)
    return SweepResult(
        components=[c.name for c in components] + [knockout_name([c.name for c in members]) for members in sets],
        response_basis=[c.name for c in basis],
        prompts=measures,
    )


def knockout_sets(arch: Architecture, spec: SweepSpec) -> list[list[Component]]:
    """The spec's knockout sets as components, each checked (components.knockout_set).

    In a post-norm block the norm mixes every head of a layer, so when attn.L can respond to another member while
    some of its heads are members, its response cannot be told apart from those heads' own change: refused."""
    sets = [knockout_set(members, k, arch.n_layers, arch.n_heads) for k, members in enumerate(spec.knockouts)]
    if not arch.post_norm:
        return sets
    for k, members in enumerate(sets):
        for c in members:
            others = [m for m in members if m.kind != "head" or m.layer != c.layer]
            if c.kind == "head" and set_downstream(others, Component("attn", c.layer), arch.parallel_blocks):
                raise InputError(
                    f"knockout set {k}: on this '{arch.model_type}' model a norm after attention mixes every head "
                    f"of a layer, so attn.{c.layer}'s response to the other members cannot be separated from "
                    f"{c.name}'s own change; knock out attn.{c.layer} instead of its heads, or put {c.name} in a set "
                    "without earlier members"
                )
    return sets


def clean_run(
    model: nn.Module,
    arch: Architecture,
    ids: torch.Tensor,
    *,
    all_positions: bool,
    with_heads: bool,
    cache: CleanRunCache | None = None,
) -> CleanRun:
    """`run_clean` (or the same run from `cache`), with a clean pass that runs out of memory failing as
    BatchDoesNotFit (with the reason)."""
    if cache is not None:
        return cache.get(
            ids, all_positions, with_heads,
            lambda: clean_run(model, arch, ids, all_positions=all_positions, with_heads=with_heads),
        )
    try:
        return run_clean(model, arch, ids, all_positions=all_positions, with_heads=with_heads)
    except torch.OutOfMemoryError as error:
        release_cached_memory(ids.device)
        raise BatchDoesNotFit(
            f"the clean forward pass of a {int(ids.shape[0])}-token prompt ran out of memory on {ids.device}: {error}"
        ) from error


def job_sources(
    spec: SweepSpec, inputs: SweepInputs, clean_top: Callable[[int], int] | None = None
) -> list[list[int]]:
    """Each prompt's resample sources (empty lists for mean and zero ablation): with `source_seeds` S, the S draws
    (seeds seed, seed + 1, …) one after the other, so a source may appear in more than one draw.

    `resample_sources: "different_target"` needs every prompt's clean top token (`clean_top(i)`: a clean pass of
    each prompt of the job, which the clean-run cache keeps for the measuring)."""
    n_prompts = len(inputs.token_ids)
    if spec.ablation != "resample":
        return [[] for _ in range(n_prompts)]
    if spec.resample_sources == "different_target":
        if clean_top is None:
            raise InputError("resample_sources 'different_target' needs the prompts' clean top tokens")
        tops = [clean_top(i) for i in range(n_prompts)]
        targets = list(inputs.target_ids) if inputs.target_ids is not None else tops
        draws = [
            resample_sources_different_target(
                spec.resample_samples, spec.resample_from, spec.seed + j, targets, tops, inputs.resample_groups
            )
            for j in range(spec.source_seeds)
        ]
    else:
        draws = [
            resample_sources(
                n_prompts, spec.resample_samples, spec.resample_from, spec.seed + j, inputs.resample_groups
            )
            for j in range(spec.source_seeds)
        ]
    return [[s for draw in draws for s in draw[i]] for i in range(n_prompts)]


def complete_clean_runs(
    runs: dict[int, CleanRun],
    spec: SweepSpec,
    inputs: SweepInputs,
    measured: list[int],
    sources: list[list[int]],
    clean_prompt: Callable[[int], CleanRun],
    clean_reference: Callable[[torch.Tensor], CleanRun],
) -> MeanActivations | None:
    """Add to `runs` the clean runs the ablations need (measured prompts, their sources, every prompt for a mean
    over the job's own prompts); return the mean activations for mean ablation (None otherwise)."""
    n_prompts = len(inputs.token_ids)
    needed = set(measured) | {s for i in measured for s in sources[i]}
    if spec.ablation == "mean" and inputs.mean_reference_ids is None:
        needed = set(range(n_prompts))
    runs.update({i: clean_prompt(i) for i in sorted(needed - set(runs))})
    if spec.ablation != "mean":
        return None
    reference = [clean_reference(ids) for ids in inputs.mean_reference_ids] if inputs.mean_reference_ids else None
    return _mean_activations(reference or [runs[i] for i in range(n_prompts)])


def job_batch_tokens(
    model: nn.Module, arch: Architecture, runs: dict[int, CleanRun], batch_tokens: int | None, all_positions: bool
) -> int:
    """The batch budget: as given, or (None) from the device once the clean runs are resident."""
    if batch_tokens is not None:
        return batch_tokens
    parameter = next(model.parameters())
    longest = max(run.length for run in runs.values())
    return device_batch_tokens(arch, parameter.device, parameter.dtype, longest, all_positions)


def prompt_ablations(
    arch: Architecture,
    spec: SweepSpec,
    components: list[Component],
    run: CleanRun,
    runs: dict[int, CleanRun],
    sources: list[int],
    means: MeanActivations | None,
    sets: list[list[Component]] | None = None,
) -> list[AblatedRun]:
    """One prompt's ablated runs, component-major: each component once per resample source (once otherwise), then
    each knockout set the same way (every member replaced from the same source in one run)."""
    per_component: list[int | None] = [*sources] or [None]

    def ablated(c: Component, source: int | None) -> AblatedRun:
        return AblatedRun(c, _replacement(c, run, runs, source, means, arch, spec.ablation))

    singles = [ablated(c, source) for c in components for source in per_component]
    joint = [
        replace(ablated(members[0], source), also=tuple(ablated(c, source) for c in members[1:]))
        for members in sets or []
        for source in per_component
    ]
    return singles + joint


def _correct_only(candidates: list[int], runs: dict[int, CleanRun], target_ids: list[int] | None) -> list[int]:
    """The prompts whose clean top token is their target (the paper's prompt selection)."""
    if target_ids is None:
        raise InputError("only_correct needs a target (the answer's first token) per prompt")
    return [i for i in candidates if int(runs[i].logits_final.argmax()) == int(target_ids[i])]


def _prompt_groups(
    measured: list[int], runs: dict[int, CleanRun], rows_per_prompt: int, all_positions: bool, budget: BatchBudget
) -> list[list[int]]:
    """Consecutive prompts whose ablated runs fit one batch together (final position only; else one each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in measured:
        longest_with = max(longest, runs[i].length)
        fits = (len(current) + 1) * rows_per_prompt * longest_with <= budget.tokens
        if current and (all_positions or not fits):
            groups.append(current)
            current, longest_with = [], runs[i].length
        current.append(i)
        longest = longest_with
    if current:
        groups.append(current)
    return groups


def _mean_activations(runs: list[CleanRun]) -> MeanActivations:
    means = MeanActivations()
    for run in runs:
        means.add(run)
    return means


def _replacement(
    component: Component,
    run: CleanRun,
    runs: dict[int, CleanRun],
    source: int | None,
    means: MeanActivations | None,
    arch: Architecture,
    ablation: str,
) -> torch.Tensor:
    """The rows (P, e) that replace `component`'s clean rows in this prompt's ablated run."""
    own = component_rows(run, component, arch.head_dim)
    if ablation == "zero":
        return torch.zeros_like(own)
    if ablation == "mean":
        assert means is not None
        return means.as_clean_run_rows(component, arch.head_dim).expand_as(own)
    assert source is not None
    return align_to_length(component_rows(runs[source], component, arch.head_dim), own.shape[0])


def _to_residual(arch: Architecture, component: Component, v: torch.Tensor) -> torch.Tensor:
    """A replacement-space vector as what it writes into the residual stream (a head's slice times its W_O)."""
    if component.kind == "head":
        assert component.head is not None
        v = arch.head_weight(component.layer, component.head) @ v
    return v.float()


def _final_delta(arch: Architecture, run: CleanRun, ablation: AblatedRun) -> torch.Tensor:
    """Δ_c at the final position in residual-stream coordinates: clean output minus replacement. A knockout set's
    is the sum of its members' (a post-norm layer's member heads: their joint change, the norm is not linear)."""
    if ablation.also:
        return _set_change(arch, run, ablation.members(), zeroed=False)
    if ablation.component.kind == "head" and arch.post_norm:
        return _post_norm_head_change(arch, run, ablation.component, ablation.replacement[-1])
    clean_rows = component_rows(run, ablation.component, arch.head_dim)
    return _to_residual(arch, ablation.component, clean_rows[-1] - ablation.replacement[-1])


def _set_change(arch: Architecture, run: CleanRun, members: list[AblatedRun], zeroed: bool) -> torch.Tensor:
    """What a knockout set's members write at the final position less what they write ablated (`zeroed`: their
    clean writes, the Δ of zero-ablating them), in residual-stream coordinates, summed over members."""
    total = torch.zeros(arch.d_model, dtype=torch.float32, device=run.layer_out.device)
    post_norm_heads: dict[int, list[AblatedRun]] = {}
    for m in members:
        if m.component.kind == "head" and arch.post_norm:
            post_norm_heads.setdefault(m.component.layer, []).append(m)
        elif zeroed:
            total = total + _final_clean(arch, run, m.component)
        else:
            total = total + _final_delta(arch, run, m)
    for layer, heads in post_norm_heads.items():
        assert run.head_in is not None
        head_in = run.head_in[layer, -1:]  # (1, H·hd)
        ablated = head_in.clone()
        for m in heads:
            assert m.component.head is not None
            cols = slice(m.component.head * arch.head_dim, (m.component.head + 1) * arch.head_dim)
            ablated[:, cols] = 0 if zeroed else m.replacement[-1].to(ablated.dtype)
        written = arch.attn_post_norm(layer)(arch.out_proj(layer)(torch.cat([head_in, ablated])))
        total = total + (written[0].float() - written[1].float())
    return total


def _final_clean(arch: Architecture, run: CleanRun, component: Component) -> torch.Tensor:
    """The component's clean output at the final position, in residual-stream coordinates.

    A head of a post-norm block has no additive write of its own (the norm mixes every head), so its clean output is
    what the block writes less what it writes with that head's slice zeroed: the Δ of zero-ablating it, which is
    exactly its W_O slice times its output in a pre-norm block.
    """
    rows = component_rows(run, component, arch.head_dim)
    if component.kind == "head" and arch.post_norm:
        return _post_norm_head_change(arch, run, component, torch.zeros_like(rows[-1]))
    return _to_residual(arch, component, rows[-1])


def _post_norm_head_change(
    arch: Architecture, run: CleanRun, component: Component, replacement: torch.Tensor
) -> torch.Tensor:
    """A head's Δ in a post-norm block at the final position (Architecture.post_norm_head_change)."""
    assert run.head_in is not None and component.head is not None
    head_in = run.head_in[component.layer, -1:]
    return arch.post_norm_head_change(component.layer, component.head, head_in, replacement.unsqueeze(0))[0]


def _responds(ablation: AblatedRun, other: Component, parallel_blocks: bool) -> bool:
    """Whether `other` is in the ablated run's downstream set (a knockout set's: downstream of any member)."""
    if ablation.also:
        return set_downstream([m.component for m in ablation.members()], other, parallel_blocks)
    return is_downstream(ablation.component, other, parallel_blocks)


def _remove_member_heads(
    arch: Architecture,
    readout: Readout,
    outputs: AblatedOutputs,
    run: CleanRun,
    ablations: list[AblatedRun],
    basis: list[Component],
    u: torch.Tensor,
    s_clean: torch.Tensor,
    norm_scale: NormScaleMode,
    response: torch.Tensor,
) -> None:
    """A knockout set's member head is part of its layer's attention output: attn.L's response to the other members
    is its change less that head's own (replacement − clean, through its W_O slice). In place, (B, 2N).

    Pre-norm blocks only (knockout_sets refuses the post-norm case, where the heads' writes do not separate)."""
    s_ablated = readout.scale(outputs.x_final) if norm_scale == "ablated" else None
    slot = {c: k for k, c in enumerate(basis)}
    for b, a in enumerate(ablations):
        if not a.also:
            continue
        for m in a.members():
            if m.component.kind != "head":
                continue
            k = slot[Component("attn", m.component.layer)]
            clean_write = _final_clean(arch, run, m.component)
            replaced_write = _to_residual(arch, m.component, m.replacement[-1])
            if norm_scale == "clean":
                response[b, k] -= (replaced_write - clean_write) @ u / s_clean
            else:
                assert s_ablated is not None
                response[b, k] -= replaced_write @ u / s_ablated[b] - clean_write @ u / s_clean


def _responses(
    readout: Readout,
    outputs: AblatedOutputs,
    clean_out: torch.Tensor,
    u: torch.Tensor,
    s_clean: torch.Tensor,
    norm_scale: NormScaleMode,
) -> torch.Tensor:
    """(B, 2N): each layer component's direct effect in the ablated run minus in the clean run."""
    if norm_scale == "clean":
        return (outputs.layer_out_final - clean_out) @ u / s_clean
    s_ablated = readout.scale(outputs.x_final).unsqueeze(1)
    return outputs.layer_out_final @ u / s_ablated - (clean_out @ u / s_clean)


def _head_basis_responses(
    readout: Readout,
    outputs: AblatedOutputs,
    clean_writes: torch.Tensor,
    ablated_writes: torch.Tensor,
    s_clean: torch.Tensor,
    norm_scale: NormScaleMode,
) -> torch.Tensor:
    """(B, R): each head-basis entry's direct effect in the ablated run minus in the clean run, from its writes onto
    u (final_head_basis_writes: clean (R,), ablated (B, R))."""
    if norm_scale == "clean":
        return (ablated_writes - clean_writes) / s_clean
    s_ablated = readout.scale(outputs.x_final).unsqueeze(1)
    return ablated_writes / s_ablated - clean_writes / s_clean


def _measure(
    arch: Architecture,
    readout: Readout,
    run: CleanRun,
    ablations: list[AblatedRun],
    outputs: AblatedOutputs,
    basis: list[Component],
    target: int,
    counterfactual: int | None,
    samples: int,
    sources: list[int],
    norm_scale: NormScaleMode,
    keep_samples: bool = False,
    seeds: list[int] | None = None,
) -> PromptMeasures:
    """All measures of one prompt, averaged over the `samples` runs of each component; with several draw `seeds`
    (the runs of each component are their draws one after the other), each draw's own means too."""
    w, _ = readout.direction(target, counterfactual)
    u = readout.direct_map(w).float()
    x_clean = run.x_final.float().unsqueeze(0)
    s_clean = readout.scale(x_clean)[0]
    clean_metric = readout.value(x_clean, target, counterfactual)[0]

    ablated_metric = readout.value(outputs.x_final, target, counterfactual)  # (B,)
    total = clean_metric - ablated_metric
    deltas = torch.stack([_final_delta(arch, run, a) for a in ablations])
    direct = deltas @ u / s_clean
    if any(c.kind == "head" for c in basis):  # the head basis: every head's write, from W_O's input
        assert run.head_in is not None and outputs.head_in_final is not None
        clean_writes = final_head_basis_writes(arch, run.final_layer_out(), run.head_in[:, -1], u)  # (R,)
        ablated_writes = final_head_basis_writes(arch, outputs.layer_out_final, outputs.head_in_final, u)  # (B, R)
        clean_direct = clean_writes / s_clean
        # A member head of a knockout set is an entry of its own here: masked below, nothing to take out of attn.L.
        response = _head_basis_responses(readout, outputs, clean_writes, ablated_writes, s_clean, norm_scale)
    else:
        clean_out = run.final_layer_out().float()  # (2N, d)
        clean_direct = clean_out @ u / s_clean  # (2N,)
        response = _responses(readout, outputs, clean_out, u, s_clean, norm_scale)
        _remove_member_heads(arch, readout, outputs, run, ablations, basis, u, s_clean, norm_scale, response)
    downstream = torch.tensor(
        [[_responds(a, d, arch.parallel_blocks) for d in basis] for a in ablations],
        dtype=torch.bool,
        device=response.device,
    )
    response = torch.where(downstream, response, torch.zeros_like(response)).double()
    compensatory, norm_response = decompose(total, direct, response)
    unembed = read_direct(
        torch.stack(
            [_set_change(arch, run, a.members(), zeroed=True) if a.also else _final_clean(arch, run, a.component)
             for a in ablations]
        ),
        u,
        s_clean,
    )
    # Δ̃unembed(k, k): the ablated component's (or knocked-out set's) own write onto the target in its ablated run,
    # read with the clean scale. Its output there is the replacement, so this is Δunembed − DE per run exactly (a
    # head of a post-norm block too: what the block writes with the replacement less with the slice zeroed).
    ablated_unembed = unembed - direct

    def per_component(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, samples, *values.shape[1:]).mean(dim=1)

    compensatory_mean = per_component(compensatory).tolist()
    norm_mean = per_component(norm_response).tolist()
    capped_total = None
    if readout.softcap is not None:
        capped_clean = readout.capped_value(x_clean, target, counterfactual)[0]
        capped_total = per_component(capped_clean - readout.capped_value(outputs.x_final, target, counterfactual))
    top2 = torch.topk(run.logits_final, 2).values
    return PromptMeasures(
        target_id=target,
        clean_metric=float(clean_metric),
        top2_gap=float(top2[0] - top2[1]),
        total_effect=per_component(total).tolist(),
        direct_effect=per_component(direct).tolist(),
        # compensation = compensatory_effect + norm_response exactly (in float64), by construction.
        compensation=[ce + nr for ce, nr in zip(compensatory_mean, norm_mean, strict=True)],
        response=per_component(response).tolist(),
        norm_response=norm_mean,
        clean_direct_effect=clean_direct.tolist(),
        sources=list(sources),
        unembed_effect=per_component(unembed).tolist(),
        compensatory_effect=compensatory_mean,
        ablated_unembed_effect=per_component(ablated_unembed).tolist(),
        samples=_patch_samples(
            readout, outputs, u, s_clean, norm_scale, total, direct, ablated_unembed, sources, samples
        )
        if keep_samples
        else None,
        capped_total_effect=None if capped_total is None else capped_total.tolist(),
        draws=None
        if seeds is None or len(seeds) < 2
        else _draws(seeds, sources, basis, total, direct, response, compensatory, norm_response),
    )


def draw_seeds(spec: SweepSpec) -> list[int]:
    """The seed of each draw of resample sources."""
    return [spec.seed + j for j in range(spec.source_seeds)]


def _draws(
    seeds: list[int],
    sources: list[int],
    basis: list[Component],
    total: torch.Tensor,
    direct: torch.Tensor,
    response: torch.Tensor,
    compensatory: torch.Tensor,
    norm_response: torch.Tensor,
) -> list[DrawMeasures]:
    """Each draw's means over its own runs. Rows are component-major, then draw, then source within the draw."""
    n_draws = len(seeds)
    k = len(sources) // n_draws
    is_attn = torch.tensor([c.kind in ("attn", "head") for c in basis], device=response.device)

    def per_draw(values: torch.Tensor) -> list[list[float]]:  # (rows,) → [draw][component]
        return values.double().reshape(-1, n_draws, k).mean(dim=2).T.tolist()

    columns = [
        per_draw(v)
        for v in (total, direct, compensatory, response[:, is_attn].sum(dim=1), response[:, ~is_attn].sum(dim=1),
                  norm_response)
    ]
    return [
        DrawMeasures(
            seed=seed, sources=sources[j * k : (j + 1) * k], total_effect=columns[0][j], direct_effect=columns[1][j],
            compensatory_effect=columns[2][j], compensatory_effect_attn=columns[3][j],
            compensatory_effect_mlp=columns[4][j], norm_response=columns[5][j],
        )
        for j, seed in enumerate(seeds)
    ]


def _patch_samples(
    readout: Readout,
    outputs: AblatedOutputs,
    u: torch.Tensor,
    s_clean: torch.Tensor,
    norm_scale: NormScaleMode,
    total: torch.Tensor,
    direct: torch.Tensor,
    ablated_unembed: torch.Tensor,
    sources: list[int],
    samples: int,
) -> list[list[PatchSample]]:
    """Every ablated run's own TE, DE and profile, grouped by component (rows are component-major)."""
    scale = s_clean.expand(outputs.x_final.shape[0]) if norm_scale == "clean" else readout.scale(outputs.x_final)
    profile = ablated_profile(outputs.layer_out_final, u, scale).tolist()
    te, de, own = total.tolist(), direct.tolist(), ablated_unembed.tolist()
    patches = [
        PatchSample(source=sources[b % samples] if sources else None, total_effect=te[b], direct_effect=de[b],
                    profile=profile[b], ablated_unembed_effect=own[b])
        for b in range(len(te))
    ]
    return [patches[k : k + samples] for k in range(0, len(patches), samples)]
