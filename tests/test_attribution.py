"""Attribution patching (worker/engine/attribution.py) against independent computations on tiny random models.

Nothing here uses the engine's passes to check the engine: every reference runs the Hugging Face model itself with
hooks (tests/oracle.py's `run_model`, or tests/autograd_reference.py's), reads the metric off its logits, and
differentiates or differences it directly.

- Gradients: the AtP estimate with the patch Δ = n (zero ablation) is the directional derivative of the metric
  along the node's output; it is checked against a 4th-order central difference of the metric on a float64 copy of
  the model, for every family, both position scopes and several metrics (1e-3 of the prompt's gradient scale).
- Convergence: for a resample patch Δ = n − ñ, TE(εΔ)/ε (the exact effect of moving n by εΔ, from full float64
  forward passes) approaches the estimate as ε → 0, linearly in ε.
- The QK fix and GradDrop, against their definitions computed on the model directly: attention probabilities from
  the eager model's own `output_attentions`, their gradient by autograd, patched probabilities from a forward pass
  with the query or key projection hooked; GradDrop's gradients with each layer's writes detached by hooks.
- Hygiene: nothing is left on the model after a job (hooks, `.grad`, `requires_grad`, attention implementation,
  saved tensors of a graph), also when the job is cancelled.

The default run is a covering set (every family's gradients, each check on at least one family per scope);
`HYDRA_ATTRIBUTION_CHECKS=full` runs the whole matrix (every family × scope × node × metric listed; ~10 minutes on
2 cores).
"""

from __future__ import annotations

import copy
import gc
import os
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hydra_ablate_client.vocabulary import MetricName, PositionScope
from tests.autograd_reference import capture_writes
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import (
    Ablation,
    locate_parts,
    metric_from_logits,
    metric_logits,
    parse_component,
    replacement_space_output,
    resample_values,
    run_model,
)
from tests.tiny_models import TINY_ARCHS, load_tiny_model
from worker.engine.attribution import AttributionResult, run_attribution
from worker.engine.sweep import SweepCancelled, run_sweep
from worker.engine.types import SweepInputs, SweepSpec

NODES = ("attn.1", "mlp.0", "head.0.1", "head.2.3", "mlp.2")
GRADIENT_RTOL = 1e-3
FULL = os.environ.get("HYDRA_ATTRIBUTION_CHECKS") == "full"
SCOPES: tuple[PositionScope, ...] = ("final", "all")


def _cases(full: list[Any], covering: list[Any]) -> list[Any]:
    return full if FULL else covering


def _inputs(prompts: PromptSet, n: int = 2, counterfactuals: bool = False) -> SweepInputs:
    return SweepInputs(
        token_ids=prompts.token_ids[:n],
        counterfactual_ids=prompts.counterfactual_ids[:n] if counterfactuals else None,
    )


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy whose every computation stays in float64, for finite differences.

    Hugging Face's RMSNorms compute in float32 whatever their input's dtype (noise of ~1e-7 in every normed
    activation, amplified 1/h by a difference quotient); here a forward hook recomputes each RMSNorm's output in
    float64 from its input (gain `weight`, or `1 + weight` for the Gemma family). Eager attention (Gemma 2) takes its
    softmax in float32 too: the copy uses `_float64_eager` instead. MoE blocks' grouped matmul takes no float64: the
    copy uses the experts' eager loop.
    """
    m64: Any = copy.deepcopy(model).double()  # a PreTrainedModel: its config and blocks are walked untyped
    m64.config._experts_implementation = "eager"
    if m64.config._attn_implementation == "eager":
        m64.config._attn_implementation = FLOAT64_EAGER
    for module in m64.modules():
        name = type(module).__name__
        if "RMSNorm" not in name:
            continue
        offset = 1.0 if name.startswith("Gemma") else 0.0
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))

        def in_float64(mod: Any, args: tuple[Any, ...], _out: Any, offset: float = offset,
                       eps: float = eps) -> torch.Tensor:
            x = args[0]
            return (mod.weight + offset) * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps))

        module.register_forward_hook(in_float64)
    return m64


def _float64_eager(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None, **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention in the input's dtype throughout (grouped keys, scaling, logit soft-capping, additive mask)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = module.head_dim**-0.5 if scaling is None else scaling
    logits = query @ key.transpose(2, 3) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(logits, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


FLOAT64_EAGER = "hydra_test_float64_eager"
AttentionInterface.register(FLOAT64_EAGER, _float64_eager)
AttentionMaskInterface.register(FLOAT64_EAGER, eager_mask)


def _metric(m64: nn.Module, ids: torch.Tensor, ablation: Ablation | None, metric: MetricName, target: int,
            counterfactual: int | None) -> float:
    record = run_model(m64, locate_parts(m64), ids, ablation)
    return metric_from_logits(metric_logits(record, metric), metric, target, counterfactual)


def _positions(length: int, scope: PositionScope) -> list[int]:
    return [length - 1] if scope == "final" else list(range(length))


# --------------------------------------------------------------------------------------------------------------------
# Gradients against finite differences, every family
# --------------------------------------------------------------------------------------------------------------------

FD_METRICS: dict[str, tuple[MetricName, ...]] = {
    "llama": ("logit", "centered_logit", "logprob", "logit_diff"),
    "gemma2": ("logit", "logprob"),  # pre-cap logits, and the capped distribution
    "gpt2": ("logit", "centered_logit"),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradients_match_central_differences(
    arch: str, tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """Every family; the covering set takes one scope per family (alternating), one prompt and three nodes."""
    model = tiny_models(arch)
    m64 = float64_copy(model)
    parts = locate_parts(m64)
    h = 1e-2  # 4th-order stencil: truncation ~h⁴, float64 rounding ~1e-16/h
    nodes = NODES if FULL else ("attn.1", "mlp.0", "head.2.3")
    scopes = SCOPES if FULL else (SCOPES[TINY_ARCHS.index(arch) % 2],)
    for metric in FD_METRICS.get(arch, ("logit",)):
        inputs = _inputs(prompt_set, n=2 if FULL else 1, counterfactuals=metric == "logit_diff")
        for scope in scopes:
            spec = SweepSpec(components=nodes, ablation="zero", positions=scope, metric=metric)
            result = run_attribution(model, spec, inputs, estimates=("atp",))
            for prompt in result.prompts:
                ids = inputs.token_ids[prompt.index]
                cf = inputs.counterfactual_ids[prompt.index] if inputs.counterfactual_ids else None
                clean = run_model(m64, parts, ids)
                wanted = _positions(ids.shape[0], scope)
                differences = []
                for name in nodes:
                    comp = parse_component(name)
                    n = replacement_space_output(parts, clean, comp)

                    def m_at(t: float) -> float:
                        moved = Ablation(comp, {p: n[p] * (1 + t) for p in wanted})  # noqa: B023 (called at once)
                        return _metric(m64, ids, moved, metric, prompt.target_id, cf)  # noqa: B023

                    differences.append((-m_at(2 * h) + 8 * m_at(h) - 8 * m_at(-h) + m_at(-2 * h)) / (12 * h))
                scale = max(abs(d) for d in differences)
                for name, fd, atp in zip(nodes, differences, prompt.values["atp"], strict=True):
                    # Δ = n: the estimate is ∂m/∂n · n, the derivative of m(n + tn) at t = 0.
                    assert abs(atp - fd) <= GRADIENT_RTOL * max(abs(fd), 1e-2 * scale), (
                        arch, metric, scope, prompt.index, name, atp, fd
                    )


# --------------------------------------------------------------------------------------------------------------------
# Convergence to the exact effect as the patch shrinks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "scope"),
    _cases([(a, s) for a in ("llama", "gpt2", "gemma2", "gpt_neox_parallel") for s in SCOPES],
           [("llama", "final"), ("gemma2", "all")]),
)
def test_estimate_converges_to_exact_effect(
    arch: str, scope: PositionScope, tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """TE(εΔ)/ε → Î(Δ): the exact effect of the scaled resample patch, over ε, approaches the estimate, linearly."""
    model = tiny_models(arch)
    m64 = float64_copy(model)
    parts = locate_parts(m64)
    inputs = _inputs(prompt_set, n=3)
    spec = SweepSpec(components=NODES, ablation="resample", positions=scope, metric="centered_logit")
    measured = [0, 1, 2] if FULL else [2]  # prompt 2 has the most nonlinear response of these tiny models
    result = run_attribution(model, spec, inputs, estimates=("atp",))
    records = [run_model(m64, parts, ids) for ids in inputs.token_ids]
    for prompt in (p for p in result.prompts if p.index in measured):
        ids = inputs.token_ids[prompt.index]
        (source,) = prompt.sources
        m_clean = _metric(m64, ids, None, "centered_logit", prompt.target_id, None)
        scale = max(abs(v) for v in prompt.values["atp"])
        for name, atp in zip(NODES, prompt.values["atp"], strict=True):
            comp = parse_component(name)
            n = replacement_space_output(parts, records[prompt.index], comp)
            replacement = resample_values(replacement_space_output(parts, records[source], comp), ids.shape[0], scope)
            quotients = []
            for eps in (1e-2, 1e-3, 1e-4):
                moved = Ablation(comp, {p: n[p] - eps * (n[p] - r) for p, r in replacement.items()})
                te = m_clean - _metric(m64, ids, moved, "centered_logit", prompt.target_id, None)
                quotients.append(te / eps)
            errors = [abs(q - atp) for q in quotients]
            floor = 1e-5 * max(1.0, scale)  # the float32 estimate's own rounding
            # First order: the remainder TE(εΔ)/ε − Î shrinks as ε does, tenfold from ε = 1e-3 to 1e-4 (above the
            # rounding; a large ε can be outside the linear regime: these random models are far from linear) …
            assert errors[1] <= errors[0] + floor and errors[2] <= 0.2 * errors[1] + floor, (arch, scope, name, errors)
            # … and its limit, with the first-order remainder extrapolated away, is the estimate.
            limit = (10 * quotients[2] - quotients[1]) / 9
            assert abs(limit - atp) <= 1e-3 * max(abs(atp), 1e-2 * scale) + floor, (arch, scope, name, atp, limit)


# --------------------------------------------------------------------------------------------------------------------
# The QK fix and GradDrop against their definitions
# --------------------------------------------------------------------------------------------------------------------


def _direct_gradients(
    model: nn.Module, ids: torch.Tensor, target: int, dropped_layer: int | None, eager: bool
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """∂m/∂(every attn and mlp write and out-projection input) and ∂m/∂(attention probabilities) of one forward
    pass of the Hugging Face model (logit metric), with the writes of `dropped_layer` detached (GradDrop).

    Captured by hooks, differentiated by autograd; nothing of the engine is used."""
    captured, raw, handles = capture_writes(locate_parts(model), dropped_layer)
    try:
        with torch.enable_grad():
            out = model(input_ids=ids.view(1, -1), output_attentions=eager)
            metric = raw["logits"][0, -1, target]
            names = sorted(captured)
            tensors = [captured[n] for n in names]
            probs = list(out.attentions) if eager else []
            grads = torch.autograd.grad(metric, tensors + probs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    as_zero = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors + probs, grads, strict=True)]
    return dict(zip(names, as_zero[: len(names)], strict=True)), as_zero[len(names) :]


def _node_term(name: str, delta: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], head_dim: int,
               wanted: list[int]) -> float:
    """Σ over the ablated positions of Δ · ∂m/∂node for an attn / mlp / head node."""
    comp = parse_component(name)
    if comp.kind == "head":
        assert comp.head is not None
        cols = slice(comp.head * head_dim, (comp.head + 1) * head_dim)
        g = grads[f"z.{comp.layer}"][0][:, cols]
    else:
        g = grads[name][0]
    return float((delta[name][wanted].double() * g[wanted].double()).sum())


@pytest.mark.parametrize(
    ("arch", "scope"),
    _cases([(a, s) for a in ("llama", "gpt_neox_parallel", "olmo2", "gemma2") for s in SCOPES],
           [("llama", "final"), ("gpt_neox_parallel", "all"), ("olmo2", "all")]),
)
def test_graddrop_matches_its_definition(
    arch: str, scope: PositionScope, tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """AtP* = 1/(L − 1) Σ_ℓ |Δ · ∂m^(ℓ)/∂n|, with m^(ℓ) the model whose layer-ℓ writes are detached."""
    model = tiny_models(arch)
    parts = locate_parts(model)
    inputs = _inputs(prompt_set, n=2)
    spec = SweepSpec(components=NODES, ablation="zero", positions=scope, metric="logit")
    result = run_attribution(model, spec, inputs, estimates=("atp", "atp_star"))
    for prompt in result.prompts:
        ids = inputs.token_ids[prompt.index]
        wanted = _positions(ids.shape[0], scope)
        clean = run_model(model, parts, ids)
        delta = {name: replacement_space_output(parts, clean, parse_component(name)) for name in NODES}  # Δ = n
        dropped = [_direct_gradients(model, ids, prompt.target_id, layer, eager=False)[0]
                   for layer in range(parts.n_layers)]
        full = _direct_gradients(model, ids, prompt.target_id, None, eager=False)[0]
        for c, name in enumerate(NODES):
            atp = _node_term(name, delta, full, parts.head_dim, wanted)
            star = sum(abs(_node_term(name, delta, g, parts.head_dim, wanted)) for g in dropped) / (parts.n_layers - 1)
            assert prompt.values["atp"][c] == pytest.approx(atp, rel=1e-4, abs=1e-5), (arch, name)
            assert prompt.values["atp_star"][c] == pytest.approx(star, rel=1e-4, abs=1e-5), (arch, name)
            assert prompt.values["atp_qkfix"][c] == prompt.values["atp"][c]  # no query or key: nothing to fix


def _eager_copy(model_dir: Callable[[str], Any], arch: str) -> Any:
    """The same tiny model loaded with eager attention, whose forward returns its attention probabilities."""
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(model_dir(arch), dtype=torch.float32, attn_implementation="eager")
    return eager.eval()


def _qk_hook(module: nn.Module, cols: slice, wanted: list[int]) -> Any:
    """Zero the query (or key) projection's output columns `cols` at the wanted positions: the patched q or k."""

    def hook(_m: nn.Module, _a: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[0, wanted, cols] = 0.0
        return output

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("scope", ["final", "all"])
def test_qk_fix_matches_its_definition(
    scope: PositionScope, tiny_model_dir: Callable[[str], Any], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """For a head's query or key (zero-ablated), on Llama (grouped-query: 4 query heads, 2 key/value heads):

    QK fix   Σ (A − A′)_h · ∂m/∂A_h          A′: the model's own probabilities with the projection hooked
    AtP      Δ · ∂m/∂n, through the linearised softmax (the same gradient, read through the model's q and k)
    AtP*     1/(L − 1) Σ_ℓ |QK fix with ∂m^(ℓ)/∂A|

    Llama has no QK-norm and rotates queries and keys linearly, so zeroing the projection's output zeroes the
    post-rotary q or k: exactly the engine's node."""
    model = load_tiny_model(tiny_model_dir("llama"))
    eager = _eager_copy(tiny_model_dir, "llama")
    parts = locate_parts(eager)
    nodes = ("head.1.2.q", "head.2.1.k", "head.0.3.q", "head.1.0.k")
    inputs = _inputs(prompt_set, n=2)
    spec = SweepSpec(components=nodes, ablation="zero", positions=scope, metric="logit")
    result = run_attribution(model, spec, inputs, estimates=("atp", "atp_star"))
    kv_groups = eager.config.num_attention_heads // eager.config.num_key_value_heads
    hd = parts.head_dim
    for prompt in result.prompts:
        ids = inputs.token_ids[prompt.index]
        wanted = _positions(ids.shape[0], scope)
        with torch.no_grad():
            clean = eager(input_ids=ids.view(1, -1), output_attentions=True).attentions
        grads_full = _direct_gradients(eager, ids, prompt.target_id, None, eager=True)[1]
        grads_dropped = [_direct_gradients(eager, ids, prompt.target_id, layer, eager=True)[1]
                         for layer in range(parts.n_layers)]
        for c, name in enumerate(nodes):
            comp = parse_component(name.rsplit(".", 1)[0])
            site = name.rsplit(".", 1)[1]
            attn = eager.model.layers[comp.layer].self_attn
            assert comp.head is not None
            head = comp.head
            column = head if site == "q" else head // kv_groups  # the key/value head query head H reads
            projection = attn.q_proj if site == "q" else attn.k_proj
            handle = _qk_hook(projection, slice(column * hd, (column + 1) * hd), wanted)
            try:
                with torch.no_grad():
                    patched = eager(input_ids=ids.view(1, -1), output_attentions=True).attentions
            finally:
                handle.remove()
            change = (clean[comp.layer] - patched[comp.layer])[0, head].double()  # (T, T): head H's rows only

            def fixed(grads: list[torch.Tensor], change: torch.Tensor = change, layer: int = comp.layer,
                      head: int = head) -> float:
                return float((change * grads[layer][0, head].double()).sum())

            star = sum(abs(fixed(g)) for g in grads_dropped) / (parts.n_layers - 1)
            assert prompt.values["atp_qkfix"][c] == pytest.approx(fixed(grads_full), rel=1e-3, abs=1e-5), name
            assert prompt.values["atp_star"][c] == pytest.approx(star, rel=1e-3, abs=1e-5), name
            # Linear AtP: a first-order difference of the same probabilities, ε → 0 (A is smooth in q and k).
            eps = 1e-3
            handle = projection.register_forward_hook(_scale_hook(slice(column * hd, (column + 1) * hd), wanted, eps))
            try:
                with torch.no_grad():
                    nudged = eager(input_ids=ids.view(1, -1), output_attentions=True).attentions
            finally:
                handle.remove()
            linear = float(((clean[comp.layer] - nudged[comp.layer])[0, head].double() / eps
                            * grads_full[comp.layer][0, head].double()).sum())
            assert prompt.values["atp"][c] == pytest.approx(linear, rel=2e-2, abs=1e-4), name


def _scale_hook(cols: slice, wanted: list[int], eps: float) -> Any:
    """Move the projection's output columns toward zero by ε of themselves: the patch n → n − εn."""

    def hook(_m: nn.Module, _a: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[0, wanted, cols] *= 1.0 - eps
        return output

    return hook


# --------------------------------------------------------------------------------------------------------------------
# The estimates beside the exact engine
# --------------------------------------------------------------------------------------------------------------------


def test_estimates_sit_beside_the_exact_sweep(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """Same prompts, targets and sources as run_sweep; one value per ablated run; AtP within 3 model evaluations."""
    model = tiny_models("qwen2")
    components = ("attn.0", "mlp.1", "head.2.1", "head.0.0")
    inputs = SweepInputs(token_ids=prompt_set.token_ids, target_ids=prompt_set.target_ids)
    spec = SweepSpec(components=components, ablation="resample", resample_samples=2, resample_from="random", seed=3)
    exact = run_sweep(model, spec, inputs)
    estimates = run_attribution(model, spec, inputs)
    assert estimates.nodes == list(components)
    assert estimates.methods == ["atp", "atp_qkfix", "atp_star"]
    assert [p.index for p in estimates.prompts] == [p.index for p in exact.prompts]
    for e, x in zip(estimates.prompts, exact.prompts, strict=True):
        assert e.sources == x.sources and e.target_id == x.target_id
        assert e.clean_metric == pytest.approx(x.clean_metric, abs=1e-5)
        for method in estimates.methods:
            assert all(len(runs) == 2 for runs in e.per_run[method])
            assert e.values[method] == pytest.approx([sum(r) / 2 for r in e.per_run[method]], abs=1e-6)
        assert all(v >= 0 for v in e.values["atp_star"])  # a magnitude
    assert estimates.gradient_checks["metric_vs_clean"] < 1e-4  # the pass re-ran the clean computation
    assert estimates.cost["atp"].forward_passes == 3.0 and estimates.cost["atp"].backward_passes == 1.0
    # Two resample sources: the clean run, two noise runs and one backward pass: 2 evaluations per source.
    assert estimates.cost["atp"].model_evaluations / spec.resample_samples <= 3.0


def test_refusals_say_what_to_change(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    from worker.engine.errors import InputError

    model = tiny_models("llama")
    inputs = _inputs(prompt_set)
    with pytest.raises(InputError, match="choose from atp, atp_star"):
        run_attribution(model, SweepSpec(components=NODES), inputs, estimates=("atp", "ig"))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="measure_positions 'final'"):
        run_attribution(model, SweepSpec(components=NODES, positions="all", measure_positions="all"), inputs)
    with pytest.raises(InputError, match=r"head\.L\.H\.q or head\.L\.H\.k"):
        run_attribution(model, SweepSpec(components=("head.1.2.v",)), inputs)


def test_final_position_batches_agree_with_one_prompt_at_a_time(
    tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """Prompts of different lengths share a differentiable pass at the final position (left-padded prefixes)."""
    model = tiny_models("mistral")  # sliding window of 6 keys, shorter than the longest prompt
    spec = SweepSpec(components=(*NODES, "head.1.1.q", "head.2.0.k"), ablation="mean")
    inputs = SweepInputs(token_ids=prompt_set.token_ids)
    together = run_attribution(model, spec, inputs, batch_prompts=4)
    alone = run_attribution(model, spec, inputs, batch_prompts=1)
    for a, b in zip(together.prompts, alone.prompts, strict=True):
        for method in together.methods:
            assert a.values[method] == pytest.approx(b.values[method], rel=1e-4, abs=1e-5), method


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize("scope", SCOPES)
def test_replacements_are_the_exact_engines(
    ablation: str, scope: PositionScope, tiny_models: Callable[[str], nn.Module], prompt_set: PromptSet,  # noqa: F811
) -> None:
    """ñ for every component, built for all components at once, is what the exact engine writes (prompt_ablations);
    to float rounding: a shorter source's mean rows are reduced over a wider tensor here."""
    from worker.engine.architecture import describe
    from worker.engine.attribution import _mean_rows, _replacements
    from worker.engine.components import Component
    from worker.engine.sweep import clean_run, complete_clean_runs, job_sources, prompt_ablations

    model = tiny_models("qwen2")
    arch = describe(model)
    comps = [Component(k, layer) for layer in range(arch.n_layers) for k in ("attn", "mlp")]
    comps += [Component("head", layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]
    spec = SweepSpec(components=tuple(c.name for c in comps), ablation=ablation, positions=scope,  # type: ignore[arg-type]
                     resample_samples=2)
    inputs = SweepInputs(token_ids=prompt_set.token_ids, mean_reference_ids=prompt_set.mean_reference_ids)

    def clean(ids: torch.Tensor) -> Any:
        return clean_run(model, arch, ids, all_positions=scope == "all", with_heads=True)

    runs = {i: clean(ids) for i, ids in enumerate(inputs.token_ids)}
    sources = job_sources(spec, inputs)
    means = complete_clean_runs(runs, spec, inputs, list(runs), sources, lambda i: runs[i], clean)
    mean_rows = _mean_rows(arch, means, True) if means is not None else None
    for i, run in runs.items():
        rep = _replacements(ablation, run, runs, sources[i], mean_rows, None, None, None, True)
        assert rep.head_in is not None
        exact = prompt_ablations(arch, spec, comps, run, runs, sources[i], means)
        per_component = len(exact) // len(comps)
        for k, ablated in enumerate(exact):
            c, r = ablated.component, k % per_component
            if c.kind == "head":
                assert c.head is not None
                cols = slice(c.head * arch.head_dim, (c.head + 1) * arch.head_dim)
                mine = rep.head_in[r, c.layer, :, cols]
            else:
                mine = rep.layer_out[r, 2 * c.layer + (c.kind == "mlp")]
            assert torch.allclose(mine, ablated.replacement.to(mine.dtype), rtol=1e-6, atol=1e-7), (c.name, r)


# --------------------------------------------------------------------------------------------------------------------
# Nothing left attached to the model
# --------------------------------------------------------------------------------------------------------------------


def _hook_counts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    ]


class _Box:
    """A saved tensor of a graph; it lives exactly as long as the graph node that saved it (detached: keeping an op's
    own output with its grad_fn would tie the box to the node in a cycle gc cannot see)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t.detach()


class ModelState:
    """What a run may leave on a model: hooks, `.grad`, `requires_grad` (set to a mix here, to see each restored as
    it was), the attention implementation, and, for runs inside `tracking()`, saved tensors of a graph still alive."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = list(model.parameters())
        for k, p in enumerate(self.params):
            p.requires_grad_(k % 3 != 0)
        self.flags = [p.requires_grad for p in self.params]
        self.hooks = _hook_counts(model)
        self.implementation = model.config._attn_implementation  # type: ignore[union-attr]
        self.saved: weakref.WeakSet[Any] = weakref.WeakSet()
        # The check can fail: a graph kept alive keeps its saved tensors in the set.
        with self.tracking():
            kept = (torch.ones(3, requires_grad=True) * 2).exp()
        assert len(self.saved) > 0
        del kept
        gc.collect()
        assert len(self.saved) == 0

    def _pack(self, t: torch.Tensor) -> _Box:
        box = _Box(t)
        self.saved.add(box)
        return box

    @staticmethod
    def _unpack(box: _Box) -> torch.Tensor:
        return box.t

    def tracking(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def assert_unchanged(self) -> None:
        gc.collect()
        assert len(self.saved) == 0, f"{len(self.saved)} saved tensors of a graph outlived the job"
        assert all(p.grad is None for p in self.params)
        assert [p.requires_grad for p in self.params] == self.flags
        assert _hook_counts(self.model) == self.hooks
        assert self.model.config._attn_implementation == self.implementation  # type: ignore[union-attr]


def test_nothing_left_on_the_model(
    tiny_model_dir: Callable[[str], Any], prompt_set: PromptSet,  # noqa: F811
) -> None:
    model = load_tiny_model(tiny_model_dir("gemma2"))  # eager attention, soft-capping, post-norms
    state = ModelState(model)

    spec = SweepSpec(components=(*NODES, "head.1.2.q", "head.2.3.k"), ablation="resample", positions="all")
    with state.tracking():
        result = run_attribution(model, spec, _inputs(prompt_set, n=3))
    state.assert_unchanged()
    assert isinstance(result, AttributionResult) and result.prompts

    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1  # cancelled after the first batch

    with pytest.raises(SweepCancelled), state.tracking():
        run_attribution(model, spec, _inputs(prompt_set, n=3), should_stop=stop)
    state.assert_unchanged()
