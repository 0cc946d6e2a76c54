"""Activation patching (worker/engine/patching.py) against the one-forward-per-patch oracle (tests/patch_oracle.py)
on a tiny random model of every architecture family: every site kind the family supports, both directions, both
position scopes; and the refusals (unequal lengths, unknown sites, q/k/v a family does not expose)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

from tests.engine_fixtures import tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.patch_oracle import oracle_patching
from tests.tiny_models import TINY_ARCHS, load_tokenizer
from worker.engine.architecture import describe, head_part_refusal
from worker.engine.errors import InputError
from worker.engine.patching import PatchPair, PatchSpec, patching_score, run_patching

ATOL = 1e-4

# Same number of tokens on the SmolLM2 tokenizer (checked below): 8, more than the tiny models' sliding window (6).
CLEAN = "Then Mary and John ate, John thanked"
CORRUPTED = "Then Alice and Bob ate, Carl thanked"
ANSWER, COUNTERFACTUAL = " Mary", " John"


def _ids(text: str) -> torch.Tensor:
    return torch.tensor(load_tokenizer()(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _pair() -> PatchPair:
    clean, corrupted = _ids(CLEAN), _ids(CORRUPTED)
    assert clean.shape == corrupted.shape, (clean.shape, corrupted.shape)
    return PatchPair(clean, corrupted, int(_ids(ANSWER)[0]), int(_ids(COUNTERFACTUAL)[0]))


def _sites(model: PreTrainedModel, positions: str) -> list[str]:
    """At the final position: every layer site, two heads' outputs and each head part the family supports (on two
    layers). At every position (one oracle pass per site × position): one site of each kind, on a middle layer."""
    arch = describe(model)
    parts = [part for part in ("q", "k", "v", "pattern") if head_part_refusal(arch, part) is None]
    assert "pattern" in parts  # every family's patterns can be patched
    if positions == "all":
        return ["resid_pre.1", "attn.1", "mlp.0", "head.1.3", *(f"head.1.2.{part}" for part in parts)]
    sites = [f"{kind}.{layer}" for layer in range(arch.n_layers) for kind in ("resid_pre", "attn", "mlp")]
    sites += ["head.0.1", "head.2.3"]
    sites += [f"head.{layer}.2.{part}" for part in parts for layer in (0, 2)]
    return sites


def _knockouts(model: PreTrainedModel) -> tuple[tuple[str, ...], ...]:
    """Sets of sites patched together: across layers, two heads of one layer, and a head part with its layer."""
    arch = describe(model)
    sets: list[tuple[str, ...]] = [("resid_pre.1", "attn.2"), ("head.0.1", "head.0.3", "mlp.2")]
    if head_part_refusal(arch, "v") is None:
        sets.append(("head.1.0.v", "head.2.2", "mlp.1"))
    sets.append(("head.1.1.pattern", "head.1.3.pattern", "head.2.0.pattern"))
    return tuple(sets)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_patching_matches_oracle(arch: str, tiny_models: Callable[[str], PreTrainedModel]) -> None:  # noqa: F811
    model = tiny_models(arch)
    pair = _pair()
    for direction in ("denoise", "noise"):
        for positions in ("final", "all"):
            sites = _sites(model, positions)
            knockouts = _knockouts(model)
            spec = PatchSpec(
                sites=tuple(sites), direction=direction, positions=positions,  # type: ignore[arg-type]
                knockouts=knockouts,
            )
            # A small batch so that several batches per position are exercised.
            result = run_patching(model, spec, [pair], batch_rows=7)
            assert result.sites == [*sites, *("+".join(members) for members in knockouts)]
            clean, corrupted, patched = oracle_patching(
                model, pair.clean_ids, pair.corrupted_ids, pair.answer_id, pair.counterfactual_id, sites,
                direction, positions, [list(members) for members in knockouts],
            )
            got = result.pairs[0]
            assert got.clean_metric == pytest.approx(clean, abs=ATOL)
            assert got.corrupted_metric == pytest.approx(corrupted, abs=ATOL)
            expected = torch.tensor(patched)
            actual = torch.tensor(got.patched_metric, dtype=torch.float64)
            worst = (actual - expected).abs().max().item()
            assert worst < ATOL, f"{arch} {direction} {positions}: worst |engine − oracle| = {worst:.2e}"
            for row, scores in zip(got.patched_metric, got.patching_score, strict=True):
                for value, score in zip(row, scores, strict=True):
                    expected_score = patching_score(value, got.clean_metric, got.corrupted_metric, direction, 1e-3)
                    assert score == pytest.approx(expected_score)


def test_scores_are_normalised_and_flagged(tiny_models: Callable[[str], PreTrainedModel]) -> None:  # noqa: F811
    model = tiny_models("llama")
    pair = _pair()
    n = describe(model).n_layers
    # resid_pre.0 at every position carries the whole source prompt: the patched run is the source run.
    result = run_patching(model, PatchSpec(sites=("resid_pre.0",), positions="all"), [pair])
    got = result.pairs[0]
    assert not got.flagged
    assert got.patching_score[0][0] is not None
    # Patching only the final position's residual stream at the last layer still leaves earlier positions corrupted,
    # but resid_pre.0 at the position where the prompts differ moves the metric; the scores are exact fractions.
    for value, score in zip(got.patched_metric[0], got.patching_score[0], strict=True):
        expected = (value - got.corrupted_metric) / (got.clean_metric - got.corrupted_metric)
        assert score == pytest.approx(expected)
    # A pair whose prompts are the same has clean == corrupted: flagged, no score, never a division by ~0.
    same = PatchPair(pair.clean_ids, pair.clean_ids.clone(), pair.answer_id, pair.counterfactual_id)
    flat = run_patching(model, PatchSpec(sites=(f"mlp.{n - 1}",)), [same])
    assert flat.pairs[0].flagged and flat.pairs[0].patching_score == [[None]] and flat.pooled_score == [[None]]
    # The pooled score is the score of the pairs' mean metrics (the flagged pair included in the means).
    both = run_patching(model, PatchSpec(sites=("attn.1", "mlp.2")), [pair, same])
    clean = sum(p.clean_metric for p in both.pairs) / 2
    corrupted = sum(p.corrupted_metric for p in both.pairs) / 2
    assert both.pooled_score is not None
    for k in range(2):
        patched = sum(p.patched_metric[k][0] for p in both.pairs) / 2
        assert both.pooled_score[k][0] == pytest.approx((patched - corrupted) / (clean - corrupted))
    # Every position of pairs of different lengths: no common columns, no pooled score.
    shorter = PatchPair(pair.clean_ids[1:], pair.corrupted_ids[1:], pair.answer_id, pair.counterfactual_id)
    assert run_patching(model, PatchSpec(sites=("attn.1",), positions="all"), [pair, shorter]).pooled_score is None
    # The final position lines up whatever the lengths.
    final = run_patching(model, PatchSpec(sites=("attn.1",)), [pair, shorter])
    assert final.pooled_score is not None and final.pooled_score[0][0] is not None


def test_refusals_say_what_to_change(tiny_models: Callable[[str], PreTrainedModel]) -> None:  # noqa: F811
    pair = _pair()
    llama = tiny_models("llama")
    short = PatchPair(pair.clean_ids, pair.corrupted_ids[:-2], pair.answer_id, pair.counterfactual_id)
    with pytest.raises(InputError, match=r"clean prompt has \d+ tokens and the corrupted one \d+"):
        run_patching(llama, PatchSpec(sites=("attn.0",)), [short])
    cases = [
        ("llama", "head.0.0.k", "shared by groups of 2 query heads"),
        ("llama", "head.0.9", "head 9 out of range"),
        ("llama", "resid_pre.7", "layer 7 out of range"),
        ("llama", "resid_post.0", "bad patching site"),
        ("gpt2", "head.0.0.q", "fused projection"),
        ("gpt_neox_parallel", "head.0.0.v", "fused"),
        ("phi3", "head.0.0.q", "fused"),
        ("olmo2", "head.0.0.q", "over all heads together"),
    ]
    for arch, site, reason in cases:
        with pytest.raises(InputError, match=reason):
            run_patching(tiny_models(arch), PatchSpec(sites=(site,)), [pair])
    for knockouts, reason in [((("attn.0", "attn.0"),), "names 'attn.0' twice"), (((),), "is empty"),
                              ((("mlp.0", "head.0.0.k"),), "shared by groups")]:
        with pytest.raises(InputError, match=reason):
            run_patching(llama, PatchSpec(sites=(), knockouts=knockouts), [pair])


def test_nothing_left_behind(tiny_models: Callable[[str], PreTrainedModel]) -> None:  # noqa: F811
    """A worker keeps its model for many jobs: no hook stays registered, the attention implementation is restored."""
    model = tiny_models("qwen2")
    before = model.config._attn_implementation
    sites = ("resid_pre.1", "attn.0", "mlp.2", "head.1.1", "head.0.2.q", "head.2.3.k", "head.1.0.v", "head.2.1.pattern")
    run_patching(model, PatchSpec(sites=sites, positions="all"), [_pair()])
    assert model.config._attn_implementation == before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__


def test_site_grammar() -> None:
    from hydra_ablate_client.vocabulary import PatchSite, knockout_name, parse_patch_site

    assert parse_patch_site("resid_pre.12") == PatchSite("resid_pre", 12, None, None)
    assert parse_patch_site("head.3.5") == PatchSite("head", 3, 5, None)
    assert parse_patch_site("head.3.5.pattern") == PatchSite("head", 3, 5, "pattern")
    for bad in ("head.3", "attn.1.2", "mlp", "head.1.2.z", "resid_pre.1\n", "resid_post.0", "head.1.2.q.k"):
        with pytest.raises(ValueError, match="bad patching site"):
            parse_patch_site(bad)
    assert knockout_name(["attn.3", "head.5.1"]) == "attn.3+head.5.1"
