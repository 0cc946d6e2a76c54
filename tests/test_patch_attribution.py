"""Attribution patching on patching pairs (worker/engine/patch_attribution.py) against independent computations on
tiny random models.

Nothing here uses the engine's passes to check the engine. The references run the Hugging Face model itself with
hooks (tests/patch_oracle.py's `capture`, `patched_logits` and its eager-attention wrapper, and the hooks below):

- AtP: (ñ − n) · ∂m/∂n with ∂m/∂n by torch.autograd through one full forward pass of the base prompt whose node
  is replaced by a leaf tensor (one pass per site), m the model's own logit difference;
- the QK fix: the head's attention probabilities of a forward pass with the site's query or key replaced at one
  position (from the eager model's own attention function), ∂m/∂A from a pass with the probabilities as a leaf;
- GradDrop: the same gradients with layer ℓ's attention and MLP writes detached by hooks;
- convergence: effect(εΔ)/ε from full float64 forward passes with the site moved by εΔ approaches the estimate;
- hygiene: nothing is left on the model after a run (hooks, `.grad`, `requires_grad`, attention implementation,
  saved tensors of a graph), also when it is cancelled.

The default run is a covering set; `HYDRA_ATTRIBUTION_CHECKS=full` runs every listed family × direction × scope.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from tests.autograd_reference import Detached
from tests.engine_fixtures import tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.patch_oracle import _columns, _first, _hook, _module, _parts, _Undo, _wrap_eager, capture, patched_logits
from tests.test_attribution import ModelState, float64_copy
from tests.test_patching import _pair
from tests.tiny_models import load_tiny_model
from worker.engine.architecture import describe, head_part_refusal
from worker.engine.errors import InputError
from worker.engine.patch_attribution import run_patch_attribution
from worker.engine.patching import PatchingCancelled, PatchPair, PatchSpec, run_patching

ATOL = 1e-4
FULL = os.environ.get("HYDRA_ATTRIBUTION_CHECKS") == "full"
# llama: grouped keys (q only); gemma2: eager attention, soft-capping, post-norms; qwen2: one key per head (q, k
# and v); qwen3: per-head QK-norms; gpt_neox_parallel: parallel blocks, fused q/k/v (patterns only).
CASES_FULL = [(a, d, s) for a in ("llama", "gemma2", "qwen2", "qwen3", "gpt_neox_parallel", "gpt2")
              for d in ("denoise", "noise") for s in ("final", "all")]
CASES = CASES_FULL if FULL else [("llama", "denoise", "final"), ("gemma2", "noise", "all"),
                                 ("qwen2", "denoise", "all"), ("gpt_neox_parallel", "noise", "final")]


def _parse(site: str) -> tuple[str, int, int | None, str | None]:
    kind, *rest = site.split(".")
    return kind, int(rest[0]), int(rest[1]) if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None


def _sites(model: PreTrainedModel, positions: str) -> list[str]:
    """Every layer site and two heads at the final position, and each head part the family supports; fewer at
    every position (the references run a pass per site, and the key fix one per position)."""
    arch = describe(model)
    parts = [part for part in ("q", "k", "v", "pattern") if head_part_refusal(arch, part) is None]
    if positions == "all":
        return ["resid_pre.0", "resid_pre.2", "attn.1", "mlp.0", "head.1.3", *(f"head.1.2.{p}" for p in parts)]
    sites = [f"{kind}.{layer}" for layer in range(arch.n_layers) for kind in ("resid_pre", "attn", "mlp")]
    sites += ["head.0.1", "head.2.3"]
    sites += [f"head.{layer}.2.{part}" for part in parts for layer in (0, 2)]
    return sites


def _star_sites(sites: list[str]) -> set[str]:
    """The sites whose AtP* is checked (its reference runs a pass per layer): every site with the full checks, one
    of each kind and part otherwise (the first, and resid_pre at its last layer, whose own drop is special)."""
    if FULL:
        return set(sites)
    first: dict[tuple[str, str | None], str] = {}
    for site in sites:
        kind, _layer, _head, part = _parse(site)
        first.setdefault((kind, part), site)
    resid = [site for site in sites if site.startswith("resid_pre.")]
    return {*first.values(), *resid[-1:]}


def reference_gradient(model: Any, ids: torch.Tensor, site: str, answer: int, counterfactual: int,
                       dropped: int | None = None) -> torch.Tensor:
    """∂m/∂(the site's activation at every position), (T, e), or (H, T, T) for a pattern site: one forward pass of
    the Hugging Face model with the activation replaced by a leaf tensor, m = logit(answer) − logit(counterfactual)
    of its own output; with layer `dropped`'s attention and MLP writes detached (GradDrop)."""
    kept: dict[str, torch.Tensor] = {}
    handles: list[Any] = []
    _kind, layer, _head, part = _parse(site)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        kept["x"] = t.detach().clone().requires_grad_(True)
        return kept["x"]

    if part == "pattern":
        handles.append(_Undo(_wrap_eager(model, layer, leaf)))
    else:
        module, where = _module(model, site)
        if where == "input":
            def leaf_input(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    return (leaf(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": leaf(kwargs["hidden_states"])}

            handles.append(module.register_forward_pre_hook(leaf_input, with_kwargs=True))
        else:
            def leaf_output(_m: nn.Module, _args: tuple, output: Any) -> Any:
                out = leaf(_first(output))
                return (out, *output[1:]) if isinstance(output, tuple) else out

            handles.append(module.register_forward_hook(leaf_output))
    if dropped is not None:  # registered after the leaf: a leaf of the dropped layer's write is detached too
        parts = _parts(model)
        handles += [parts.attn[dropped].register_forward_hook(Detached.hook),
                    parts.mlp[dropped].register_forward_hook(Detached.hook)]
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids.unsqueeze(0), logits_to_keep=1).logits[0, -1]
            (grad,) = torch.autograd.grad(logits[answer] - logits[counterfactual], kept["x"], allow_unused=True)
    finally:
        for handle in reversed(handles):
            handle.remove()
    return (torch.zeros_like(kept["x"]) if grad is None else grad)[0].double()


class Reference:
    """AtP, AtP + QK fix and AtP* of one pair, site by site, from the references above."""

    def __init__(self, model: Any, pair: PatchPair, direction: str, positions: str, sites: list[str]) -> None:
        self.model = model
        self.base, self.source = ((pair.corrupted_ids, pair.clean_ids) if direction == "denoise"
                                  else (pair.clean_ids, pair.corrupted_ids))
        self.answer, self.counterfactual = pair.answer_id, pair.counterfactual_id
        length = int(self.base.shape[0])
        self.positions = list(range(length)) if positions == "all" else [length - 1]
        self.n_layers = _parts(model).n_layers
        patterns = [f"head.{layer}.{head}.pattern" for _kind, layer, head, part in map(_parse, sites)
                    if part in ("q", "k")]
        every = sorted({*sites, *patterns})  # every activation in one capture pass per run
        self._captured = {(run, site): act for run, ids in (("base", self.base), ("source", self.source))
                          for site, act in capture(model, ids, every)[0].items()}
        self._patched: dict[tuple[str, int], torch.Tensor] = {}  # (q/k site, position) → the head's pattern

    def _act(self, run: str, site: str) -> torch.Tensor:
        """The site's activation on the base or source run, every position."""
        return self._captured[(run, site)]

    def _grad(self, site: str, dropped: int | None) -> torch.Tensor:
        return reference_gradient(self.model, self.base, site, self.answer, self.counterfactual, dropped)

    def linear(self, site: str, dropped: int | None = None) -> list[float]:
        source, base = self._act("source", site), self._act("base", site)
        g = self._grad(site, dropped)
        _kind, _layer, head, part = _parse(site)
        if part == "pattern":
            delta = (source - base).double()  # (T, T): row p is query p's pattern
            return [float((delta[p] * g[head][p]).sum()) for p in self.positions]
        cols = _columns(self.model, site)
        delta = (source[:, cols] - base[:, cols]).double()
        return [float((delta[p] * g[p, cols]).sum()) for p in self.positions]

    def fixed(self, site: str, dropped: int | None = None) -> list[float]:
        """∂m/∂A · (A(ñ at p) − A) for a q or k site, one position at a time."""
        _kind, layer, head, _part = _parse(site)
        pattern = f"head.{layer}.{head}.pattern"
        source = self._act("source", site)
        base_pattern = self._act("base", pattern).double()
        g = self._grad(pattern, dropped)[head]
        values = []
        for p in self.positions:
            if (site, p) not in self._patched:
                handle = _hook(self.model, site, p, source[p])
                try:
                    self._patched[(site, p)] = capture(self.model, self.base, [pattern])[0][pattern].double()
                finally:
                    handle.remove()
            values.append(float(((self._patched[(site, p)] - base_pattern) * g).sum()))
        return values

    def star(self, site: str) -> list[float]:
        qk = _parse(site)[3] in ("q", "k")
        total = [0.0] * len(self.positions)
        for layer in range(self.n_layers):
            terms = self.fixed(site, layer) if qk else self.linear(site, layer)
            total = [t + abs(v) for t, v in zip(total, terms, strict=True)]
        return [t / (self.n_layers - 1) for t in total]


@pytest.mark.parametrize(("arch", "direction", "positions"), CASES)
def test_estimates_match_their_definitions(
    arch: str, direction: str, positions: str, tiny_models: Callable[[str], PreTrainedModel],  # noqa: F811
) -> None:
    """AtP, the QK fix and GradDrop on every site kind the family supports, against the references at 1e-4; and
    the pass's metrics are the exact engine's clean and corrupted metrics."""
    model = tiny_models(arch)
    pair = _pair()
    sites = _sites(model, positions)
    spec = PatchSpec(sites=tuple(sites), direction=direction, positions=positions)  # type: ignore[arg-type]
    result = run_patch_attribution(model, spec, [pair], estimates=("atp", "atp_star"))
    assert result.sites == sites and result.methods == ["atp", "atp_qkfix", "atp_star"]
    (estimated,) = result.pairs
    (exact,) = run_patching(model, spec, [pair]).pairs
    base, source = ((exact.corrupted_metric, exact.clean_metric) if direction == "denoise"
                    else (exact.clean_metric, exact.corrupted_metric))
    assert estimated.base_metric == pytest.approx(base, abs=ATOL)
    assert estimated.source_metric == pytest.approx(source, abs=ATOL)
    reference = Reference(model, pair, direction, positions, sites)
    starred = _star_sites(sites)
    for s, site in enumerate(sites):
        qk = _parse(site)[3] in ("q", "k")
        atp = reference.linear(site)
        assert estimated.values["atp"][s] == pytest.approx(atp, rel=ATOL, abs=ATOL), (arch, site, "atp")
        fixed = reference.fixed(site) if qk else atp
        assert estimated.values["atp_qkfix"][s] == pytest.approx(fixed, rel=ATOL, abs=ATOL), (arch, site, "fix")
        if not qk:
            assert estimated.values["atp_qkfix"][s] == estimated.values["atp"][s]  # nothing to fix
        if site in starred:
            star = reference.star(site)
            assert estimated.values["atp_star"][s] == pytest.approx(star, rel=ATOL, abs=ATOL), (arch, site, "atp*")
    # The check can fail: the estimates are not all zero, and the fix moves the q/k estimates.
    assert any(abs(v) > 1e-3 for row in estimated.values["atp"] for v in row)
    q_rows = [s for s, site in enumerate(sites) if _parse(site)[3] in ("q", "k")]
    if q_rows:
        assert any(estimated.values["atp_qkfix"][s] != estimated.values["atp"][s] for s in q_rows)
    assert result.cost["atp"].forward_passes == 2 and result.cost["atp"].backward_passes == 1
    assert result.cost["atp"].model_evaluations == 3
    n = describe(model).n_layers
    assert result.cost["atp_star"].backward_passes == pytest.approx(1 + sum(ell / n for ell in range(1, n)))


@pytest.mark.parametrize(("arch", "positions"), [("llama", "all"), ("gpt2", "final")] if not FULL else
                         [(a, s) for a in ("llama", "gpt2", "gemma2") for s in ("final", "all")])
def test_estimate_converges_to_the_exact_effect(
    arch: str, positions: str, tiny_models: Callable[[str], PreTrainedModel],  # noqa: F811
) -> None:
    """effect(εΔ)/ε → Î(Δ): the exact change of the metric when the site moves by ε of the way to the source's
    activation, over ε, approaches the estimate, linearly in ε (float64 model and passes)."""
    m64: Any = float64_copy(tiny_models(arch))
    pair = _pair()
    arch_ = describe(m64)
    sites = ["resid_pre.1", "attn.1", "mlp.0", "head.2.1"]
    if head_part_refusal(arch_, "v") is None:
        sites.append("head.1.2.v")
    spec = PatchSpec(sites=tuple(sites), direction="denoise", positions=positions)  # type: ignore[arg-type]
    (estimated,) = run_patch_attribution(m64, spec, [pair], estimates=("atp",)).pairs
    base, source = pair.corrupted_ids, pair.clean_ids
    source_acts, _ = capture(m64, source, sites)
    base_acts, base_logits = capture(m64, base, sites)

    def metric(logits: torch.Tensor) -> float:
        return float(logits[pair.answer_id] - logits[pair.counterfactual_id])

    m_base = metric(base_logits)
    length = int(base.shape[0])
    columns = list(range(length)) if positions == "all" else [length - 1]
    scale = max(abs(v) for row in estimated.values["atp"] for v in row)
    checked = 0
    for s, site in enumerate(sites):
        for c, p in enumerate(columns):
            atp = estimated.values["atp"][s][c]
            delta = source_acts[site][p] - base_acts[site][p]
            quotients = []
            for eps in (1e-2, 1e-3, 1e-4):
                moved = patched_logits(m64, base, [(site, base_acts[site][p] + eps * delta)], p)
                quotients.append((metric(moved) - m_base) / eps)
            errors = [abs(q - atp) for q in quotients]
            floor = 1e-9 * max(1.0, scale)
            assert errors[2] <= 0.2 * errors[1] + floor, (arch, site, p, errors)
            limit = (10 * quotients[2] - quotients[1]) / 9
            assert abs(limit - atp) <= 1e-4 * max(abs(atp), 1e-2 * scale) + floor, (arch, site, p, atp, limit)
            checked += abs(atp) > 1e-6
    assert checked > 0  # the check can fail: some estimates are not zero


def test_refusals_say_what_to_change(tiny_models: Callable[[str], PreTrainedModel]) -> None:  # noqa: F811
    model = tiny_models("llama")
    pair = _pair()
    with pytest.raises(InputError, match="not knockout sets"):
        run_patch_attribution(model, PatchSpec(sites=("attn.1",), knockouts=(("attn.1", "mlp.0"),)), [pair])
    with pytest.raises(InputError, match="choose from atp, atp_star"):
        run_patch_attribution(model, PatchSpec(sites=("attn.1",)), [pair], estimates=("bogus",))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="head 9 out of range"):
        run_patch_attribution(model, PatchSpec(sites=("head.1.9",)), [pair])
    short = PatchPair(pair.clean_ids, pair.corrupted_ids[:-1], pair.answer_id, pair.counterfactual_id)
    with pytest.raises(InputError, match="same length"):
        run_patch_attribution(model, PatchSpec(sites=("attn.1",)), [short])


def test_nothing_left_on_the_model(tiny_model_dir: Callable[[str], Any]) -> None:  # noqa: F811
    model = load_tiny_model(tiny_model_dir("gemma2"))  # eager attention, soft-capping, post-norms
    state = ModelState(model)
    arch = describe(model)
    sites = tuple(site for site in ("resid_pre.1", "attn.0", "mlp.2", "head.1.2", "head.0.1.q", "head.2.3.k",
                                    "head.1.0.v", "head.2.2.pattern")
                  if _parse(site)[3] is None or head_part_refusal(arch, str(_parse(site)[3])) is None)
    assert "head.0.1.q" in sites and "head.2.2.pattern" in sites  # the probed pass and the QK fix run
    spec = PatchSpec(sites=sites, positions="all")
    with state.tracking():
        result = run_patch_attribution(model, spec, [_pair(), _pair()])
    state.assert_unchanged()
    assert len(result.pairs) == 2

    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1  # cancelled after the first pair

    with pytest.raises(PatchingCancelled), state.tracking():
        run_patch_attribution(model, spec, [_pair(), _pair()], should_stop=stop)
    state.assert_unchanged()
