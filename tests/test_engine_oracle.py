"""The engine (worker/engine/sweep.py) against the brute-force oracle (tests/oracle.py), on tiny random models of
every supported architecture family, plus self-consistency checks of the oracle itself.

Every option value appears for every architecture: ablation resample/mean/zero, positions final/all, every metric,
norm_scale clean/ablated, resample_samples 1/2/3, resample_from next/random, head components, given targets and
counterfactuals, a separate mean reference set, and prompts of different lengths (3 to 18 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import pytest
import torch

from hydra_ablate_client.vocabulary import (
    AblationKind,
    MetricName,
    NormScaleMode,
    PositionScope,
    ResampleFrom,
)
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.oracle import (
    OracleDetail,
    Readout,
    downstream,
    embedding_output,
    head_matrix,
    layer_output,
    locate_parts,
    metric_direction,
    metric_from_logits,
    metric_logits,
    oracle_sweep,
    parse_component,
    resample_values,
    response_basis,
    run_model,
)
from tests.tiny_models import TINY_ARCHS
from worker.engine.types import SweepInputs, SweepResult, SweepSpec

ATOL = 1e-4

LAYER_COMPONENTS = ("attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2")
HEADS = ("head.0.1", "head.1.3", "head.2.0")
ALL_COMPONENTS = LAYER_COMPONENTS + HEADS


@dataclass(frozen=True)
class Case:
    """One engine configuration: the spec's options and which optional inputs are given."""

    ablation: AblationKind
    positions: PositionScope
    metric: MetricName
    norm_scale: NormScaleMode
    resample_samples: int = 1
    resample_from: ResampleFrom = "next"
    seed: int = 0
    given_targets: bool = False
    mean_reference: bool = False
    keep_samples: bool = True

    @property
    def id(self) -> str:
        bits: list[str] = [self.ablation, self.positions, self.metric, self.norm_scale]
        if self.ablation == "resample":
            bits.append(f"{self.resample_from}{self.resample_samples}")
        if self.given_targets:
            bits.append("targets")
        if self.mean_reference:
            bits.append("meanref")
        return "-".join(bits)

    def spec(self, components: tuple[str, ...] = ALL_COMPONENTS) -> SweepSpec:
        return SweepSpec(
            components=components,
            ablation=self.ablation,
            positions=self.positions,
            metric=self.metric,
            norm_scale=self.norm_scale,
            resample_samples=self.resample_samples,
            resample_from=self.resample_from,
            seed=self.seed,
            keep_samples=self.keep_samples,
        )

    def inputs(self, ps: PromptSet) -> SweepInputs:
        return SweepInputs(
            token_ids=list(ps.token_ids),
            target_ids=list(ps.target_ids) if self.given_targets else None,
            counterfactual_ids=list(ps.counterfactual_ids) if self.metric == "logit_diff" else None,
            mean_reference_ids=list(ps.mean_reference_ids) if self.mean_reference else None,
        )


# A covering set: each option value appears at least once, and the combinations vary.
CASES = (
    Case("resample", "final", "logit", "clean", 1, "next", keep_samples=False),
    Case("resample", "all", "centered_logit", "ablated", 2, "random", seed=7),
    Case("resample", "all", "logit_diff", "clean", 3, "next", given_targets=True),
    Case("resample", "final", "logprob", "ablated", 2, "random", seed=11),
    Case("mean", "final", "logprob", "ablated", mean_reference=True),
    Case("mean", "all", "logit", "clean"),
    Case("mean", "all", "centered_logit", "ablated", mean_reference=True, given_targets=True),
    Case("zero", "final", "logit_diff", "ablated"),
    Case("zero", "all", "logprob", "clean", given_targets=True),
)
CASE_IDS = [c.id for c in CASES]


def _check_coverage() -> None:
    for attr, values in (
        ("ablation", {"resample", "mean", "zero"}),
        ("positions", {"final", "all"}),
        ("metric", {"logit", "centered_logit", "logprob", "logit_diff"}),
        ("norm_scale", {"clean", "ablated"}),
        ("resample_from", {"next", "random"}),
    ):
        assert {getattr(c, attr) for c in CASES} >= values, attr
    assert any(c.resample_samples > 1 for c in CASES if c.ablation == "resample")


_check_coverage()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is as fast, and does not thrash when other test processes share the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_engine(model, spec: SweepSpec, inputs: SweepInputs, **kwargs) -> SweepResult:
    from worker.engine.sweep import run_sweep  # imported here so the oracle's own tests run without the engine

    return run_sweep(model, spec, inputs, **kwargs)


# Engine results are reused by several tests: computed once per (arch, case).
_ENGINE_CACHE: dict[tuple[str, str], SweepResult] = {}


def engine_result(models, ps: PromptSet, arch: str, case: Case) -> SweepResult:
    key = (arch, case.id)
    if key not in _ENGINE_CACHE:
        torch.manual_seed(0)
        _ENGINE_CACHE[key] = _run_engine(models(arch), case.spec(), case.inputs(ps))
    return _ENGINE_CACHE[key]


def _close(a: float, b: float, atol: float = ATOL) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol


def compare_results(engine: SweepResult, oracle: SweepResult, atol: float = ATOL) -> list[str]:
    """Every disagreement, as readable lines (empty when the results agree)."""
    bad: list[str] = []
    if list(engine.components) != list(oracle.components):
        bad.append(f"components: engine {engine.components} != oracle {oracle.components}")
    if list(engine.response_basis) != list(oracle.response_basis):
        bad.append(f"response_basis: engine {engine.response_basis} != oracle {oracle.response_basis}")
    if len(engine.prompts) != len(oracle.prompts):
        bad.append(f"number of prompts: engine {len(engine.prompts)} != oracle {len(oracle.prompts)}")
        return bad
    basis = oracle.response_basis
    for i, (e, o) in enumerate(zip(engine.prompts, oracle.prompts, strict=True)):
        if e.target_id != o.target_id:
            bad.append(f"prompt {i}: target_id engine {e.target_id} != oracle {o.target_id}")
        if list(e.sources) != list(o.sources):
            bad.append(f"prompt {i}: sources engine {e.sources} != oracle {o.sources}")
        for name in ("clean_metric", "top2_gap"):
            if not _close(getattr(e, name), getattr(o, name), atol):
                bad.append(f"prompt {i}: {name} engine {getattr(e, name):.6f} oracle {getattr(o, name):.6f}")
        for j, d in enumerate(basis):
            if not _close(e.clean_direct_effect[j], o.clean_direct_effect[j], atol):
                bad.append(
                    f"prompt {i}: clean_direct_effect[{d}] engine {e.clean_direct_effect[j]:.6f} "
                    f"oracle {o.clean_direct_effect[j]:.6f}"
                )
        if (e.capped_total_effect is None) != (o.capped_total_effect is None):
            bad.append(f"prompt {i}: capped_total_effect engine {e.capped_total_effect} oracle {o.capped_total_effect}")
        for k, comp in enumerate(oracle.components):
            if e.capped_total_effect is not None and o.capped_total_effect is not None:
                ev, ov = e.capped_total_effect[k], o.capped_total_effect[k]
                if not _close(ev, ov, atol):
                    bad.append(f"prompt {i} {comp}: capped_total_effect engine {ev:.6f} oracle {ov:.6f}")
            names = ("total_effect", "direct_effect", "compensation", "norm_response", "unembed_effect",
                     "compensatory_effect", "ablated_unembed_effect")
            for name in names:
                ev, ov = getattr(e, name)[k], getattr(o, name)[k]
                if not _close(ev, ov, atol):
                    bad.append(f"prompt {i} {comp}: {name} engine {ev:.6f} oracle {ov:.6f}")
            for j, d in enumerate(basis):
                ev, ov = e.response[k][j], o.response[k][j]
                if not _close(ev, ov, atol):
                    bad.append(f"prompt {i} {comp}: response[{d}] engine {ev:.6f} oracle {ov:.6f}")
            bad += _compare_samples(e, o, i, k, comp, atol)
    return bad


def _compare_samples(e, o, i: int, k: int, comp: str, atol: float) -> list[str]:
    """Per-patch data: present in both or in neither; each patch's source, TE, DE and profile agree."""
    if (e.samples is None) != (o.samples is None):
        return [f"prompt {i} {comp}: samples engine {e.samples is not None} oracle {o.samples is not None}"]
    if e.samples is None:
        return []
    bad = []
    if len(e.samples[k]) != len(o.samples[k]):
        return [f"prompt {i} {comp}: {len(e.samples[k])} patches, oracle {len(o.samples[k])}"]
    for n, (ep, op) in enumerate(zip(e.samples[k], o.samples[k], strict=True)):
        if ep.source != op.source:
            bad.append(f"prompt {i} {comp} patch {n}: source engine {ep.source} oracle {op.source}")
        for name in ("total_effect", "direct_effect", "ablated_unembed_effect"):
            if not _close(getattr(ep, name), getattr(op, name), atol):
                bad.append(f"prompt {i} {comp} patch {n}: {name} engine {getattr(ep, name)} oracle {getattr(op, name)}")
        if len(ep.profile) != len(op.profile):  # per layer component whatever the response basis
            bad.append(f"prompt {i} {comp} patch {n}: profile of {len(ep.profile)}, oracle {len(op.profile)}")
        for j, (ev, ov) in enumerate(zip(ep.profile, op.profile, strict=False)):
            if not _close(ev, ov, atol):
                bad.append(f"prompt {i} {comp} patch {n}: profile[{j}] engine {ev} oracle {ov}")
    return bad


def _all_hooks(model) -> list[str]:
    found = []
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(module, attr, None)
            if hooks:
                found.append(f"{name or '<root>'}.{attr} ({len(hooks)})")
    g = torch.nn.modules.module
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(g, attr, None):
            found.append(f"torch global {attr}")
    return found


# ====================================================================================================================
# Engine vs oracle
# ====================================================================================================================


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_matches_oracle(tiny_models, prompt_set, arch: str, case: Case) -> None:  # noqa: F811
    model = tiny_models(arch)
    engine = engine_result(tiny_models, prompt_set, arch, case)
    sources = [list(p.sources) for p in engine.prompts] if case.resample_from == "random" else None
    torch.manual_seed(0)
    oracle = oracle_sweep(model, case.spec(), case.inputs(prompt_set), sources=sources)
    bad = compare_results(engine, oracle)
    assert not bad, f"{arch} {case.id}: {len(bad)} disagreements, first ones:\n" + "\n".join(bad[:25])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_decomposition_closes(tiny_models, prompt_set, arch: str, case: Case) -> None:  # noqa: F811
    """compensation = Σ_d response_d + norm_response, and compensation = DE − TE, for every prompt and component."""
    result = engine_result(tiny_models, prompt_set, arch, case)
    for i, p in enumerate(result.prompts):
        for k, comp in enumerate(result.components):
            te, de, comp_v = p.total_effect[k], p.direct_effect[k], p.compensation[k]
            tol = ATOL * (1 + abs(te))
            assert abs(comp_v - (sum(p.response[k]) + p.norm_response[k])) <= tol, (i, comp)
            assert abs(comp_v - (de - te)) <= tol, (i, comp)
            # The paper's CE plus the norm's part is the service's compensation, exactly (not within a tolerance).
            assert p.compensatory_effect[k] + p.norm_response[k] == comp_v, (i, comp)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_response_zero_outside_downstream(tiny_models, prompt_set, arch: str, case: Case) -> None:  # noqa: F811
    """response_d = 0 for d not downstream of the ablated component (in both norm_scale modes, by definition)."""
    result = engine_result(tiny_models, prompt_set, arch, case)
    model = tiny_models(arch)
    parallel = bool(getattr(model.config, "use_parallel_residual", False))
    n_layers = model.config.num_hidden_layers
    for i, p in enumerate(result.prompts):
        for k, comp in enumerate(result.components):
            down = downstream(comp, n_layers, parallel)
            for j, d in enumerate(result.response_basis):
                if d not in down:
                    assert p.response[k][j] == 0.0, (i, comp, d, p.response[k][j])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_removes_all_hooks(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    model = tiny_models(arch)
    assert _all_hooks(model) == [], "model had hooks before the test"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    case = Case("resample", "all", "logit", "ablated", 2, "random", seed=3)
    calls = []
    _run_engine(
        model,
        case.spec(("attn.0", "mlp.1", "head.1.2")),
        case.inputs(prompt_set),
        on_progress=lambda *a, **k: calls.append(a),
        should_stop=lambda: False,
    )
    assert _all_hooks(model) == []
    assert not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"run_sweep changed parameter {n}"


@pytest.mark.parametrize("arch", ["llama", "gpt_neox_parallel"])
def test_engine_removes_hooks_when_interrupted(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """Hooks must be gone even when a progress callback raises or the job is asked to stop."""
    model = tiny_models(arch)
    case = Case("mean", "all", "logit", "clean")

    def boom(*args, **kwargs):
        raise RuntimeError("progress callback failed")

    with pytest.raises(RuntimeError, match="progress callback failed"):
        _run_engine(model, case.spec(("attn.0", "mlp.1", "head.1.2")), case.inputs(prompt_set), on_progress=boom)
    assert _all_hooks(model) == []

    try:
        _run_engine(model, case.spec(("attn.0", "mlp.1")), case.inputs(prompt_set), should_stop=lambda: True)
    except Exception:  # noqa: BLE001 - whatever the engine does to signal a stop, it must clean up
        pass
    assert _all_hooks(model) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_random_sources(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """`random` sources: k distinct, never the prompt itself, in range, deterministic for a seed, seed-dependent."""
    model = tiny_models(arch)
    ids = list(prompt_set.token_ids) + list(prompt_set.mean_reference_ids)  # 7 prompts
    n = len(ids)
    inputs = SweepInputs(token_ids=ids)

    def pairing(seed: int, k: int) -> list[list[int]]:
        spec = SweepSpec(components=("mlp.2",), resample_samples=k, resample_from="random", seed=seed)
        return [list(p.sources) for p in _run_engine(model, spec, inputs).prompts]

    for k in (1, 3, n - 1):
        first = pairing(5, k)
        assert len(first) == n
        for i, src in enumerate(first):
            assert len(src) == k, (i, src)
            assert len(set(src)) == k, (i, src)
            assert i not in src, (i, src)
            assert all(0 <= s < n for s in src), (i, src)
        assert pairing(5, k) == first, "same seed gave a different pairing"
    seen = {str(pairing(seed, 2)) for seed in range(6)}
    assert len(seen) > 1, "the pairing does not depend on the seed"


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox_sequential"])
def test_engine_next_sources(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    model = tiny_models(arch)
    n = len(prompt_set.token_ids)
    spec = SweepSpec(components=("mlp.2",), resample_samples=n - 1, resample_from="next")
    result = _run_engine(model, spec, SweepInputs(token_ids=list(prompt_set.token_ids)))
    for i, p in enumerate(result.prompts):
        assert list(p.sources) == [(i + j) % n for j in range(1, n)]
    spec0 = SweepSpec(components=("mlp.2",), ablation="zero")
    for p in _run_engine(model, spec0, SweepInputs(token_ids=list(prompt_set.token_ids))).prompts:
        assert list(p.sources) == []


# ====================================================================================================================
# The oracle's own consistency (these need no engine)
# ====================================================================================================================


def test_resample_values_right_aligned() -> None:
    src = torch.arange(3 * 2, dtype=torch.float64).view(3, 2)  # S = 3
    # Shorter source: positions 0, 1 of a length-5 prompt fall before its start and take its mean.
    v = resample_values(src, 5, "all")
    assert sorted(v) == [0, 1, 2, 3, 4]
    assert torch.equal(v[0], src.mean(0)) and torch.equal(v[1], src.mean(0))
    assert torch.equal(v[2], src[0]) and torch.equal(v[3], src[1]) and torch.equal(v[4], src[2])
    # Longer source: a length-2 prompt takes the source's last two positions.
    v = resample_values(src, 2, "all")
    assert torch.equal(v[0], src[1]) and torch.equal(v[1], src[2])
    # Final only.
    v = resample_values(src, 7, "final")
    assert list(v) == [6] and torch.equal(v[6], src[2])


def test_downstream_table() -> None:
    assert downstream("attn.1", 3, parallel=False) == {"mlp.1", "attn.2", "mlp.2"}
    assert downstream("head.1.0", 3, parallel=False) == {"mlp.1", "attn.2", "mlp.2"}
    assert downstream("mlp.1", 3, parallel=False) == {"attn.2", "mlp.2"}
    assert downstream("attn.1", 3, parallel=True) == {"attn.2", "mlp.2"}
    assert downstream("head.2.3", 3, parallel=True) == set()
    assert downstream("mlp.2", 3, parallel=False) == set()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_oracle_residual_and_readout(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """The captures are the whole residual stream, and the hand-written final norm + W_U reproduce the logits."""
    model = tiny_models(arch)
    parts = locate_parts(model)
    readout = Readout(parts)
    for ids in prompt_set.token_ids:
        rec = run_model(model, parts, ids)
        emb = embedding_output(model, parts, ids)[-1]
        total = emb + sum(layer_output(rec, d) for d in response_basis(parts))
        assert torch.allclose(total, rec.x_final.double(), atol=1e-4)
        logits = readout.norm(rec.x_final) @ parts.unembed.T
        if parts.unembed_bias is not None:
            logits = logits + parts.unembed_bias
        assert torch.allclose(logits, metric_logits(rec, "logit").double(), atol=1e-4)
        if parts.softcap is not None:  # the model's output is the pre-cap logits, capped
            capped = parts.softcap * torch.tanh(logits / parts.softcap)
            assert torch.allclose(capped, rec.logits.double(), atol=1e-4)
        # The head slices times their W_O slices, plus the projection's bias, are the attention output (through
        # the block's post-norm where it has one).
        for layer in range(parts.n_layers):
            heads = cast(
                torch.Tensor,
                sum(
                    rec.head_in[layer][-1, h * parts.head_dim : (h + 1) * parts.head_dim].double()
                    @ head_matrix(parts, layer, h)
                    for h in range(parts.n_heads)
                ),
            )
            bias = cast("torch.Tensor | None", parts.out_proj[layer].bias)
            if bias is not None:
                heads = heads + bias.double()
            if parts.post_norm:
                heads = parts.attn[layer](heads.float().view(1, 1, -1))[0, 0].double()
            assert torch.allclose(heads, rec.attn_out[layer][-1].double(), atol=1e-5)
        # The logits are not near-constant (the random init is non-trivial).
        assert rec.logits.std() > 0.3


@pytest.mark.parametrize("positions", ["final", "all"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_oracle_only_downstream_changes(tiny_models, prompt_set, arch: str, positions: PositionScope) -> None:  # noqa: F811
    """In every ablated run, only downstream components change at the final position, the downstream ones do
    change, and the final residual moves by exactly −Δ_c + Σ_downstream (out_d(ablated) − out_d(clean))."""
    model = tiny_models(arch)
    parts = locate_parts(model)
    basis = response_basis(parts)
    detail = OracleDetail()
    spec = SweepSpec(components=ALL_COMPONENTS, ablation="resample", positions=positions)
    oracle_sweep(model, spec, SweepInputs(token_ids=list(prompt_set.token_ids)), detail=detail)
    for (i, comp), runs in detail.runs.items():
        c = parse_component(comp)
        down = downstream(comp, parts.n_layers, parts.parallel)
        own = {f"{c.kind}.{c.layer}"} if c.kind != "head" else {f"attn.{c.layer}"}
        clean = detail.clean[i]
        for run in runs:
            moved = torch.zeros_like(clean.x_final, dtype=torch.float64) - run.delta
            for d in basis:
                change = layer_output(run.record, d) - layer_output(clean, d)
                if d in down:
                    moved = moved + change
                elif d not in own:
                    assert change.abs().max() <= 1e-5, (arch, i, comp, d, float(change.abs().max()))
            if down and float(run.delta.abs().max()) > 1e-3:  # (Δ = 0 when the source's token is the same)
                biggest = max(float((layer_output(run.record, d) - layer_output(clean, d)).abs().max()) for d in down)
                assert biggest > 1e-3, (arch, i, comp)
            actual = run.record.x_final.double() - clean.x_final.double()
            assert torch.allclose(moved, actual, atol=1e-4), (arch, i, comp)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_oracle_zero_ablation_direct_effects(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """Zero ablation at the final position: DE(c) is c's clean direct effect; the heads' DEs plus the projection
    bias add up to the attention block's clean direct effect (blocks without a post-norm)."""
    model = tiny_models(arch)
    parts = locate_parts(model)
    readout = Readout(parts)
    heads = tuple(f"head.{layer}.{h}" for layer in range(parts.n_layers) for h in range(parts.n_heads))
    spec = SweepSpec(components=LAYER_COMPONENTS + heads, ablation="zero", positions="final", metric="centered_logit")
    inputs = SweepInputs(token_ids=list(prompt_set.token_ids))
    detail = OracleDetail()
    result = oracle_sweep(model, spec, inputs, detail=detail)
    basis = result.response_basis
    for i, p in enumerate(result.prompts):
        de = dict(zip(result.components, p.direct_effect, strict=True))
        for j, d in enumerate(basis):
            assert abs(de[d] - p.clean_direct_effect[j]) < 1e-9
        # A post-norm rescales the heads' sum: their DEs need not add up (docs/concepts/definitions.md).
        if parts.post_norm:
            continue
        w = metric_direction(parts, "centered_logit", p.target_id, None)
        s = readout.scale(detail.clean[i].x_final)
        for layer in range(parts.n_layers):
            total = sum(de[f"head.{layer}.{h}"] for h in range(parts.n_heads))
            bias = cast("torch.Tensor | None", parts.out_proj[layer].bias)
            if bias is not None:
                total += readout.f(w, bias.detach().double()) / s
            assert abs(total - de[f"attn.{layer}"]) < 1e-4, (arch, i, layer)


@pytest.mark.parametrize("metric", ["logit", "logprob", "logit_diff"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_oracle_last_mlp_nothing_downstream(tiny_models, prompt_set, arch: str, metric: MetricName) -> None:  # noqa: F811
    """The last MLP has nothing downstream: no response, norm_response = compensation, and TE is exactly the change
    of the metric when Δ is removed from the clean residual and read out through the hand-written norm."""
    model = tiny_models(arch)
    parts = locate_parts(model)
    readout = Readout(parts)
    last = f"mlp.{parts.n_layers - 1}"
    for norm_scale in ("clean", "ablated"):
        spec = SweepSpec(components=(last,), ablation="zero", positions="all", metric=metric, norm_scale=norm_scale)
        inputs = SweepInputs(
            token_ids=list(prompt_set.token_ids), counterfactual_ids=list(prompt_set.counterfactual_ids)
        )
        detail = OracleDetail()
        result = oracle_sweep(model, spec, inputs, detail=detail)
        for i, p in enumerate(result.prompts):
            assert all(r == 0.0 for r in p.response[0])
            assert abs(p.norm_response[0] - p.compensation[0]) < 1e-12
            (run,) = detail.runs[(i, last)]
            x_clean = detail.clean[i].x_final.double()
            logits = readout.norm(x_clean - run.delta) @ parts.unembed.T
            if parts.unembed_bias is not None:  # GPT-J's lm_head has a bias
                logits = logits + parts.unembed_bias
            if parts.softcap is not None and metric == "logprob":  # logprob: the model's own (capped) distribution
                logits = parts.softcap * torch.tanh(logits / parts.softcap)
            cf = prompt_set.counterfactual_ids[i] if metric == "logit_diff" else None
            te = p.clean_metric - metric_from_logits(logits, metric, p.target_id, cf)
            assert abs(te - p.total_effect[0]) < 1e-4, (arch, i, te, p.total_effect[0])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_oracle_identical_source_has_no_effect(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """Resampling from an identical prompt changes nothing: TE = DE = every response = 0."""
    model = tiny_models(arch)
    a, b, c = prompt_set.token_ids[0], prompt_set.token_ids[1], prompt_set.token_ids[2]
    spec = SweepSpec(components=ALL_COMPONENTS, ablation="resample", positions="all", metric="logprob")
    result = oracle_sweep(model, spec, SweepInputs(token_ids=[a, a.clone(), b, c]))
    p = result.prompts[0]
    assert p.sources == [1]
    for k in range(len(ALL_COMPONENTS)):
        assert abs(p.total_effect[k]) < 1e-5 and abs(p.direct_effect[k]) < 1e-9
        assert max(abs(r) for r in p.response[k]) < 1e-5
    assert max(abs(x) for x in result.prompts[2].total_effect) > 1e-2  # a real source does change things


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox_parallel"])
def test_oracle_norm_modes_and_decomposition(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """norm_scale changes only the split of compensation between responses and norm_response."""
    model = tiny_models(arch)
    inputs = SweepInputs(token_ids=list(prompt_set.token_ids))
    results = {
        mode: oracle_sweep(
            model, SweepSpec(components=ALL_COMPONENTS, positions="all", resample_samples=2, norm_scale=mode), inputs
        )
        for mode in ("clean", "ablated")
    }
    for pc, pa in zip(results["clean"].prompts, results["ablated"].prompts, strict=True):
        for k in range(len(ALL_COMPONENTS)):
            for name in ("total_effect", "direct_effect", "compensation"):
                assert getattr(pc, name)[k] == getattr(pa, name)[k]
            for p in (pc, pa):
                te = p.total_effect[k]
                assert abs(p.compensation[k] - (sum(p.response[k]) + p.norm_response[k])) <= 1e-9 * (1 + abs(te))
        assert pc.clean_direct_effect == pa.clean_direct_effect


# ====================================================================================================================
# The paper's prompt selection and resample groups
# ====================================================================================================================


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_only_correct_matches_oracle(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """only_correct keeps exactly the prompts whose clean top token is the target; the rest are still sources."""
    model = tiny_models(arch)
    tops = [int(torch.argmax(run_model(model, locate_parts(model), ids).logits)) for ids in prompt_set.token_ids]
    targets = [t if i % 2 == 0 else (t + 1) % model.config.vocab_size for i, t in enumerate(tops)]
    spec = SweepSpec(components=ALL_COMPONENTS, metric="centered_logit", resample_samples=3, only_correct=True,
                     keep_samples=True)
    inputs = SweepInputs(token_ids=list(prompt_set.token_ids), target_ids=targets)
    engine = _run_engine(model, spec, inputs)
    assert [p.index for p in engine.prompts] == [0, 2]
    oracle = oracle_sweep(model, spec, inputs)
    assert [p.index for p in oracle.prompts] == [0, 2]
    bad = compare_results(engine, oracle)
    assert not bad, "\n".join(bad[:25])


@pytest.mark.parametrize("how", ["next", "random"])
def test_resample_groups_stay_within_group(how: ResampleFrom) -> None:
    from worker.engine.replacements import resample_sources

    groups = [0, 1, 0, 2, 1, 0, 2, 0, 1, 2]
    sources = resample_sources(len(groups), 2, how, seed=5, groups=groups)
    for i, picked in enumerate(sources):
        assert len(set(picked)) == 2 and i not in picked
        assert all(groups[s] == groups[i] for s in picked), (i, picked)
    assert resample_sources(len(groups), 2, how, seed=5, groups=groups) == sources  # seeded, reproducible
    with pytest.raises(ValueError, match="groups"):
        resample_sources(len(groups), 3, how, seed=5, groups=groups)  # groups 1 and 2 have only 3 prompts


@pytest.mark.parametrize("arch", ["llama", "gpt_neox_parallel"])
def test_unembed_effect_is_the_clean_direct_effect(tiny_models, prompt_set, arch: str) -> None:  # noqa: F811
    """Δunembed of attn.L / mlp.L is its clean direct effect; with zero ablation DE equals it (Eq. 28)."""
    model = tiny_models(arch)
    spec = SweepSpec(components=ALL_COMPONENTS, ablation="zero", metric="centered_logit")
    result = _run_engine(model, spec, SweepInputs(token_ids=list(prompt_set.token_ids)))
    for p in result.prompts:
        for k, comp in enumerate(result.components):
            assert abs(p.unembed_effect[k] - p.direct_effect[k]) <= ATOL
            if not comp.startswith("head."):
                slot = result.response_basis.index(comp)
                assert abs(p.unembed_effect[k] - p.clean_direct_effect[slot]) <= ATOL
