"""The sweep measured at every position (docs/concepts/definitions.md, "Every position"): components ablated at every
position of each prompt, every measure read at every measured position with its own target and its own clean norm
scale, responses over the layer or the head basis.

Read top to bottom: clean runs and replacements as in worker/engine/sweep.py, ablated runs projected position by
position (worker/engine/position_ablated_runs.py), then the measures as tensors over a position axis.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.ablated_runs import AblatedRun
from worker.engine.architecture import Architecture, describe, head_basis_refusal
from worker.engine.clean import CleanRun, CleanRunCache
from worker.engine.components import (
    Component,
    head_basis_components,
    is_downstream,
    layer_components,
    model_component,
)
from worker.engine.errors import InputError
from worker.engine.head_basis import head_directions, head_writes
from worker.engine.memory import DEFAULT_BATCH_TOKENS
from worker.engine.position_ablated_runs import run_ablated_projected
from worker.engine.readout import Readout
from worker.engine.replacements import component_rows
from worker.engine.sweep import (
    ProgressCallback,
    StopCheck,
    SweepCancelled,
    clean_run,
    complete_clean_runs,
    job_batch_tokens,
    job_sources,
    prompt_ablations,
)
from worker.engine.types import PositionMeasures, PositionSweepResult, SweepInputs, SweepSpec


def check_position_spec(spec: SweepSpec, has_given_targets: bool) -> None:
    """Refuse combinations without a definition; ValueError with the reason."""
    if spec.positions != "all":
        raise ValueError(
            "measure_positions 'all' and target 'next_token' ablate at every position: use positions 'all'"
        )
    if spec.metric == "logit_diff":
        raise ValueError("metric logit_diff has one counterfactual per prompt, not per position: use another metric")
    if has_given_targets and (spec.measure_positions == "all" or spec.target == "next_token"):
        raise ValueError("given answers are one target per prompt: use them with measure_positions 'final' only")
    if spec.source_seeds != 1:
        raise ValueError("source_seeds serves the regressions across prompts at the final position: use 1 here")


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
    clean_cache: CleanRunCache | None = None,
) -> PositionSweepResult:
    """Every per-position measure for every prompt × component of `spec` (`batch_tokens=None`: from the device;
    `clean_cache`: clean runs kept from earlier sweeps on this model, as in run_sweep)."""
    arch = describe(model)
    check_position_spec(spec, inputs.target_ids is not None)
    if spec.knockouts:
        raise InputError(
            "knockouts are measured at the final position: drop the per-position options (measure_positions, "
            "target 'next_token') or the knockouts"
        )
    heads_basis = spec.response_basis == "heads"
    refusal = head_basis_refusal(model.config)
    if heads_basis and refusal is not None:
        raise ValueError(refusal)
    components = [model_component(name, arch.n_layers, arch.n_heads) for name in spec.components]
    basis = head_basis_components(arch.n_layers, arch.n_heads) if heads_basis else layer_components(arch.n_layers)
    n_prompts = len(inputs.token_ids)
    with_heads = heads_basis or any(c.kind == "head" for c in components)
    readout = Readout(arch, spec.metric)

    def clean(ids: torch.Tensor) -> CleanRun:
        return clean_run(model, arch, ids, all_positions=True, with_heads=with_heads, cache=clean_cache)

    sources = job_sources(spec, inputs)
    measured = list(range(n_prompts)) if inputs.measure_indices is None else list(inputs.measure_indices)
    runs: dict[int, CleanRun] = {}
    means = complete_clean_runs(
        runs, spec, inputs, measured, sources, lambda i: clean(model_tokens(inputs.token_ids[i], spec)), clean
    )
    batch_tokens = job_batch_tokens(model, arch, runs, batch_tokens, True)
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
        ablations = prompt_ablations(arch, spec, components, run, runs, sources[i], means)
        targets = _targets(arch, readout, run, spec, inputs, i)
        measures.append(
            _measure_prompt(arch, readout, run, ablations, targets, downstream, samples, sources[i], spec, batch_tokens)
        )
        done += len(ablations)
        if on_progress is not None:
            on_progress(done, total)
    return PositionSweepResult(
        components=[c.name for c in components], response_basis=[c.name for c in basis], prompts=measures
    )


def _clean_logits(arch: Architecture, readout: Readout, run: CleanRun) -> torch.Tensor:
    """(T, V) the model's clean output logits at every position (soft-capped where the model caps), float32."""
    assert run.x_all is not None
    return readout.capped(arch.unembed(arch.final_norm(run.x_all)).float())


def _targets(
    arch: Architecture, readout: Readout, run: CleanRun, spec: SweepSpec, inputs: SweepInputs, i: int
) -> torch.Tensor:
    """(T,) the target at every position the model read."""
    if spec.target == "next_token":
        return inputs.token_ids[i][1:].to(run.block_in.device)
    if inputs.target_ids is not None:  # measure_positions "final" only (check_position_spec)
        return torch.full((run.length,), int(inputs.target_ids[i]), dtype=torch.long, device=run.block_in.device)
    return _clean_logits(arch, readout, run).argmax(dim=-1)


def metric_at(
    arch: Architecture, readout: Readout, x: torch.Tensor, targets: torch.Tensor, capped: bool = False
) -> torch.Tensor:
    """The metric at every position of x (…, T, d), position p read at target[p]; float32.

    `logit` and `centered_logit` are read on the pre-cap logits (the linear readout the direct effects decompose),
    `logprob` on the model's own (soft-capped) distribution; `capped=True` reads every metric on the capped logits
    (docs/concepts/definitions.md, "Final-logit soft-capping").
    """
    normed = arch.final_norm(x.to(readout.gain.dtype))
    if readout.metric == "logprob" or (capped and readout.softcap is not None):
        logits = readout.capped(arch.unembed(normed).float())
        index = targets.expand(*logits.shape[:-1]).unsqueeze(-1)
        picked = logits.gather(-1, index).squeeze(-1)
        if readout.metric == "logprob":
            return picked - torch.logsumexp(logits, dim=-1)
        return picked - logits.mean(dim=-1) if readout.metric == "centered_logit" else picked
    w, b = readout.direction(targets, None)  # type: ignore[arg-type]  # one row per position
    return (normed.float() * w.float()).sum(dim=-1) + b.float()


def _residual_change(
    arch: Architecture, run: CleanRun, component: Component, replacement: torch.Tensor
) -> torch.Tensor:
    """(T, d): Δ_c at every position, the component's clean write minus its write with `replacement` (T, e).

    A head of a post-norm block: the attention output's change when only its slice is replaced at that position
    (Architecture.post_norm_head_change); otherwise the rows times the head's W_O slice (layer components: as is).
    """
    if component.kind == "head" and arch.post_norm:
        assert run.head_in is not None and component.head is not None
        return arch.post_norm_head_change(component.layer, component.head, run.head_in[component.layer], replacement)
    clean = component_rows(run, component, arch.head_dim)
    return _to_residual(arch, component, clean) - _to_residual(arch, component, replacement)


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
            heads = head_writes(arch, layer, run.head_in[layer], head_directions(arch, layer, u))
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
    top2 = torch.topk(_clean_logits(arch, readout, run), 2, dim=-1).values
    softcap = readout.softcap is not None
    capped_clean = metric_at(arch, readout, x_clean, targets, capped=True) if softcap else None

    rows_per_batch = max(1, batch_tokens // (2 * run.length))
    total, capped_total, direct, unembed, response = [], [], [], [], []
    for start in range(0, len(ablations), rows_per_batch):
        chunk = ablations[start : start + rows_per_batch]
        out = run_ablated_projected(arch, run, chunk, u, heads_basis)
        total.append(clean_metric - metric_at(arch, readout, out.x, targets))
        if capped_clean is not None:
            capped_total.append(capped_clean - metric_at(arch, readout, out.x, targets, capped=True))
        deltas = [_residual_change(arch, run, a.component, a.replacement) for a in chunk]
        direct.append(torch.stack([(delta * u).sum(dim=-1) for delta in deltas]) / s_clean)
        writes = [_residual_change(arch, run, a.component, torch.zeros_like(a.replacement)) for a in chunk]
        unembed.append(torch.stack([(write * u).sum(dim=-1) for write in writes]) / s_clean)
        if spec.norm_scale == "clean":
            response.append(out.change / s_clean)
        else:
            s_ablated = readout.scale(out.x).unsqueeze(1)  # (b, 1, T)
            response.append((clean_proj + out.change) / s_ablated - clean_proj / s_clean)
    mask = downstream.repeat_interleave(samples, dim=0).unsqueeze(-1).to(u.device)  # (C·k, R, 1)
    response_all = torch.where(mask, torch.cat(response), torch.zeros(()))
    total_all, direct_all, unembed_all = torch.cat(total), torch.cat(direct), torch.cat(unembed)
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
        unembed_effect=per_component(unembed_all).cpu(),
        # Δ̃unembed(k, k) at every position: the replacement's own write, Δunembed − DE exactly (as in sweep.py).
        ablated_unembed_effect=per_component(unembed_all - direct_all).cpu(),
        compensation=per_component(compensation).cpu(),
        response=per_component(response_all).cpu(),
        norm_response=per_component(norm_response).cpu(),
        clean_direct_effect=(clean_proj / s_clean).index_select(-1, keep).cpu(),
        sources=list(sources),
        capped_total_effect=per_component(torch.cat(capped_total)).cpu() if capped_total else None,
    )
