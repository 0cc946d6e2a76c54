"""The engine on the real Gemma-3-270M (the built-in `gemma-3-270m`, loaded by the worker's own path from its
converted copy) against the brute-force oracle (tests/oracle.py), CPU, float32.

Tolerance: 1e-4 × (1 + |clean metric|), the largest clean metric of the case (Gemma's raw logits are ~20): TE, DE,
Δunembed, CE, the norm's part, every response, Δ̃unembed(k, k) (`ablated_unembed_effect`), per patch too.
(The converted copy holds exactly the GGUF's de-quantised weights: checked once when it is made, and its logits
equal the GGUF path's to 0.0.)

A covering set, not the product of every option: each case below runs a few prompts and components, and together
they take every ablation kind (resample with random sources, mean, zero), final and every position (ablated and
measured), both response bases (layers, heads), both norm scales, several metrics, layer and head components
(post-norm heads: Gemma 3 wraps attention and MLP in pre- and post-norms). The whole file takes 20 s to a minute on
2 CPU cores (several minutes when the machine is shared: the oracle reads the 262k × 640 unembedding in float64),
after the one-time conversion: the model loads in seconds from its converted copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.oracle import oracle_position_sweep, oracle_sweep
from tests.test_engine_oracle import compare_results
from worker.builtin_models import GEMMA, GEMMA_GGUF_SHA256
from worker.engine.position_sweep import run_position_sweep
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec
from worker.model_cache import LoadedModel, load_model, model_info
from worker.model_sources import parse_source

# CI runs the model-list check and the first final-position case (resample from random sources, the hydra
# preset's ablation); `scripts/test.sh --all` runs every case.
SLOW = pytest.mark.slow

PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Toko Yasuda, who plays the",
)
ANSWERS = (" Paris", " French", " guitar")
POSITION_FIELDS = ("total_effect", "direct_effect", "unembed_effect", "compensation", "norm_response", "response",
                   "ablated_unembed_effect")


@pytest.fixture(scope="module")
def gemma() -> Iterator[LoadedModel]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    # The worker's own path: the built-in source (the converted copy scripts/setup.sh makes), loaded as a job would.
    yield load_model(parse_source("gemma-3-270m"))
    torch.set_num_threads(before)


def _ids(loaded: LoadedModel, texts: tuple[str, ...]) -> list[torch.Tensor]:
    return [torch.tensor(loaded.tokenizer(t).input_ids, dtype=torch.long) for t in texts]


def _answer_ids(loaded: LoadedModel) -> list[int]:
    return [int(loaded.tokenizer(a, add_special_tokens=False).input_ids[0]) for a in ANSWERS]


def test_the_built_in_gemma_is_what_the_model_list_says(gemma: LoadedModel) -> None:
    source = parse_source("gemma-3-270m")
    info = model_info(source)
    assert (info.architecture, info.n_layers, info.n_heads, info.n_kv_heads, info.d_model) == (
        "gemma3_text", 18, 4, 1, 640
    )
    assert info.vocab_size == 262144 and info.source == "builtin" and info.family
    assert info.about == GEMMA.about and "not instruction tuned" in info.about
    assert info.licence is not None and "Gemma Terms of Use" in info.licence
    assert gemma.file_sha256 == GEMMA_GGUF_SHA256  # provenance names the GGUF the copy was made from
    assert bool(gemma.model.config.tie_word_embeddings)
    ids = _ids(gemma, PROMPTS[:1])[0]
    with torch.no_grad():
        logits = gemma.model(ids.view(1, -1)).logits[0, -1]
    assert gemma.tokenizer.decode([int(logits.argmax())]) == " Paris"  # a base model that knows the answer


@dataclass(frozen=True)
class FinalCase:
    ablation: str
    positions: str
    metric: str
    norm_scale: str
    components: tuple[str, ...]
    samples: int = 1
    resample_from: str = "next"
    given_targets: bool = False
    n_prompts: int = 3

    @property
    def id(self) -> str:
        return "-".join([self.ablation, self.positions, self.metric, self.norm_scale, self.resample_from])


FINAL_CASES = (
    FinalCase("resample", "final", "centered_logit", "clean", ("attn.3", "head.8.2", "mlp.9", "mlp.17"),
              resample_from="random", n_prompts=2),
    FinalCase("zero", "all", "logit", "ablated", ("head.5.0", "mlp.6", "attn.12"), given_targets=True, n_prompts=1),
    FinalCase("mean", "final", "logprob", "clean", ("attn.10", "mlp.14"), n_prompts=2),
)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[SLOW] if i else []) for i, c in enumerate(FINAL_CASES)]
)
def test_final_position_measures_match_the_oracle(gemma: LoadedModel, case: FinalCase) -> None:
    spec = SweepSpec(
        components=case.components, ablation=case.ablation, positions=case.positions,  # type: ignore[arg-type]
        metric=case.metric, norm_scale=case.norm_scale, resample_samples=case.samples,  # type: ignore[arg-type]
        resample_from=case.resample_from, seed=3, keep_samples=True,  # type: ignore[arg-type]
    )
    inputs = SweepInputs(
        token_ids=_ids(gemma, PROMPTS[: case.n_prompts]),
        target_ids=_answer_ids(gemma)[: case.n_prompts] if case.given_targets else None,
    )
    engine = run_sweep(gemma.model, spec, inputs)
    oracle = oracle_sweep(gemma.model, spec, inputs, sources=[list(p.sources) for p in engine.prompts])
    atol = 1e-4 * (1 + max(abs(p.clean_metric) for p in oracle.prompts))
    bad = compare_results(engine, oracle, atol=atol)
    assert not bad, f"{case.id} (atol {atol:.1e}): {len(bad)} disagreements:\n" + "\n".join(bad[:20])
    assert any(abs(v) > 1e-3 for p in oracle.prompts for v in p.ablated_unembed_effect) or case.ablation == "zero"


@dataclass(frozen=True)
class PositionCase:
    ablation: str
    metric: str
    target: str
    measure_positions: str
    response_basis: str
    components: tuple[str, ...]


POSITION_CASES = (
    # The head basis reads every head's write by hand at each measured position: measured at the final one here,
    # at every position on the (cheap) layer basis.
    PositionCase("mean", "logit", "next_token", "final", "heads", ("head.4.1", "mlp.13")),
    PositionCase("zero", "centered_logit", "clean_top", "all", "layers", ("attn.2", "head.11.0", "mlp.16")),
)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=f"{c.ablation}-{c.response_basis}", marks=SLOW) for c in POSITION_CASES]
)
def test_per_position_measures_match_the_oracle(gemma: LoadedModel, case: PositionCase) -> None:
    spec = SweepSpec(
        components=case.components, ablation=case.ablation, positions="all", metric=case.metric,  # type: ignore[arg-type]
        norm_scale="clean", resample_samples=1, resample_from="random", seed=5,
        measure_positions=case.measure_positions, target=case.target,  # type: ignore[arg-type]
        response_basis=case.response_basis,  # type: ignore[arg-type]
    )
    # One short prompt: every position of every run is read on the full 262k vocabulary by hand (resample at every
    # position is covered on the tiny Gemma 3 in tests/test_position_oracle.py, and at the final position here).
    inputs = SweepInputs(token_ids=_ids(gemma, PROMPTS[2:]))
    engine = run_position_sweep(gemma.model, spec, inputs)
    oracle: dict[str, Any] = oracle_position_sweep(gemma.model, spec, inputs)
    atol = 1e-4 * (1 + max(float(p["clean_metric"].abs().max()) for p in oracle["prompts"]))
    bad = []
    for i, (e, o) in enumerate(zip(engine.prompts, oracle["prompts"], strict=True)):
        assert e.positions == o["positions"] and e.target_ids.tolist() == o["target_ids"].tolist()
        for name in (*POSITION_FIELDS, "clean_metric", "clean_direct_effect"):
            diff = float((getattr(e, name).double() - o[name]).abs().max())
            if not diff <= atol:
                bad.append(f"prompt {i} {name}: max |engine − oracle| = {diff:.2e}")
        ce = o["response"].sum(dim=1)  # the oracle's responses summed: its CE
        diff = float((e.compensatory_effect.double() - ce).abs().max())
        if not diff <= atol:
            bad.append(f"prompt {i} compensatory_effect: max |engine − oracle| = {diff:.2e}")
    assert not bad, f"atol {atol:.1e}:\n" + "\n".join(bad)
