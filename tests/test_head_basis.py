"""The head response basis on final-position jobs (`response_basis: "heads"`, worker/engine/sweep.py): every head's
and MLP's response and clean direct effect against the brute-force oracles (tests/oracle.py, tests/knockout_oracle.py:
one full forward pass per ablated run, a head's write taken from the captured input of W_O by hand) on a tiny model
of every family, for layer components, heads and knockout sets; the heads of a layer against the layer basis; the
refusal where the basis has no definition; resolving such a job; and a job through the real stack (uvicorn, Redis,
Celery worker) whose served numbers are the engine's, with its figures."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobRequest, ModelInfo
from service.core.errors import ValidationProblem
from service.core.resolve import resolve
from service.core.settings import Settings
from service.rendering.figures import ABLATION_FIGURES
from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.knockout_oracle import oracle_knockout
from tests.oracle import layer_of, locate_parts, oracle_sweep, position_basis
from tests.test_engine_oracle import Case, compare_results
from tests.test_knockouts import POST_NORM_SETS, PRE_NORM_SETS
from tests.tiny_models import TINY_ARCHS
from worker.engine.architecture import describe
from worker.engine.errors import InputError
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepResult, SweepSpec
from worker.summary import summarise

ATOL = 1e-4
COMPONENTS = ("attn.0", "mlp.0", "head.0.1", "head.1.3", "attn.1", "mlp.1", "head.2.0")
CASES = (
    Case("zero", "final", "logit", "clean"),
    Case("resample", "all", "centered_logit", "ablated", 2, "next"),
    Case("mean", "final", "logprob", "ablated", given_targets=True),
)
CASE_IDS = [c.id for c in CASES]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is as fast, and does not thrash when other test processes share the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _heads_spec(case: Case) -> SweepSpec:
    return replace(case.spec(COMPONENTS), response_basis="heads")


def _sum_of_heads(result: SweepResult, k: int, p: int, layer: int) -> float:
    return sum(v for d, v in zip(result.response_basis, result.prompts[p].response[k], strict=True)
               if d.startswith(f"head.{layer}."))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_head_basis_matches_the_oracle(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: PromptSet, arch: str, case: Case  # noqa: F811
) -> None:
    model = tiny_models(arch)
    spec, inputs = _heads_spec(case), case.inputs(prompt_set)
    engine = run_sweep(model, spec, inputs)
    parts = locate_parts(model)
    assert engine.response_basis == position_basis(parts, True)
    assert len(engine.response_basis) == parts.n_layers * (parts.n_heads + 1)
    oracle = oracle_sweep(model, spec, inputs)
    bad = compare_results(engine, oracle)
    assert not bad, f"{arch} {case.id}: {len(bad)} disagreements, first ones:\n" + "\n".join(bad[:25])

    # Not vacuous: heads after an ablated layer respond; a head's own entry and the heads of its layer do not.
    basis = engine.response_basis
    k = engine.components.index("attn.0")
    later = [j for j, d in enumerate(basis) if d.startswith(("head.1.", "head.2."))]
    assert max(abs(p.response[k][j]) for p in engine.prompts for j in later) > 1e-3
    h = engine.components.index("head.1.3")
    same_layer = [j for j, d in enumerate(basis) if d.startswith("head.1.")]
    assert all(p.response[h][j] == 0.0 for p in engine.prompts for j in same_layer)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_heads_of_a_layer_add_up_to_its_layer_response(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: PromptSet, arch: str  # noqa: F811
) -> None:
    """The same job in both bases: every measure of a component is the same, each MLP responds the same, and a
    layer's heads (their shares, in a post-norm block) add up to attn.L's response, a knockout set's member heads
    (their own entries, masked) included; so CE's attention part is the same, per source draw and in the summary.
    With the clean norm scale: with the ablated one an output-projection bias, no head's, changes its direct effect
    through the scale alone, which the head basis leaves to the norm's part."""
    model = tiny_models(arch)
    sets = POST_NORM_SETS if describe(model).post_norm else PRE_NORM_SETS
    case = Case("resample", "all", "centered_logit", "clean", 2, "random", seed=3)
    spec = replace(case.spec(COMPONENTS), knockouts=sets, source_seeds=2)
    inputs = case.inputs(prompt_set)
    layers = run_sweep(model, spec, inputs)
    heads = run_sweep(model, replace(spec, response_basis="heads"), inputs)
    n_layers = describe(model).n_layers
    for p, (lp, hp) in enumerate(zip(layers.prompts, heads.prompts, strict=True)):
        for name in ("total_effect", "direct_effect", "compensatory_effect", "norm_response", "unembed_effect"):
            assert getattr(hp, name) == pytest.approx(getattr(lp, name), abs=ATOL), name
        for k, component in enumerate(layers.components):
            for layer in range(n_layers):
                attn = lp.response[k][layers.response_basis.index(f"attn.{layer}")]
                assert _sum_of_heads(heads, k, p, layer) == pytest.approx(attn, abs=ATOL), (component, layer)
                mlp = heads.response_basis.index(f"mlp.{layer}")
                assert hp.response[k][mlp] == pytest.approx(lp.response[k][2 * layer + 1], abs=ATOL)
        for layer in range(n_layers):  # clean writes: the heads leave only the projection's bias out of attn.L
            mlp = heads.response_basis.index(f"mlp.{layer}")
            assert hp.clean_direct_effect[mlp] == pytest.approx(lp.clean_direct_effect[2 * layer + 1], abs=ATOL)
        assert hp.draws is not None and lp.draws is not None and len(hp.draws) == 2
        for hd, ld in zip(hp.draws, lp.draws, strict=True):
            assert hd.compensatory_effect_attn == pytest.approx(ld.compensatory_effect_attn, abs=ATOL)
            assert hd.compensatory_effect_mlp == pytest.approx(ld.compensatory_effect_mlp, abs=ATOL)
    summaries = [summarise(result, 1e-4) for result in (layers, heads)]
    for ls, hs in zip(*(s.components for s in summaries), strict=True):
        assert hs.compensation_attn_mean == pytest.approx(ls.compensation_attn_mean, abs=ATOL), ls.component
        assert hs.compensation_mlp_mean == pytest.approx(ls.compensation_mlp_mean, abs=ATOL), ls.component


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_knockout_sets_in_the_head_basis_match_the_oracle(
    tiny_models: Callable[[str], PreTrainedModel], prompt_set: PromptSet, arch: str  # noqa: F811
) -> None:
    model = tiny_models(arch)
    sets = POST_NORM_SETS if describe(model).post_norm else PRE_NORM_SETS
    ids, targets = prompt_set.token_ids[:2], prompt_set.target_ids[:2]
    for ablation, positions, norm_scale in (("zero", "final", "clean"), ("resample", "all", "ablated")):
        spec = SweepSpec(
            components=("head.1.2",), knockouts=sets, ablation=ablation, positions=positions,  # type: ignore[arg-type]
            norm_scale=norm_scale, metric="logit", response_basis="heads",  # type: ignore[arg-type]
        )
        result = run_sweep(model, spec, SweepInputs(token_ids=ids, target_ids=targets))
        basis = result.response_basis
        for i, prompt in enumerate(result.prompts):
            for k, members in enumerate(sets, start=1):
                expected = oracle_knockout(
                    model, ids[i], list(members), targets[i], ablation, positions, norm_scale,
                    source_ids=ids[1 - i] if ablation == "resample" else None, response_basis="heads",
                )
                where = f"{arch} {ablation}/{positions}/{norm_scale} prompt {i} {'+'.join(members)}"
                for field in ("total_effect", "direct_effect", "unembed_effect", "compensatory_effect",
                              "norm_response"):
                    got = getattr(prompt, field)[k]
                    assert got == pytest.approx(getattr(expected, field), abs=ATOL), f"{where}: {field}"
                assert len(expected.response) == len(basis)
                worst = (torch.tensor(prompt.response[k]) - torch.tensor(expected.response)).abs().max().item()
                assert worst < ATOL, f"{where}: response off by {worst:.2e}"
                inside = [j for j, d in enumerate(basis) if d in members or layer_of(d) in members]
                assert all(prompt.response[k][j] == 0.0 for j in inside), where  # members, a member layer's heads


def test_the_head_basis_is_refused_where_it_has_no_definition() -> None:
    """OLMo 2 with an output-projection bias: the post-norm rescales a bias that is no head's, so the heads would not
    add up to their layer; refused with the reason, at the final position as at every position."""
    from tests.tiny_models import load_tokenizer, make_config, randomize_

    config = make_config("olmo2", vocab_size=len(load_tokenizer()))
    config.attention_bias = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model, 3)
    inputs = SweepInputs(token_ids=[torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])])
    spec = SweepSpec(components=("head.1.0", "mlp.0"), ablation="zero", response_basis="heads")
    with pytest.raises(InputError, match="response_basis 'heads' is not defined"):
        run_sweep(model, spec, inputs)
    assert len(run_sweep(model, replace(spec, response_basis="layers"), inputs).prompts) == 2


TINY = ModelInfo(
    id="tiny", architecture="llama", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, vocab_size=100,
    parallel_blocks=False, source="local",
)


def test_a_final_position_job_with_the_head_basis_resolves_as_a_final_position_job() -> None:
    request = JobRequest(model="tiny", prompts=["a b", "c d"], components=["head.1.2"], response_basis="heads",
                         knockouts=[["attn.0", "head.2.1"]], keep_samples=True)
    spec = resolve(request, {"tiny": TINY}, Settings())
    assert spec.response_basis == "heads" and not spec.per_position
    assert spec.knockouts == [["attn.0", "head.2.1"]] and spec.keep_samples
    per_position = resolve(
        JobRequest(model="tiny", texts=["a b c", "d e f"], positions="all", measure_positions="all",
                   response_basis="heads", ablation="zero"),
        {"tiny": TINY}, Settings(),
    )
    assert per_position.per_position
    reason = "response_basis 'heads' is not defined for this 'olmo2' model"
    refused = msgspec.structs.replace(TINY, head_basis_refusal=reason)
    with pytest.raises(ValidationProblem, match="is not defined") as problem:
        resolve(request, {"tiny": refused}, Settings())
    assert problem.value.field == "response_basis"
    # The result's size counts the heads: 3 layers × (4 heads + 1) basis entries per pair instead of 3 × 2.
    pairs = 2 * 2  # prompts × (components + sets), with one resample sample
    layers_only = pairs * (3 * 2 + 8 + 1 * (2 * 3 + 3))
    small = Settings(max_result_values=layers_only + 1)
    resolve(msgspec.structs.replace(request, response_basis="layers"), {"tiny": TINY}, small)
    with pytest.raises(ValidationProblem, match="the result would hold"):
        resolve(request, {"tiny": TINY}, small)


# --- through the real stack -----------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "My favourite colour is"]
SETS = [["attn.0", "head.2.1"]]


def test_a_head_basis_job_serves_the_engines_numbers_and_draws(
    live_url: str, llama: tuple[Any, Any]
) -> None:
    components = ["head.1.2", "attn.1", "mlp.0"]
    names = [*components, "+".join(SETS[0])]
    with HydraClient(live_url) as hydra:
        job = hydra.submit({
            "model": "tiny-llama", "prompts": PROMPTS, "components": components, "knockouts": SETS,
            "response_basis": "heads", "ablation": "resample", "metric": "logit", "seed": 0,
        })
        final = hydra.wait(job.id, poll_s=0.05)
        assert final.status == "succeeded", final.error
        result = hydra.result(job.id)
        assert result.components == names and result.provenance.spec.response_basis == "heads"
        assert all(p.positions is None for p in result.prompts)  # a final-position result, not a per-position one

        model, tokenizer = llama  # the stack's tiny Llama, loaded independently (tests/patch_fixtures.py)
        ids = [torch.tensor(tokenizer(p).input_ids) for p in PROMPTS]
        spec = SweepSpec(components=tuple(components), knockouts=tuple(tuple(s) for s in SETS), ablation="resample",
                         metric="logit", seed=0, response_basis="heads")
        engine = run_sweep(model, spec, SweepInputs(token_ids=ids))
        assert result.response_basis == engine.response_basis
        assert len(result.response_basis) == 3 * (4 + 1) and result.response_basis[:5] == [
            "head.0.0", "head.0.1", "head.0.2", "head.0.3", "mlp.0"
        ]
        for served, expected in zip(result.prompts, engine.prompts, strict=True):
            assert served.sources == expected.sources
            for field in ("total_effect", "direct_effect", "compensatory_effect", "norm_response",
                          "clean_direct_effect"):
                assert getattr(served, field) == pytest.approx(getattr(expected, field), abs=ATOL), field
            worst = (torch.tensor(served.response) - torch.tensor(expected.response)).abs().max().item()
            assert worst < ATOL, f"response off by {worst:.2e}"
        matrix = result.summary.response_matrix
        assert len(matrix) == len(names) and all(len(row) == len(result.response_basis) for row in matrix)
        mean = [sum(p.response[0][d] for p in engine.prompts) / len(PROMPTS) for d in range(len(result.response_basis))]
        assert matrix[0] == pytest.approx(mean, abs=ATOL)
        assert all(math.isfinite(c.compensation_attn_mean) for c in result.summary.components)

        responses = result.to_pandas("response_mean")
        assert set(responses["response_component"]) == set(result.response_basis)
        assert len(responses) == len(names) * len(result.response_basis)

        for name in ABLATION_FIGURES:
            if name in ("self_repair", "profile"):
                continue
            assert hydra.figure(job.id, name, "png")[:8] == b"\x89PNG\r\n\x1a\n", name
        profile = httpx.get(f"{live_url}/v1/jobs/{job.id}/figures/profile")
        assert profile.status_code == 400 and "response_basis 'layers'" in profile.json()["detail"]
