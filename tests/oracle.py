"""Brute-force reference implementation of every measure in docs/concepts/definitions.md.

This module is the independent check on the engine (worker/engine/): it shares no code with it. It is written to be
obviously right, not fast:

* every prompt is run on its own (batch of one, no padding);
* every ablation is one full forward pass of the Hugging Face model, with the component's output replaced by a
  forward hook (attn / mlp) or by a forward pre-hook on the output projection (heads: the head's slice of the
  projection's input is replaced, which replaces the head's contribution exactly, since it is linear in that slice);
* the metric is computed from the model's real full-vocabulary logits of each ablated run;
* DE, responses and the clean direct effects are computed from the captured component outputs at the final position,
  with the final norm's gain / bias / epsilon read from the model's own module, the norm's scale recomputed by hand;
* all arithmetic after the forward passes is done in float64.

Entry point: `oracle_sweep(model, spec, inputs, sources=None) -> SweepResult`. For `resample_from: "random"` the
engine's pairing must be passed as `sources` (one list per prompt), since the oracle cannot reproduce a random draw.

Module layout by `config.model_type` (checked against transformers 5.24's modelling code: every attention module
returns `(attn_output, attn_weights)`, every MLP returns a tensor):

- llama, qwen2, mistral: blocks model.model.layers[i]; attention .self_attn; head projection .self_attn.o_proj
  (Linear); final norm model.model.norm (RMSNorm).
- gpt2: blocks model.transformer.h[i]; attention .attn; head projection .attn.c_proj (Conv1D, weight is in × out);
  final norm model.transformer.ln_f (LayerNorm).
- gpt_neox: blocks model.gpt_neox.layers[i]; attention .attention; head projection .attention.dense (Linear);
  final norm model.gpt_neox.final_layer_norm (LayerNorm); parallel blocks iff config.use_parallel_residual.
- mixtral, qwen2_moe, qwen3, qwen3_moe, phi3: laid out like llama (the MoE block is .mlp; QK-norm is inside
  .self_attn; phi3's o_proj is a plain Linear).
- gemma: like llama, but every RMSNorm multiplies by (1 + weight).
- gemma2, gemma3_text: sandwich blocks; what attention writes into the residual stream is the output of
  .post_attention_layernorm, what the MLP writes is the output of .post_feedforward_layernorm: those modules are
  hooked (captured and replaced). RMSNorm gain (1 + weight). gemma2 soft-caps its final logits.
- olmo2: post-norm blocks; hooked modules .post_attention_layernorm and .post_feedforward_layernorm.
- gptj: blocks model.transformer.h[i]; attention .attn, head projection .attn.out_proj (Linear); final norm
  model.transformer.ln_f (LayerNorm); attention and MLP both read ln_1 of the block input (parallel).

In post-norm blocks a head's write is not linear in its slice, so the oracle takes a head's Δ from the two runs
themselves: the attention block's output at the final position in the clean run minus in the ablated run (only the
head changed there). With final-logit soft-capping the metric is read on the pre-cap logits (the lm_head's output,
captured by a hook), except `logprob`, read on the model's (capped) output; `capped_total_effect` is TE read on the
model's output logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from worker.engine.types import PatchSample, PromptMeasures, SweepInputs, SweepResult, SweepSpec

# --------------------------------------------------------------------------------------------------------------------
# Locating the model's modules
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelParts:
    model_type: str
    n_layers: int
    n_heads: int
    head_dim: int
    parallel: bool  # GPT-NeoX use_parallel_residual: attention and MLP both read the block's input
    attn: list[nn.Module]  # its output (or output[0]) is what attention writes into the residual stream
    mlp: list[nn.Module]  # its output is what the MLP writes into the residual stream
    out_proj: list[nn.Module]  # its input is the concatenation of the query heads' outputs
    out_proj_is_conv1d: bool  # GPT-2's Conv1D: y = x @ W + b with W of shape (in, out)
    final_norm: nn.Module
    norm_is_layernorm: bool
    norm_eps: float
    unembed: torch.Tensor  # (vocab, d_model)
    unembed_bias: torch.Tensor | None
    gain_offset: float = 0.0  # Gemma's RMSNorm: gain = 1 + weight
    post_norm: bool = False  # attention's write is a norm's output (heads' deltas come from the runs)
    softcap: float | None = None  # final-logit soft-capping
    lm_head: nn.Module | None = None  # its output is the pre-cap logits


def _norm_eps(norm: Any) -> float:
    """RMSNorm's variance_epsilon, else the norm's eps."""
    eps: Any = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps)


def _target_ids(inputs: SweepInputs) -> list[int]:
    """The given answer tokens (only_correct selects on them: a job with only_correct names its targets)."""
    assert inputs.target_ids is not None, "only_correct needs target_ids"
    return inputs.target_ids


def _weight(module: nn.Module) -> torch.Tensor:
    """A module's `weight` parameter (torch types module attributes `Tensor | Module`)."""
    return cast(torch.Tensor, module.weight)


def _head(comp: Component) -> int:
    assert comp.head is not None, "a head component names its head"
    return comp.head


# `model` is a Hugging Face PreTrainedModel: where its parts live differs per family, and torch types every module
# attribute `Tensor | Module`, so it is walked untyped.
def locate_parts(model: Any) -> ModelParts:
    config = model.config
    model_type = config.model_type
    gain_offset = 0.0
    post_norm = False
    if model_type in ("llama", "qwen2", "mistral", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma"):
        blocks = list(model.model.layers)
        attn = [b.self_attn for b in blocks]
        mlp = [b.mlp for b in blocks]
        out_proj = [b.self_attn.o_proj for b in blocks]
        conv1d = False
        final_norm = model.model.norm
        is_ln = False
        eps = _norm_eps(final_norm)
        parallel = False
        gain_offset = 1.0 if model_type == "gemma" else 0.0
    elif model_type in ("gemma2", "gemma3_text", "olmo2"):
        blocks = list(model.model.layers)
        attn = [b.post_attention_layernorm for b in blocks]
        mlp = [b.post_feedforward_layernorm for b in blocks]
        out_proj = [b.self_attn.o_proj for b in blocks]
        conv1d = False
        final_norm = model.model.norm
        is_ln = False
        eps = _norm_eps(final_norm)
        parallel = False
        gain_offset = 0.0 if model_type == "olmo2" else 1.0
        post_norm = True
    elif model_type == "gptj":
        blocks = list(model.transformer.h)
        attn = [b.attn for b in blocks]
        mlp = [b.mlp for b in blocks]
        out_proj = [b.attn.out_proj for b in blocks]
        conv1d = False
        final_norm = model.transformer.ln_f
        is_ln = True
        eps = float(final_norm.eps)
        parallel = True
    elif model_type == "gpt2":
        blocks = list(model.transformer.h)
        attn = [b.attn for b in blocks]
        mlp = [b.mlp for b in blocks]
        out_proj = [b.attn.c_proj for b in blocks]
        conv1d = True
        final_norm = model.transformer.ln_f
        is_ln = True
        eps = float(final_norm.eps)
        parallel = False
    elif model_type == "gpt_neox":
        blocks = list(model.gpt_neox.layers)
        attn = [b.attention for b in blocks]
        mlp = [b.mlp for b in blocks]
        out_proj = [b.attention.dense for b in blocks]
        conv1d = False
        final_norm = model.gpt_neox.final_layer_norm
        is_ln = True
        eps = float(final_norm.eps)
        parallel = bool(config.use_parallel_residual)
    else:
        raise ValueError(f"oracle does not know model_type {model_type!r}")

    n_heads = int(config.num_attention_heads)
    if conv1d:
        proj_in = out_proj[0].weight.shape[0]
    else:
        proj_in = out_proj[0].weight.shape[1]
    assert proj_in % n_heads == 0
    head_dim = proj_in // n_heads

    lm_head = model.get_output_embeddings()
    return ModelParts(
        model_type=model_type,
        n_layers=len(blocks),
        n_heads=n_heads,
        head_dim=head_dim,
        parallel=parallel,
        attn=attn,
        mlp=mlp,
        out_proj=out_proj,
        out_proj_is_conv1d=conv1d,
        final_norm=final_norm,
        norm_is_layernorm=is_ln,
        norm_eps=eps,
        unembed=lm_head.weight.detach().double(),
        unembed_bias=None if getattr(lm_head, "bias", None) is None else lm_head.bias.detach().double(),
        gain_offset=gain_offset,
        post_norm=post_norm,
        softcap=getattr(config, "final_logit_softcapping", None) or None,
        lm_head=lm_head,
    )


def head_matrix(parts: ModelParts, layer: int, head: int) -> torch.Tensor:
    """M (head_dim, d_model) such that head `head`'s contribution is `slice @ M` (no bias)."""
    proj = parts.out_proj[layer]
    lo, hi = head * parts.head_dim, (head + 1) * parts.head_dim
    if parts.out_proj_is_conv1d:
        return _weight(proj).detach().double()[lo:hi, :]
    return _weight(proj).detach().double()[:, lo:hi].T


def response_basis(parts: ModelParts) -> list[str]:
    names = []
    for layer in range(parts.n_layers):
        names.append(f"attn.{layer}")
        names.append(f"mlp.{layer}")
    return names


@dataclass(frozen=True)
class Component:
    kind: str  # "attn" | "mlp" | "head"
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"head.{self.layer}.{self.head}"
        return f"{self.kind}.{self.layer}"


def layer_of(name: str) -> str:
    """The layer component a basis entry belongs to: a head's attention layer (head.L.H -> attn.L), else itself."""
    bits = name.split(".")
    return f"attn.{bits[1]}" if bits[0] == "head" else name


def parse_component(name: str) -> Component:
    bits = name.split(".")
    if bits[0] in ("attn", "mlp") and len(bits) == 2:
        return Component(bits[0], int(bits[1]))
    if bits[0] == "head" and len(bits) == 3:
        return Component("head", int(bits[1]), int(bits[2]))
    raise ValueError(f"bad component name {name!r}")


def downstream(component: str, n_layers: int, parallel: bool) -> set[str]:
    """The layer components whose output at the final position can change when `component` is ablated."""
    c = parse_component(component)
    out: set[str] = set()
    if c.kind in ("attn", "head") and not parallel:
        out.add(f"mlp.{c.layer}")
    for later in range(c.layer + 1, n_layers):
        out.add(f"attn.{later}")
        out.add(f"mlp.{later}")
    return out


def paper_downstream(component: str, n_layers: int, parallel: bool) -> set[str]:
    """The downstream sets of the compensatory effect, as McGrath et al. (2023) Eq. 33–34 write them: an attention
    layer (or one of its heads) ablated at m sums attention from m+1 and MLPs from m; an MLP ablated at m sums both
    from m+1. Parallel blocks: the MLP of layer m reads the block's input, not attention m's output, so it cannot
    respond and is left out."""
    c = parse_component(component)
    first_mlp = c.layer if c.kind in ("attn", "head") and not parallel else c.layer + 1
    return {f"attn.{k}" for k in range(c.layer + 1, n_layers)} | {f"mlp.{k}" for k in range(first_mlp, n_layers)}


# --------------------------------------------------------------------------------------------------------------------
# Forward passes with hooks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What one forward pass of one prompt produced (float32 captures, batch dimension removed)."""

    logits: torch.Tensor  # (vocab,) at the final position: the model's output (soft-capped where the model caps)
    x_final: torch.Tensor  # (d_model,) residual stream entering the final norm, final position
    attn_out: list[torch.Tensor]  # per layer, (T, d_model)
    mlp_out: list[torch.Tensor]  # per layer, (T, d_model)
    head_in: list[torch.Tensor]  # per layer, (T, n_heads * head_dim): input of the output projection
    raw_logits: torch.Tensor | None = None  # (vocab,): the lm_head's output at the final position (before any cap)


@dataclass
class Ablation:
    """Replace `component` at the given positions: `values[p]` is the replacement at position p.

    For attn / mlp the replacement is a d_model vector (the block's output); for heads it is a head_dim vector (the
    head's slice of the output projection's input).
    """

    component: Component
    values: dict[int, torch.Tensor]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def run_model(model: nn.Module, parts: ModelParts, ids: torch.Tensor, ablation: Ablation | None = None) -> RunRecord:
    """One full forward pass of one prompt (1-D ids), optionally with one component replaced; records everything."""
    assert ids.dim() == 1
    T = ids.shape[0]
    attn_out: list = [None] * parts.n_layers
    mlp_out: list = [None] * parts.n_layers
    head_in: list = [None] * parts.n_layers
    x_final: list = [None]
    handles = []

    # (a) the ablation hooks, registered first so the capture hooks below see the replaced values.
    if ablation is not None:
        comp = ablation.component
        if comp.kind == "head":
            lo, hi = _head(comp) * parts.head_dim, (_head(comp) + 1) * parts.head_dim

            def replace_head(module, args):
                x = args[0].clone()
                for p, v in ablation.values.items():
                    x[0, p, lo:hi] = v.to(x.dtype)
                return (x, *tuple(args[1:]))

            handles.append(parts.out_proj[comp.layer].register_forward_pre_hook(replace_head))
        else:
            module = parts.attn[comp.layer] if comp.kind == "attn" else parts.mlp[comp.layer]

            def replace_output(module, args, output):
                out = _first(output).clone()
                for p, v in ablation.values.items():
                    out[0, p, :] = v.to(out.dtype)
                if isinstance(output, tuple):
                    return (out, *tuple(output[1:]))
                return out

            handles.append(module.register_forward_hook(replace_output))

    # (b) the capture hooks.
    def capture(store, layer):
        def hook(module, args, output):
            store[layer] = _first(output)[0].detach().clone()

        return hook

    def capture_input(store, layer):
        def hook(module, args):
            store[layer] = args[0][0].detach().clone()

        return hook

    def capture_final(module, args):
        x_final[0] = args[0][0, -1].detach().clone()

    for layer in range(parts.n_layers):
        handles.append(parts.attn[layer].register_forward_hook(capture(attn_out, layer)))
        handles.append(parts.mlp[layer].register_forward_hook(capture(mlp_out, layer)))
        handles.append(parts.out_proj[layer].register_forward_pre_hook(capture_input(head_in, layer)))
    handles.append(parts.final_norm.register_forward_pre_hook(capture_final))
    raw: list = [None]
    if parts.lm_head is not None:

        def capture_raw(module, args, output):
            raw[0] = output[0, -1].detach().clone()

        handles.append(parts.lm_head.register_forward_hook(capture_raw))

    try:
        with torch.no_grad():
            # logits_to_keep=1: the real full-vocabulary logits, at the final position only (the others are unused).
            out = model(input_ids=ids.view(1, T), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    assert out.logits.shape[:2] == (1, 1)
    logits = out.logits[0, -1].detach().clone()
    for layer in range(parts.n_layers):
        assert attn_out[layer].shape[0] == T and mlp_out[layer].shape[0] == T
    return RunRecord(
        logits=logits, x_final=x_final[0], attn_out=attn_out, mlp_out=mlp_out, head_in=head_in, raw_logits=raw[0]
    )


def replacement_space_output(parts: ModelParts, rec: RunRecord, comp: Component) -> torch.Tensor:
    """The component's clean output over all positions, in the space the ablation replaces: (T, dim), float64."""
    if comp.kind == "attn":
        return rec.attn_out[comp.layer].double()
    if comp.kind == "mlp":
        return rec.mlp_out[comp.layer].double()
    lo, hi = _head(comp) * parts.head_dim, (_head(comp) + 1) * parts.head_dim
    return rec.head_in[comp.layer][:, lo:hi].double()


def to_residual(parts: ModelParts, comp: Component, v: torch.Tensor) -> torch.Tensor:
    """Map a replacement-space vector to what it writes into the residual stream (heads: times their W_O slice)."""
    if comp.kind == "head":
        return v.double() @ head_matrix(parts, comp.layer, _head(comp))
    return v.double()


def layer_output(rec: RunRecord, name: str) -> torch.Tensor:
    """A layer component's output at the final position, float64."""
    kind, layer = name.split(".")
    store = rec.attn_out if kind == "attn" else rec.mlp_out
    return store[int(layer)][-1].double()


# --------------------------------------------------------------------------------------------------------------------
# Readout: final norm, metric, direct-effect map
# --------------------------------------------------------------------------------------------------------------------


class Readout:
    def __init__(self, parts: ModelParts):
        self.parts = parts
        self.g = _weight(parts.final_norm).detach().double() + parts.gain_offset
        bias = getattr(parts.final_norm, "bias", None)
        self.b = None if bias is None else bias.detach().double()
        self.eps = parts.norm_eps
        self.is_ln = parts.norm_is_layernorm

    def center(self, v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        return v - v.mean() if self.is_ln else v

    def scale(self, x: torch.Tensor) -> float:
        x = x.double()
        if self.is_ln:
            var = ((x - x.mean()) ** 2).mean()  # population variance, as LayerNorm uses
            return math.sqrt(float(var) + self.eps)
        return math.sqrt(float((x**2).mean()) + self.eps)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g * self.center(x) / self.scale(x)
        return y + self.b if self.b is not None else y

    def f(self, w: torch.Tensor, v: torch.Tensor) -> float:
        """The linear direct-effect map f(v) = w · (g ⊙ C v)."""
        return float((w * (self.g * self.center(v))).sum())


def metric_direction(parts: ModelParts, metric: str, target: int, counterfactual: int | None) -> torch.Tensor:
    W = parts.unembed
    if metric in ("logit", "logprob"):
        return W[target].clone()
    if metric == "centered_logit":
        return W[target] - W.mean(dim=0)
    if metric == "logit_diff":
        return W[target] - W[counterfactual]
    raise ValueError(metric)


def metric_logits(rec: RunRecord, metric: str) -> torch.Tensor:
    """The logits a metric is read on: pre-cap for the linear metrics, the model's output for logprob."""
    if metric == "logprob" or rec.raw_logits is None:
        return rec.logits
    return rec.raw_logits


def metric_from_logits(logits: torch.Tensor, metric: str, target: int, counterfactual: int | None) -> float:
    z = logits.double()
    if metric == "logit":
        return float(z[target])
    if metric == "centered_logit":
        return float(z[target] - z.mean())
    if metric == "logit_diff":
        return float(z[target] - z[counterfactual])
    if metric == "logprob":
        return float(torch.log_softmax(z, dim=0)[target])
    raise ValueError(metric)


# --------------------------------------------------------------------------------------------------------------------
# Ablation replacements
# --------------------------------------------------------------------------------------------------------------------


def resample_values(src: torch.Tensor, T: int, positions: str) -> dict[int, torch.Tensor]:
    """Right-aligned resampling: position j of a length-T prompt takes position j − T + S of the source (length S);
    positions before the source's start take the source's mean over its own positions."""
    S = src.shape[0]
    wanted = [T - 1] if positions == "final" else list(range(T))
    values = {}
    for j in wanted:
        p = j - T + S
        values[j] = src[p] if p >= 0 else src.mean(dim=0)
    return values


def mean_vector(reference: list[torch.Tensor], positions: str) -> torch.Tensor:
    """Mean of the clean outputs (each (T_i, dim)): over final positions, or over every position of every prompt."""
    if positions == "final":
        return torch.stack([r[-1] for r in reference]).mean(dim=0)
    return torch.cat(reference, dim=0).mean(dim=0)


def resample_sources(n: int, k: int, resample_from: str, given: list[list[int]] | None) -> list[list[int]]:
    if k > n - 1:
        raise ValueError(f"resample_samples={k} needs at least {k + 1} prompts, got {n}")
    if resample_from == "next":
        return [[(i + j) % n for j in range(1, k + 1)] for i in range(n)]
    if given is None:
        raise ValueError("resample_from='random': pass the engine's pairing as `sources`")
    return [list(s) for s in given]


# --------------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One ablated run of one prompt: its record and Δ_c (residual space, final position)."""

    record: RunRecord
    delta: torch.Tensor
    source: int | None = None


@dataclass
class OracleDetail:
    """Raw material of an oracle sweep, for self-consistency tests: clean records and every ablated run."""

    clean: list[RunRecord] = field(default_factory=list)
    runs: dict[tuple[int, str], list[_Run]] = field(default_factory=dict)  # (prompt, component) -> runs


def oracle_sweep(
    model: nn.Module,
    spec: SweepSpec,
    inputs: SweepInputs,
    sources: list[list[int]] | None = None,
    detail: OracleDetail | None = None,
) -> SweepResult:
    parts = locate_parts(model)
    readout = Readout(parts)
    # With response_basis "heads" the responses are per head (basis_output: a head's slice of the captured input of
    # W_O times its slice of W_O, by hand); the per-run profiles stay per layer component.
    basis = position_basis(parts, spec.response_basis == "heads")
    layers = response_basis(parts)
    prompts = [torch.as_tensor(t, dtype=torch.long).view(-1) for t in inputs.token_ids]
    n = len(prompts)
    components = [parse_component(c) for c in spec.components]
    for c in components:
        assert 0 <= c.layer < parts.n_layers, c
        assert c.head is None or 0 <= c.head < parts.n_heads, c

    # Clean runs.
    clean = [run_model(model, parts, ids) for ids in prompts]
    if detail is not None:
        detail.clean = clean

    # Mean-ablation reference (the job's prompts unless a reference set is given).
    if spec.ablation == "mean":
        if inputs.mean_reference_ids is not None:
            ref_ids = [torch.as_tensor(t, dtype=torch.long).view(-1) for t in inputs.mean_reference_ids]
            ref_records = [run_model(model, parts, ids) for ids in ref_ids]
        else:
            ref_records = clean
        means = {
            c.name: mean_vector([replacement_space_output(parts, r, c) for r in ref_records], spec.positions)
            for c in components
        }

    pairing: list[list[int]] = [[] for _ in range(n)]
    if spec.ablation == "resample":
        pairing = resample_sources(n, spec.resample_samples, spec.resample_from, sources)

    results: list[PromptMeasures] = []
    for i, ids in enumerate(prompts):
        T = ids.shape[0]
        rec_c = clean[i]
        if spec.only_correct and int(torch.argmax(rec_c.logits)) != int(_target_ids(inputs)[i]):
            continue  # the paper's selection: only prompts whose clean top token is the answer
        logits_c = rec_c.logits.double()
        if inputs.target_ids is not None:
            target = int(inputs.target_ids[i])
        else:
            target = int(torch.argmax(rec_c.logits))
        counterfactual = None
        if spec.metric == "logit_diff":
            assert inputs.counterfactual_ids is not None, "logit_diff needs counterfactual_ids"
            counterfactual = int(inputs.counterfactual_ids[i])
        top2 = torch.topk(logits_c, 2).values
        top2_gap = float(top2[0] - top2[1])

        w = metric_direction(parts, spec.metric, target, counterfactual)
        m_clean = metric_from_logits(metric_logits(rec_c, spec.metric), spec.metric, target, counterfactual)
        m_clean_capped = metric_from_logits(rec_c.logits, spec.metric, target, counterfactual)
        s_clean = readout.scale(rec_c.x_final)
        clean_de = {d: readout.f(w, basis_output(parts, rec_c, d, T - 1)) / s_clean for d in basis}

        te_list, de_list, comp_list, resp_list, norm_list, capped_list = [], [], [], [], [], []
        unembed_list, ce_list, sample_list, own_list = [], [], [], []
        for comp in components:
            clean_rep = replacement_space_output(parts, rec_c, comp)  # (T, dim)
            # The ablations to run: one per source for resample, one otherwise.
            ablations: list[tuple[int | None, dict[int, torch.Tensor]]] = []
            if spec.ablation == "zero":
                wanted = [T - 1] if spec.positions == "final" else list(range(T))
                ablations.append((None, {p: torch.zeros(clean_rep.shape[1], dtype=torch.float64) for p in wanted}))
            elif spec.ablation == "mean":
                wanted = [T - 1] if spec.positions == "final" else list(range(T))
                ablations.append((None, {p: means[comp.name] for p in wanted}))
            elif spec.ablation == "resample":
                for source in pairing[i]:
                    src_rep = replacement_space_output(parts, clean[source], comp)
                    ablations.append((source, resample_values(src_rep, T, spec.positions)))
            else:
                raise ValueError(spec.ablation)

            down = downstream(comp.name, parts.n_layers, parts.parallel)
            paper_set = paper_downstream(comp.name, parts.n_layers, parts.parallel)
            # Δunembed (Eq. 10): the component's clean output at the final position onto w, clean scale.
            zeroed = None
            if comp.kind == "head" and parts.post_norm:
                # A post-norm block's head has no additive write: its clean output is what the block writes less
                # what it writes with that head zeroed at the final position (a brute-force run).
                zeroed = run_model(
                    model, parts, ids, Ablation(comp, {T - 1: torch.zeros(clean_rep.shape[1], dtype=torch.float64)})
                )
                written = layer_output(rec_c, f"attn.{comp.layer}") - layer_output(zeroed, f"attn.{comp.layer}")
            else:
                written = to_residual(parts, comp, clean_rep[T - 1])
            unembed_list.append(readout.f(w, written) / s_clean)
            per_run = []  # (TE, DE, compensation, response list, norm_response, CE, profile, source)
            for src, values in ablations:
                rec_a = run_model(model, parts, ids, Ablation(comp, values))
                if comp.kind == "head" and parts.post_norm:
                    delta = layer_output(rec_c, f"attn.{comp.layer}") - layer_output(rec_a, f"attn.{comp.layer}")
                else:
                    delta = to_residual(parts, comp, clean_rep[T - 1] - values[T - 1])
                if detail is not None:
                    detail.runs.setdefault((i, comp.name), []).append(_Run(rec_a, delta, src))

                m_abl = metric_from_logits(metric_logits(rec_a, spec.metric), spec.metric, target, counterfactual)
                capped_te = m_clean_capped - metric_from_logits(rec_a.logits, spec.metric, target, counterfactual)
                te = m_clean - m_abl
                de = readout.f(w, delta) / s_clean
                # Δ̃unembed(k, k): what the ablated component itself writes at the final position in this ablated
                # run, read off the run (clean scale): a layer's captured output; a head's captured slice of the
                # projection's input times its W_O; a post-norm head's block output less the head-zeroed run's.
                if comp.kind != "head":
                    own_write = layer_output(rec_a, comp.name)
                elif zeroed is not None:
                    own_write = layer_output(rec_a, f"attn.{comp.layer}") - layer_output(zeroed, f"attn.{comp.layer}")
                else:
                    lo, hi = _head(comp) * parts.head_dim, (_head(comp) + 1) * parts.head_dim
                    own_write = to_residual(parts, comp, rec_a.head_in[comp.layer][T - 1, lo:hi])
                own = readout.f(w, own_write) / s_clean
                compensation = de - te
                s_abl = readout.scale(rec_a.x_final)
                response = []
                for d in basis:
                    if layer_of(d) not in down:
                        response.append(0.0)
                    elif spec.norm_scale == "clean":
                        change = basis_output(parts, rec_a, d, T - 1) - basis_output(parts, rec_c, d, T - 1)
                        response.append(readout.f(w, change) / s_clean)
                    elif spec.norm_scale == "ablated":
                        ablated_de = readout.f(w, basis_output(parts, rec_a, d, T - 1)) / s_abl
                        response.append(ablated_de - clean_de[d])
                    else:
                        raise ValueError(spec.norm_scale)
                norm_response = compensation - sum(response)
                ce = sum(r for d, r in zip(basis, response, strict=True) if layer_of(d) in paper_set)
                s_profile = s_clean if spec.norm_scale == "clean" else s_abl
                profile = [readout.f(w, layer_output(rec_a, d)) / s_profile for d in layers]
                per_run.append((te, de, compensation, response, norm_response, ce, profile, src, capped_te, own))

            k = len(per_run)
            te_list.append(sum(r[0] for r in per_run) / k)
            de_list.append(sum(r[1] for r in per_run) / k)
            comp_list.append(sum(r[2] for r in per_run) / k)
            resp_list.append([sum(r[3][j] for r in per_run) / k for j in range(len(basis))])
            norm_list.append(sum(r[4] for r in per_run) / k)
            ce_list.append(sum(r[5] for r in per_run) / k)
            sample_list.append(
                [PatchSample(source=r[7], total_effect=r[0], direct_effect=r[1], profile=r[6],
                             ablated_unembed_effect=r[9]) for r in per_run]
            )
            capped_list.append(sum(r[8] for r in per_run) / k)
            own_list.append(sum(r[9] for r in per_run) / k)

        results.append(
            PromptMeasures(
                target_id=target,
                clean_metric=m_clean,
                top2_gap=top2_gap,
                total_effect=te_list,
                direct_effect=de_list,
                compensation=comp_list,
                response=resp_list,
                norm_response=norm_list,
                clean_direct_effect=[clean_de[d] for d in basis],
                sources=list(pairing[i]),
                unembed_effect=unembed_list,
                compensatory_effect=ce_list,
                ablated_unembed_effect=own_list,
                samples=sample_list if spec.keep_samples else None,
                index=i,
                capped_total_effect=capped_list if parts.softcap else None,
            )
        )

    return SweepResult(components=list(spec.components), response_basis=basis, prompts=results)


# --------------------------------------------------------------------------------------------------------------------
# Helpers for tests
# --------------------------------------------------------------------------------------------------------------------


def embedding_output(model: Any, parts: ModelParts, ids: torch.Tensor) -> torch.Tensor:
    """What the embedding layer writes into the residual stream, (T, d_model) float64 (for self-checks)."""
    ids = ids.view(-1)
    if parts.model_type in ("llama", "qwen2", "mistral", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2"):
        return model.model.embed_tokens.weight.detach().double()[ids]
    if parts.model_type in ("gemma", "gemma2", "gemma3_text"):  # embeddings times sqrt(d_model), in the model dtype
        weight = model.model.embed_tokens.weight.detach()
        return (weight[ids] * torch.tensor(model.config.hidden_size**0.5, dtype=weight.dtype)).double()
    if parts.model_type == "gptj":
        return model.transformer.wte.weight.detach().double()[ids]
    if parts.model_type == "gpt2":
        pos = torch.arange(ids.shape[0])
        return (model.transformer.wte.weight[ids] + model.transformer.wpe.weight[pos]).detach().double()
    if parts.model_type == "gpt_neox":
        return model.gpt_neox.embed_in.weight.detach().double()[ids]
    raise ValueError(parts.model_type)


# --------------------------------------------------------------------------------------------------------------------
# Every position (docs/concepts/definitions.md, "Every position"): one full forward pass per ablation, every position
# read
# --------------------------------------------------------------------------------------------------------------------


def run_model_positions(
    model: nn.Module, parts: ModelParts, ids: torch.Tensor, ablation: Ablation | None = None
) -> tuple[RunRecord, torch.Tensor]:
    """`run_model`, plus the residual stream entering the final norm at every position, (T, d_model)."""
    captured: list[torch.Tensor] = []

    def capture(module, args):
        captured.append(args[0][0].detach().clone())

    handle = parts.final_norm.register_forward_pre_hook(capture)
    try:
        record = run_model(model, parts, ids, ablation)
    finally:
        handle.remove()
    return record, captured[-1]


def hand_logits(parts: ModelParts, readout: Readout, x: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of one residual vector, by hand in float64: W_U · norm(x) (+ bias)."""
    logits = parts.unembed @ readout.norm(x)
    return logits + parts.unembed_bias if parts.unembed_bias is not None else logits


def position_basis(parts: ModelParts, heads: bool) -> list[str]:
    if not heads:
        return response_basis(parts)
    names = []
    for layer in range(parts.n_layers):
        names += [f"head.{layer}.{h}" for h in range(parts.n_heads)]
        names.append(f"mlp.{layer}")
    return names


def basis_output(parts: ModelParts, rec: RunRecord, name: str, p: int) -> torch.Tensor:
    """What basis entry `name` writes into the residual stream at position p, float64.

    A head of a post-norm block: its W_O slice times its slice, through the post-norm (RMSNorm: gain ⊙ v / s) with
    the scale s of the whole attention output W_O z_p (+ bias) at p, all by hand in float64.
    """
    c = parse_component(name)
    if c.kind == "head":
        lo, hi = _head(c) * parts.head_dim, (_head(c) + 1) * parts.head_dim
        write = rec.head_in[c.layer][p, lo:hi].double() @ head_matrix(parts, c.layer, _head(c))
        if not parts.post_norm:
            return write
        norm = parts.attn[c.layer]  # post-norm families: the post-attention norm's output is what attention writes
        whole = torch.stack([
            rec.head_in[c.layer][p, h * parts.head_dim : (h + 1) * parts.head_dim].double()
            @ head_matrix(parts, c.layer, h)
            for h in range(parts.n_heads)
        ]).sum(dim=0)
        bias = getattr(parts.out_proj[c.layer], "bias", None)
        if bias is not None:
            whole = whole + bias.detach().double()
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
        gain = cast(torch.Tensor, norm.weight).detach().double() + parts.gain_offset
        return gain * write / math.sqrt(float((whole**2).mean()) + eps)
    store = rec.attn_out if c.kind == "attn" else rec.mlp_out
    return store[c.layer][p].double()


def oracle_position_sweep(
    model: nn.Module, spec: SweepSpec, inputs: SweepInputs, sources: list[list[int]] | None = None
) -> dict[str, Any]:
    """Per-position measures, brute force: {components, response_basis, prompts: [dict of float64 tensors]}.

    Each prompt's dict: positions, target_ids (P,), clean_metric (P,), total_effect / direct_effect / unembed_effect
    / compensation / norm_response / ablated_unembed_effect (C, P), response (C, R, P), clean_direct_effect (R, P).
    """
    assert spec.positions == "all", "the per-position measures ablate at every position"
    parts = locate_parts(model)
    readout = Readout(parts)
    heads = spec.response_basis == "heads"
    basis = position_basis(parts, heads)
    full = [torch.as_tensor(t, dtype=torch.long).view(-1) for t in inputs.token_ids]
    prompts = [ids[:-1] for ids in full] if spec.target == "next_token" else full
    n = len(prompts)
    components = [parse_component(c) for c in spec.components]
    clean = [run_model_positions(model, parts, ids) for ids in prompts]

    if spec.ablation == "mean":
        if inputs.mean_reference_ids is not None:
            refs = [torch.as_tensor(t, dtype=torch.long).view(-1) for t in inputs.mean_reference_ids]
            ref_records = [run_model(model, parts, ids) for ids in refs]
        else:
            ref_records = [rec for rec, _ in clean]
        means = {
            c.name: mean_vector([replacement_space_output(parts, r, c) for r in ref_records], "all") for c in components
        }
    pairing: list[list[int]] = [[] for _ in range(n)]
    if spec.ablation == "resample":
        pairing = resample_sources(n, spec.resample_samples, spec.resample_from, sources)

    def is_down(comp: Component, name: str) -> bool:
        layer_name = name if not name.startswith("head.") else "attn." + name.split(".")[1]
        return layer_name in downstream(comp.name, parts.n_layers, parts.parallel)

    def capped(z: torch.Tensor) -> torch.Tensor:
        return z if parts.softcap is None else parts.softcap * torch.tanh(z / parts.softcap)

    def metric(z: torch.Tensor, target: int, on_capped: bool = False) -> float:
        """From hand logits `z`: pre-cap for logit / centered_logit; the model's capped distribution for logprob."""
        return metric_from_logits(capped(z) if on_capped or spec.metric == "logprob" else z, spec.metric, target, None)

    def logits_at(x: torch.Tensor) -> torch.Tensor:
        """(T, vocab) hand logits of every position, by hand in float64 (one product: the same numbers as
        hand_logits per position, read from W_U once instead of once per position)."""
        normed = torch.stack([readout.norm(x[p]) for p in range(x.shape[0])])
        z = normed @ parts.unembed.T
        return z + parts.unembed_bias if parts.unembed_bias is not None else z

    results = []
    for i, ids in enumerate(prompts):
        T = ids.shape[0]
        rec_c, x_c = clean[i]
        z_c = logits_at(x_c)
        logits_c = [z_c[p] for p in range(T)]
        if spec.target == "next_token":
            targets = [int(t) for t in full[i][1:]]
        elif inputs.target_ids is not None:
            targets = [int(inputs.target_ids[i])] * T
        else:
            targets = [int(torch.argmax(z)) for z in logits_c]
        measured = list(range(T)) if spec.measure_positions == "all" else [T - 1]
        w = [metric_direction(parts, spec.metric, targets[p], None) for p in range(T)]
        s_c = [readout.scale(x_c[p]) for p in range(T)]
        m_c = [metric(z_c[p], targets[p]) for p in range(T)]
        m_c_capped = [metric(z_c[p], targets[p], on_capped=True) for p in range(T)]
        clean_de = [[readout.f(w[p], basis_output(parts, rec_c, d, p)) / s_c[p] for p in measured] for d in basis]

        names = ("total_effect", "direct_effect", "unembed_effect", "compensation", "norm_response",
                 "capped_total_effect", "ablated_unembed_effect")
        fields: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        fields["response"] = []
        for comp in components:
            clean_rep = replacement_space_output(parts, rec_c, comp)
            post_norm_head = comp.kind == "head" and parts.post_norm
            if post_norm_head:
                # Δ of a post-norm block's head: what attention writes at p, less what it writes in a run with the
                # head replaced at every position (at its own layer every other head still reads the clean input).
                zeros = {p: torch.zeros(clean_rep.shape[1], dtype=torch.float64) for p in range(T)}
                rec_zero, _ = run_model_positions(model, parts, ids, Ablation(comp, zeros))
            if spec.ablation == "zero":
                runs = [{p: torch.zeros(clean_rep.shape[1], dtype=torch.float64) for p in range(T)}]
            elif spec.ablation == "mean":
                runs = [{p: means[comp.name] for p in range(T)}]
            else:
                runs = [
                    resample_values(replacement_space_output(parts, clean[src][0], comp), T, "all")
                    for src in pairing[i]
                ]
            sums = {k: torch.zeros(len(measured), dtype=torch.float64) for k in fields if k != "response"}
            response_sum = torch.zeros(len(basis), len(measured), dtype=torch.float64)
            for values in runs:
                rec_a, x_a = run_model_positions(model, parts, ids, Ablation(comp, values))
                z_a = logits_at(x_a)
                for k, p in enumerate(measured):
                    te = m_c[p] - metric(z_a[p], targets[p])
                    capped_te = m_c_capped[p] - metric(z_a[p], targets[p], on_capped=True)
                    if post_norm_head:
                        attn_c = rec_c.attn_out[comp.layer][p].double()
                        delta = attn_c - rec_a.attn_out[comp.layer][p].double()
                        written = attn_c - rec_zero.attn_out[comp.layer][p].double()
                        # Δ̃unembed(k, k): the ablated run's block output less the head-zeroed run's.
                        own_write = rec_a.attn_out[comp.layer][p].double() - rec_zero.attn_out[comp.layer][p].double()
                    else:
                        delta = to_residual(parts, comp, clean_rep[p] - values[p])
                        written = to_residual(parts, comp, clean_rep[p])
                        own_write = basis_output(parts, rec_a, comp.name, p)  # read off the ablated run
                    de = readout.f(w[p], delta) / s_c[p]
                    unembed = readout.f(w[p], written) / s_c[p]
                    s_a = readout.scale(x_a[p])
                    response = []
                    for d in basis:
                        if not is_down(comp, d):
                            response.append(0.0)
                            continue
                        out_a, out_c = basis_output(parts, rec_a, d, p), basis_output(parts, rec_c, d, p)
                        if spec.norm_scale == "clean":
                            response.append(readout.f(w[p], out_a - out_c) / s_c[p])
                        else:
                            response.append(readout.f(w[p], out_a) / s_a - readout.f(w[p], out_c) / s_c[p])
                    compensation = de - te
                    for name, value in (
                        ("total_effect", te),
                        ("direct_effect", de),
                        ("unembed_effect", unembed),
                        ("compensation", compensation),
                        ("norm_response", compensation - sum(response)),
                        ("capped_total_effect", capped_te),
                        ("ablated_unembed_effect", readout.f(w[p], own_write) / s_c[p]),
                    ):
                        sums[name][k] += value
                    response_sum[:, k] += torch.tensor(response, dtype=torch.float64)
            for name, summed in sums.items():
                fields[name].append(summed / len(runs))
            fields["response"].append(response_sum / len(runs))
        prompt: dict[str, Any] = {name: torch.stack(values) for name, values in fields.items()}
        prompt.update(
            positions=measured,
            target_ids=torch.tensor([targets[p] for p in measured]),
            clean_metric=torch.tensor([m_c[p] for p in measured], dtype=torch.float64),
            clean_direct_effect=torch.tensor(clean_de, dtype=torch.float64),
            sources=list(pairing[i]),
        )
        results.append(prompt)
    return {"components": list(spec.components), "response_basis": basis, "prompts": results}
