"""The sweep measured at every position (docs/definitions.md, "Every position"): components ablated at every
position of each prompt, every measure read at every measured position with its own target and its own clean norm
scale, responses over the layer or the head basis.

Read top to bottom: clean runs and replacements as in worker/engine/sweep.py, ablated runs projected position by
position (worker/engine/position_fast.py), then the measures as tensors over a position axis.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.architecture import Architecture, describe
from worker.engine.clean import CleanRun, run_clean
from worker.engine.components import (
    Component,
    head_basis_components,
    is_downstream,
    layer_components,
    parse_component,
)
from worker.engine.fast import AblatedRun
from worker.engine.memory import DEFAULT_BATCH_TOKENS, device_batch_tokens
from worker.engine.position_fast import head_directions, project_heads, run_ablated_projected
from worker.engine.readout import Readout
from worker.engine.replacements import component_rows, resample_sources
from worker.engine.sweep import (
    NO_SOURCE,
    ProgressCallback,
    StopCheck,
    SweepCancelled,
    _mean_activations,
    _replacement,
)
from worker.engine.types import PositionMeasures, PositionSweepResult, SweepInputs, SweepSpec


def uses_position_engine(spec: SweepSpec) -> bool:
    """Whether a spec needs this engine (any per-position option away from the final-position defaults)."""
    return spec.measure_positions == "all" or spec.target == "next_token" or spec.response_basis == "heads"


def check_position_spec(spec: SweepSpec, has_given_targets: bool) -> None:
    """Refuse combinations without a definition; ValueError with the reason."""
    if spec.positions != "all":
        raise ValueError(
            "measure_positions 'all', target 'next_token' and response_basis 'heads' ablate at every position: "
            "use positions 'all'"
        )
    if spec.metric == "logit_diff":
        raise ValueError("metric logit_diff has one counterfactual per prompt, not per position: use another metric")
    if has_given_targets and (spec.measure_positions == "all" or spec.target == "next_token"):
        raise ValueError("given answers are one target per prompt: use them with measure_positions 'final' only")


def model_tokens(ids: torch.Tensor, spec: SweepSpec) -> torch.Tensor:
    """What the model reads: with target next_token the last token is only a target, so the model reads the rest."""
    if spec.target != "next_token":
        return ids
    if ids.shape[0] < 2:
        raise ValueError("target next_token needs texts of at least 2 tokens")
    return ids[:-1]


@torch.no_grad()
def run_position_sweep(
    model: nn.Module,
    spec: SweepSpec,
    inputs: SweepInputs,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
) -> PositionSweepResult:
    """Every per-position measure for every prompt × component of `spec` (`batch_tokens=None`: from the device)."""
    arch = describe(model)
    check_position_spec(spec, inputs.target_ids is not None)
    if arch.post_norm or arch.final_logit_softcap is not None:
        raise ValueError(
            f"per-position measures are not yet defined for '{arch.model_type}' (post-norm blocks or soft-capped "
            "logits): use measure_positions 'final' with the layer response basis"
        )
    components = [parse_component(name, arch.n_layers, arch.n_heads) for name in spec.components]
    heads_basis = spec.response_basis == "heads"
    basis = head_basis_components(arch.n_layers, arch.n_heads) if heads_basis else layer_components(arch.n_layers)
    n_prompts = len(inputs.token_ids)
    with_heads = heads_basis or any(c.kind == "head" for c in components)
    readout = Readout(arch, spec.metric)

    def clean(ids: torch.Tensor) -> CleanRun:
        return run_clean(model, arch, ids, all_positions=True, with_heads=with_heads)

    sources = (
        resample_sources(n_prompts, spec.resample_samples, spec.resample_from, spec.seed)
        if spec.ablation == "resample"
        else [[] for _ in range(n_prompts)]
    )
    measured = list(range(n_prompts)) if inputs.measure_indices is None else list(inputs.measure_indices)
    needed = set(measured) | {s for i in measured for s in sources[i]}
    if spec.ablation == "mean" and inputs.mean_reference_ids is None:
        needed = set(range(n_prompts))
    runs = {i: clean(model_tokens(inputs.token_ids[i], spec)) for i in sorted(needed)}
    means = None
    if spec.ablation == "mean":
        reference = [clean(ids) for ids in inputs.mean_reference_ids] if inputs.mean_reference_ids else None
        means = _mean_activations(reference or [runs[i] for i in range(n_prompts)])

    if batch_tokens is None:
        parameter = next(model.parameters())
        longest = max(run.length for run in runs.values())
        batch_tokens = device_batch_tokens(arch, parameter.device, parameter.dtype, longest, True)
    samples = len(sources[0]) if spec.ablation == "resample" else 1
    total = len(measured) * len(components) * samples
    done = 0
    downstream = torch.tensor(
        [[is_downstream(c, d, arch.parallel_blocks) for d in basis] for c in components], dtype=torch.bool
    )
    measures: list[PositionMeasures] = []
    for i in measured:
        if should_stop is not None and should_stop():
            raise SweepCancelled("sweep cancelled")
        run = runs[i]
        ablations = [
            AblatedRun(c, _replacement(c, run, runs, source, means, arch, spec.ablation))
            for c in components
            for source in (sources[i] or NO_SOURCE)
        ]
        targets = _targets(arch, run, spec, inputs, i)
        measures.append(
            _measure_prompt(arch, readout, run, ablations, targets, downstream, samples, sources[i], spec, batch_tokens)
        )
        done += len(ablations)
        if on_progress is not None:
            on_progress(done, total)
    return PositionSweepResult(
        components=[c.name for c in components], response_basis=[c.name for c in basis], prompts=measures
    )


def _clean_logits(arch: Architecture, run: CleanRun) -> torch.Tensor:
    """(T, V) clean logits at every position, float32."""
    assert run.x_all is not None
    return arch.unembed(arch.final_norm(run.x_all)).float()


def _targets(arch: Architecture, run: CleanRun, spec: SweepSpec, inputs: SweepInputs, i: int) -> torch.Tensor:
    """(T,) the target at every position the model read."""
    if spec.target == "next_token":
        return inputs.token_ids[i][1:].to(run.block_in.device)
    if inputs.target_ids is not None:  # measure_positions "final" only (check_position_spec)
        return torch.full((run.length,), int(inputs.target_ids[i]), dtype=torch.long, device=run.block_in.device)
    return _clean_logits(arch, run).argmax(dim=-1)


def metric_at(arch: Architecture, readout: Readout, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The metric at every position of x (…, T, d), position p read at target[p]; float32."""
    normed = arch.final_norm(x.to(readout.gain.dtype))
    if readout.metric == "logprob":
        logprobs = torch.log_softmax(arch.unembed(normed).float(), dim=-1)
        index = targets.expand(*logprobs.shape[:-1]).unsqueeze(-1)
        return logprobs.gather(-1, index).squeeze(-1)
    w, b = readout.direction(targets, None)  # type: ignore[arg-type]  # one row per position
    return (normed.float() * w.float()).sum(dim=-1) + b.float()


def _to_residual(arch: Architecture, component: Component, rows: torch.Tensor) -> torch.Tensor:
    """Rows in the replaced space (P, e) as what they write into the residual stream (P, d), float32."""
    if component.kind == "head":
        assert component.head is not None
        return rows.float() @ arch.head_weight(component.layer, component.head).float().T
    return rows.float()


def _clean_projections(arch: Architecture, run: CleanRun, u: torch.Tensor, heads_basis: bool) -> torch.Tensor:
    """(R, T): every basis entry's clean output · u_p."""
    per_layer = []
    for layer in range(arch.n_layers):
        mlp = (run.layer_out[2 * layer + 1].float() * u).sum(dim=-1).unsqueeze(0)
        if heads_basis:
            assert run.head_in is not None
            heads = project_heads(arch, run.head_in[layer], head_directions(arch, layer, u))
            per_layer.append(torch.cat([heads, mlp]))
        else:
            per_layer.append(torch.cat([(run.layer_out[2 * layer].float() * u).sum(dim=-1).unsqueeze(0), mlp]))
    return torch.cat(per_layer)


def _measure_prompt(
    arch: Architecture,
    readout: Readout,
    run: CleanRun,
    ablations: list[AblatedRun],
    targets: torch.Tensor,
    downstream: torch.Tensor,
    samples: int,
    sources: list[int],
    spec: SweepSpec,
    batch_tokens: int,
) -> PositionMeasures:
    """All measures of one prompt at every position, averaged over the `samples` runs of each component."""
    assert run.x_all is not None
    heads_basis = spec.response_basis == "heads"
    w, _ = readout.direction(targets, None)  # type: ignore[arg-type]
    u = readout.direct_map(w).float()  # (T, d)
    x_clean = run.x_all.float()
    s_clean = readout.scale(x_clean)  # (T,)
    clean_metric = metric_at(arch, readout, x_clean, targets)  # (T,)
    clean_proj = _clean_projections(arch, run, u, heads_basis)  # (R, T)
    top2 = torch.topk(_clean_logits(arch, run), 2, dim=-1).values

    rows_per_batch = max(1, batch_tokens // (2 * run.length))
    total, direct, unembed, response = [], [], [], []
    for start in range(0, len(ablations), rows_per_batch):
        chunk = ablations[start : start + rows_per_batch]
        out = run_ablated_projected(arch, run, chunk, u, heads_basis)
        total.append(clean_metric - metric_at(arch, readout, out.x, targets))
        clean_rows = [_to_residual(arch, a.component, component_rows(run, a.component, arch.head_dim)) for a in chunk]
        replaced = [_to_residual(arch, a.component, a.replacement) for a in chunk]
        pairs = zip(clean_rows, replaced, strict=True)
        direct.append(torch.stack([((c - r) * u).sum(dim=-1) for c, r in pairs]) / s_clean)
        unembed.append(torch.stack([(c * u).sum(dim=-1) for c in clean_rows]) / s_clean)
        if spec.norm_scale == "clean":
            response.append(out.change / s_clean)
        else:
            s_ablated = readout.scale(out.x).unsqueeze(1)  # (b, 1, T)
            response.append((clean_proj + out.change) / s_ablated - clean_proj / s_clean)
    mask = downstream.repeat_interleave(samples, dim=0).unsqueeze(-1).to(u.device)  # (C·k, R, 1)
    response_all = torch.where(mask, torch.cat(response), torch.zeros(()))
    total_all, direct_all = torch.cat(total), torch.cat(direct)
    compensation = direct_all - total_all
    norm_response = compensation - response_all.sum(dim=1)

    positions = list(range(run.length)) if spec.measure_positions == "all" else [run.length - 1]
    keep = torch.tensor(positions, device=u.device)

    def per_component(values: torch.Tensor) -> torch.Tensor:
        picked = values.index_select(-1, keep)
        return picked.reshape(-1, samples, *picked.shape[1:]).mean(dim=1)

    return PositionMeasures(
        positions=positions,
        target_ids=targets.index_select(0, keep).cpu(),
        clean_metric=clean_metric.index_select(0, keep).cpu(),
        top2_gap=(top2[:, 0] - top2[:, 1]).index_select(0, keep).cpu(),
        total_effect=per_component(total_all).cpu(),
        direct_effect=per_component(direct_all).cpu(),
        unembed_effect=per_component(torch.cat(unembed)).cpu(),
        compensation=per_component(compensation).cpu(),
        response=per_component(response_all).cpu(),
        norm_response=per_component(norm_response).cpu(),
        clean_direct_effect=(clean_proj / s_clean).index_select(-1, keep).cpu(),
        sources=list(sources),
    )
