"""Attribution patching at every measured position (worker/engine/position_attribution.py) against references written
here on tiny random models, none of which uses the engine's passes:

- the estimate: (n − ñ) · ∂m_q/∂n summed over every ablated position, with ∂m_q/∂n taken by autograd on the Hugging
  Face model itself (hooks capture the writes, the metric is read off its own logits at position q), one backward
  pass per read-out position; ñ from tests/oracle.py (right-aligned sources, means over every position, zero);
- AtP*: the same with each layer's writes detached by hooks (GradDrop), 1/(L − 1) Σ_ℓ |·|;
- convergence: TE_q(εΔ)/ε, the exact effect at position q of moving the component by εΔ at every position (full
  float64 forward passes), approaches the estimate as ε → 0;
- beside the exact per-position sweep: the same positions, targets and sources, and the magnitudes it keeps;
- hygiene: nothing is left on the model, also when the job is cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hydra_ablate_client.vocabulary import AblationKind, MetricName
from tests.autograd_reference import capture_writes
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import (
    Ablation,
    locate_parts,
    mean_vector,
    parse_component,
    replacement_space_output,
    resample_values,
    run_model,
    run_model_positions,
)
from tests.test_attribution import float64_copy
from worker.engine.attribution import run_attribution
from worker.engine.errors import InputError
from worker.engine.position_attribution import (
    backward_passes_per_prompt,
    readout_positions,
    run_position_attribution,
)
from worker.engine.position_sweep import run_position_sweep
from worker.engine.sweep import SweepCancelled
from worker.engine.types import SweepInputs, SweepSpec

NODES = ("attn.1", "mlp.0", "head.0.1", "head.2.3", "mlp.2")
TOL = 1e-4  # of the prompt's largest estimate


def _spec(metric: MetricName, ablation: AblationKind, **options: Any) -> SweepSpec:
    fields: dict[str, Any] = {"measure_positions": "all", "target": "next_token", **options}
    return SweepSpec(components=NODES, ablation=ablation, positions="all", metric=metric, resample_from="random",
                     seed=1, **fields)


def _metric_rows(raw: torch.Tensor, capped: torch.Tensor, targets: list[int], metric: MetricName) -> torch.Tensor:
    """(T,) the metric at every position, position q read at targets[q], off the model's own logits (T, V)."""
    rows = torch.arange(len(targets))
    index = torch.tensor(targets)
    if metric == "logit":
        return raw[rows, index]
    if metric == "centered_logit":
        return raw[rows, index] - raw.mean(dim=-1)
    if metric == "logprob":
        return torch.log_softmax(capped, dim=-1)[rows, index]
    raise ValueError(metric)


def _gradients_per_readout(
    model: nn.Module, ids: torch.Tensor, targets: list[int], metric: MetricName, dropped_layer: int | None
) -> list[dict[str, torch.Tensor]]:
    """For every read-out position q: ∂m_q/∂(every attn and mlp write, every out-projection input), (T, ·) each, by
    autograd on one forward pass of the model, with the writes of `dropped_layer` detached (GradDrop)."""
    captured, raw, handles = capture_writes(locate_parts(model), dropped_layer)
    try:
        with torch.enable_grad():
            out = model(input_ids=ids.view(1, -1))
            metrics = _metric_rows(raw["logits"][0], out.logits[0], targets, metric)
            names = sorted(captured)
            tensors = [captured[n] for n in names]
            per_q = []
            for q in range(len(targets)):
                grads = torch.autograd.grad(metrics[q], tensors, retain_graph=True, allow_unused=True)
                per_q.append({n: (torch.zeros_like(t) if g is None else g)[0].detach()
                              for n, t, g in zip(names, tensors, grads, strict=True)})
    finally:
        for handle in handles:
            handle.remove()
    return per_q


def _term(name: str, delta: torch.Tensor, grads: dict[str, torch.Tensor], head_dim: int) -> float:
    """Σ over every position of Δ · ∂m_q/∂node."""
    comp = parse_component(name)
    if comp.kind == "head":
        assert comp.head is not None
        g = grads[f"z.{comp.layer}"][:, comp.head * head_dim : (comp.head + 1) * head_dim]
    else:
        g = grads[name]
    return float((delta.double() * g.double()).sum())


def _deltas(model: nn.Module, spec: SweepSpec, read: list[torch.Tensor], i: int, sources: list[int]
            ) -> dict[str, torch.Tensor]:
    """n − ñ at every position of prompt i (T, e) per node: ñ the source's outputs right-aligned, the mean over
    every position of every prompt, or zero (tests/oracle.py)."""
    parts = locate_parts(model)
    records = [run_model(model, parts, ids) for ids in read]
    length = read[i].shape[0]
    out = {}
    for name in NODES:
        comp = parse_component(name)
        n = replacement_space_output(parts, records[i], comp)
        if spec.ablation == "zero":
            out[name] = n
        elif spec.ablation == "mean":
            out[name] = n - mean_vector([replacement_space_output(parts, r, comp) for r in records], "all")
        else:
            (source,) = sources
            values = resample_values(replacement_space_output(parts, records[source], comp), length, "all")
            out[name] = n - torch.stack([values[p] for p in range(length)])
    return out


CASES: list[tuple[str, MetricName, AblationKind]] = [
    ("llama", "centered_logit", "resample"),
    ("gpt2", "logprob", "zero"),
    ("gemma2", "logprob", "resample"),  # soft-capped logits: the log-probability of the capped distribution
    ("olmo2", "logit", "mean"),  # post-norm blocks
]


@pytest.mark.parametrize(("arch", "metric", "ablation"), CASES)
def test_estimates_match_autograd_at_every_position(
    arch: str, metric: MetricName, ablation: AblationKind, tiny_models: Callable[[str], nn.Module],  # noqa: F811
    prompt_set: PromptSet,  # noqa: F811
) -> None:
    """atp[c, q] = Σ_p Δ_p · ∂m_q/∂n_p and atp_star[c, q] = 1/(L − 1) Σ_ℓ |the same with layer ℓ detached|, at every
    position q with its next token as target, against autograd on the model itself (1e-4 of the prompt's scale)."""
    model = tiny_models(arch)
    parts = locate_parts(model)
    # Prompts 0 and 2 measured; prompt 1, longer than both, is a source (right-aligned) and part of the mean.
    inputs = SweepInputs(token_ids=prompt_set.token_ids[:3], measure_indices=[0, 2])
    spec = _spec(metric, ablation)
    result = run_position_attribution(model, spec, inputs, estimates=("atp", "atp_star"))
    assert result.methods == ["atp", "atp_qkfix", "atp_star"] and result.nodes == list(NODES)
    assert result.gradient_checks["metric_vs_clean"] < 1e-4
    read = [ids[:-1] for ids in inputs.token_ids]
    assert [p.index for p in result.prompts] == [0, 2]
    for prompt in result.prompts:
        ids = read[prompt.index]
        targets = inputs.token_ids[prompt.index][1:].tolist()
        assert prompt.positions == list(range(len(ids))) and prompt.target_ids == targets
        delta = _deltas(model, spec, read, prompt.index, prompt.sources)
        full = _gradients_per_readout(model, ids, targets, metric, None)
        dropped = [_gradients_per_readout(model, ids, targets, metric, layer) for layer in range(parts.n_layers)]
        atp, star = prompt.values["atp"], prompt.values["atp_star"]
        assert atp.shape == (len(NODES), len(ids)) and torch.equal(prompt.values["atp_qkfix"], atp)
        scale = max(float(atp.abs().max()), 1e-3)
        for c, name in enumerate(NODES):
            for q in prompt.positions:
                want = _term(name, delta[name], full[q], parts.head_dim)
                assert abs(float(atp[c, q]) - want) <= TOL * scale, (arch, name, q, float(atp[c, q]), want)
                want_star = sum(abs(_term(name, delta[name], g[q], parts.head_dim)) for g in dropped)
                want_star /= parts.n_layers - 1
                assert abs(float(star[c, q]) - want_star) <= TOL * scale, (arch, name, q, float(star[c, q]), want_star)


def test_one_readout_position_is_the_final_position_estimate(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """A per-position job measured at its final position only (response_basis heads, clean top targets) estimates
    what the final-position engine estimates for ablation at every position: one backward pass each."""
    model = tiny_models("llama")
    inputs = SweepInputs(token_ids=prompt_set.token_ids)
    spec = SweepSpec(components=NODES, ablation="resample", positions="all", metric="logit", response_basis="heads")
    per_position = run_position_attribution(model, spec, inputs, estimates=("atp", "atp_star"))
    final = run_attribution(model, SweepSpec(components=NODES, ablation="resample", positions="all", metric="logit"),
                            inputs, estimates=("atp", "atp_star"))
    for mine, theirs in zip(per_position.prompts, final.prompts, strict=True):
        assert mine.positions == [inputs.token_ids[mine.index].shape[0] - 1] and mine.sources == theirs.sources
        for method in ("atp", "atp_star"):
            got = mine.values[method][:, 0].tolist()
            assert got == pytest.approx(theirs.values[method], rel=1e-5, abs=1e-6), method
    assert per_position.backward_passes == len(inputs.token_ids)
    assert per_position.cost["atp"].backward_passes == 1.0
    assert per_position.cost["atp"].forward_passes == final.cost["atp"].forward_passes == 2.0


def _logits_all(m64: nn.Module, parts: Any, ids: torch.Tensor, ablation: Ablation | None) -> torch.Tensor:
    """(T, V) the pre-cap logits at every position of one full forward pass (optionally ablated): the model's own
    final norm and unembedding applied to the residual stream it had at every position."""
    _, x = run_model_positions(m64, parts, ids, ablation)
    with torch.no_grad():
        return parts.lm_head(parts.final_norm(x.unsqueeze(0)))[0].double()


def test_estimate_converges_to_the_exact_effect_at_every_position(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """TE_q(εΔ)/ε → atp[c, q] as ε → 0: the patch Δ = n − ñ scaled at every position, read at every position."""
    model = tiny_models("llama")
    m64 = float64_copy(model)
    parts = locate_parts(m64)
    inputs = SweepInputs(token_ids=prompt_set.token_ids[:3])
    spec = _spec("centered_logit", "resample")
    result = run_position_attribution(model, spec, inputs, estimates=("atp",))
    read = [ids[:-1] for ids in inputs.token_ids]
    records = [run_model(m64, parts, ids) for ids in read]
    prompt = next(p for p in result.prompts if p.index == 1)  # the longest of the three
    ids = read[1]
    targets = inputs.token_ids[1][1:].tolist()
    clean = _metric_rows(_logits_all(m64, parts, ids, None), torch.zeros(0), targets, "centered_logit")
    (source,) = prompt.sources
    atp = prompt.values["atp"].double()
    scale = float(atp.abs().max())
    floor = 1e-5 * max(1.0, scale)  # the float32 estimate's own rounding
    for c, name in enumerate(NODES):
        comp = parse_component(name)
        n = replacement_space_output(parts, records[1], comp)
        replacement = resample_values(replacement_space_output(parts, records[source], comp), ids.shape[0], "all")
        quotients = []
        for eps in (1e-2, 1e-3, 1e-4):
            moved = Ablation(comp, {p: n[p] - eps * (n[p] - r) for p, r in replacement.items()})
            ablated = _metric_rows(_logits_all(m64, parts, ids, moved), torch.zeros(0), targets, "centered_logit")
            quotients.append((clean - ablated) / eps)  # (T,)
        errors = [(q - atp[c]).abs() for q in quotients]
        assert bool((errors[2] <= 0.2 * errors[1] + floor).all()), (name, errors)
        limit = (10 * quotients[2] - quotients[1]) / 9  # the first-order remainder extrapolated away
        assert bool(((limit - atp[c]).abs() <= 1e-3 * atp[c].abs().clamp(min=1e-2 * scale) + floor).all()), (
            name, limit, atp[c]
        )


def test_estimates_sit_beside_the_exact_per_position_sweep(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """Same positions, targets and sources as run_position_sweep; its kept magnitudes are the mean over the runs of
    |TE|; the cost counts one backward pass per measured position over its prefix."""
    model = tiny_models("gpt2")
    inputs = SweepInputs(token_ids=prompt_set.token_ids)
    spec = _spec("centered_logit", "resample", resample_samples=2, response_basis="heads")
    sweep = run_position_sweep(model, spec, inputs)
    estimates = run_position_attribution(model, spec, inputs, estimates=("atp",))
    assert estimates.nodes == sweep.components
    for exact, mine in zip(sweep.prompts, estimates.prompts, strict=True):
        assert mine.positions == exact.positions and mine.target_ids == exact.target_ids.tolist()
        assert mine.sources == exact.sources and len(mine.sources) == 2
        assert mine.per_run["atp"].shape == (len(NODES), 2, len(mine.positions))
        assert torch.allclose(mine.values["atp"], mine.per_run["atp"].mean(dim=1))
        assert exact.abs_total_effect is not None
        assert bool((exact.abs_total_effect >= exact.total_effect.abs() - 1e-6).all())
    lengths = [ids.shape[0] - 1 for ids in inputs.token_ids]
    backward = sum(backward_passes_per_prompt(t, spec, 3, False) for t in lengths) / len(lengths)
    assert estimates.cost["atp"].backward_passes == pytest.approx(backward)
    assert backward == pytest.approx(sum((t + 1) / 2 for t in lengths) / len(lengths))
    assert estimates.backward_passes == sum(lengths)
    assert readout_positions(5, spec) == [0, 1, 2, 3, 4]


def test_one_run_magnitudes_are_the_absolute_total_effect(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    inputs = SweepInputs(token_ids=prompt_set.token_ids)
    sweep = run_position_sweep(tiny_models("llama"), _spec("logit", "zero"), inputs)
    for p in sweep.prompts:
        assert p.abs_total_effect is not None and torch.equal(p.abs_total_effect, p.total_effect.abs())


def test_refusals_say_what_to_change(tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet) -> None:  # noqa: F811
    model = tiny_models("llama")
    inputs = SweepInputs(token_ids=prompt_set.token_ids[:2])
    with pytest.raises(InputError, match=r"attn\.L, mlp\.L and head\.L\.H"):
        run_position_attribution(model, SweepSpec(components=("head.0.1.q",), positions="all",
                                                  measure_positions="all"), inputs)
    with pytest.raises(InputError, match="knockout"):
        run_position_attribution(model, SweepSpec(components=("mlp.0",), positions="all", measure_positions="all",
                                                  knockouts=(("mlp.0", "attn.1"),)), inputs)
    with pytest.raises(ValueError, match="use positions 'all'"):
        run_position_attribution(model, SweepSpec(components=("mlp.0",), measure_positions="all"), inputs)
    with pytest.raises(InputError, match="choose from"):
        run_position_attribution(model, _spec("logit", "zero"), inputs, estimates=())


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def test_nothing_left_on_the_model(tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet) -> None:  # noqa: F811
    """No hook, no `.grad`, every `requires_grad` and the attention implementation as they were: after a job and
    after a job cancelled between prompts."""
    model = tiny_models("gemma2")
    config: Any = model.config
    flags = [p.requires_grad for p in model.parameters()]
    hooks, attention = _hooks(model), config._attn_implementation
    inputs = SweepInputs(token_ids=prompt_set.token_ids[:3], measure_indices=[0, 2])
    run_position_attribution(model, _spec("logprob", "resample"), inputs)
    calls = iter([False, True])
    with pytest.raises(SweepCancelled):
        run_position_attribution(model, _spec("logit", "zero"), inputs, should_stop=lambda: next(calls))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == hooks and config._attn_implementation == attention
