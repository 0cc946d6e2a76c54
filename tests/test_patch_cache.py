"""Patching jobs take their pairs' clean and corrupted runs from the model's clean-run cache (worker/engine/clean.py).

Through the worker's own chunk path (execute_chunk, merge_chunks) on a model loaded as the worker loads it: the
model's forward passes are counted by a hook on the model itself (the patched runs drive its blocks, not its
forward; so do the ablated runs of an ablation job), and every number is compared with the same job on a copy of
the model whose cache keeps nothing (every pass runs), within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import msgspec
import pytest
from transformers import PreTrainedModel

from hydra_ablate_client.wire import JobRequest, JobResult, JobSpec
from service.core.chunk_book import plan_chunks
from service.core.settings import Settings
from tests.checks import present
from tests.engine_fixtures import tiny_model_dir, tiny_models  # noqa: F401 (fixtures)
from tests.numbers import assert_same_numbers
from tests.patch_fixtures import tiny_ioi, wire_pairs
from tests.test_patching import CLEAN, CORRUPTED, _ids
from tests.tiny_models import TINY_ARCHS
from worker.model_cache import LoadedModel
from worker.model_sources import ModelSource

# Every kind of site, a head's query and pattern among them (a pattern is the source's, made per job).
SITES = ["resid_pre.0", "attn.1", "mlp.2", "head.1.2", "head.0.1.q", "head.2.3.pattern"]


@pytest.fixture()
def source(tiny_model_dirs: dict[str, str]) -> ModelSource:
    return ModelSource(id="tiny-llama", location=tiny_model_dirs["tiny-llama"])


def _spec(source: ModelSource, body: dict[str, Any]) -> JobSpec:
    from service.core.resolve import resolve
    from worker.model_cache import model_info

    request = msgspec.convert({"model": "tiny-llama", **body}, JobRequest)
    return resolve(request, {"tiny-llama": model_info(source)}, Settings())


def _run(loaded: LoadedModel, spec: JobSpec, chunk: int = 2) -> JobResult:
    """The job in chunks of `chunk` pairs (or prompts), as the worker runs and merges them."""
    from worker.chunk_execution import execute_chunk, merge_chunks

    plan = plan_chunks(len(spec.prompts), chunk)
    return merge_chunks("job", spec, [execute_chunk("job", spec, loaded, c.index, c.start, c.stop) for c in plan])


@contextmanager
def forward_passes(loaded: LoadedModel) -> Iterator[list[int]]:
    """Counts the model's forward calls (one per clean or corrupted run) while the block runs."""
    calls: list[int] = []
    handle = loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def _patching_numbers(result: JobResult) -> Any:
    patching = present(result.patching)
    return msgspec.to_builtins([patching.pairs, patching.summary])


@pytest.mark.parametrize("positions", ["final", "all"])
def test_a_second_patching_job_runs_no_clean_or_corrupted_pass(source: ModelSource, positions: str) -> None:
    """The first job runs each distinct prompt's pass once (its chunks share them); a second job over the same pairs
    (the other direction too: a prompt's run is the same in either role) runs none; the numbers are those of a
    model whose cache keeps nothing, which runs both passes of every pair in every job."""
    from worker.model_cache import load_model

    cached, uncached = load_model(source), load_model(source)
    uncached.clean_runs.max_bytes = 0
    pairs = tiny_ioi(cached.tokenizer, 3, seed=1)
    distinct = len({text for p in pairs for text in (p.clean, p.corrupted)})
    sites = SITES if positions == "final" else ["resid_pre.1", "head.0.1.q", "head.2.3.pattern"]  # × every position
    body = {"intervention": "patch", "pairs": wire_pairs(pairs), "components": sites, "positions": positions, "seed": 3}
    denoise, noise = _spec(source, body), _spec(source, {**body, "direction": "noise"})

    with forward_passes(cached) as first:
        first_result = _run(cached, denoise)
    with forward_passes(cached) as second:
        second_result = _run(cached, denoise)
    with forward_passes(cached) as other_direction:
        noise_result = _run(cached, noise)
    assert len(first) == distinct
    assert second == [] and other_direction == []
    assert len(cached.clean_runs) == distinct and cached.clean_runs.bytes <= cached.clean_runs.max_bytes

    with forward_passes(uncached) as fresh:
        want_denoise = _run(uncached, denoise)
        want_noise = _run(uncached, noise)
    assert len(fresh) == 2 * 2 * len(pairs)  # two jobs, two passes per pair
    assert len(uncached.clean_runs) == 0
    for got in (first_result, second_result):
        assert_same_numbers(_patching_numbers(got), _patching_numbers(want_denoise))
    assert_same_numbers(_patching_numbers(noise_result), _patching_numbers(want_noise))


def test_patching_runs_share_the_caches_byte_budget(source: ModelSource) -> None:
    """A cache with room for two runs keeps at most two (least recently used out): the second job runs its passes
    again, and its numbers do not change."""
    from worker.model_cache import load_model

    roomy, small = load_model(source), load_model(source)
    drawn = tiny_ioi(roomy.tokenizer, 12, seed=1)

    def length(text: str) -> int:
        return len(roomy.tokenizer(text).input_ids)

    same_length = [p for p in drawn if length(p.clean) == length(drawn[0].clean)][:3]
    assert len(same_length) == 3
    spec = _spec(source, {"intervention": "patch", "pairs": wire_pairs(same_length), "components": ["attn.1"]})
    want = _run(roomy, spec)
    per_run = roomy.clean_runs.bytes // len(roomy.clean_runs)  # the runs of prompts of one length are one size
    small.clean_runs.max_bytes = int(2.5 * per_run)
    with forward_passes(small) as first:
        _run(small, spec)
    with forward_passes(small) as second:
        got = _run(small, spec)
    distinct = len({text for p in same_length for text in (p.clean, p.corrupted)})
    assert len(first) == distinct and len(small.clean_runs) <= 2
    assert small.clean_runs.bytes <= small.clean_runs.max_bytes
    assert len(second) == (0 if distinct <= 2 else distinct)  # cycling through more runs than fit: every one again
    assert_same_numbers(_patching_numbers(got), _patching_numbers(want))


def test_an_ablation_job_takes_its_clean_runs_from_a_patching_jobs_runs(source: ModelSource) -> None:
    """An ablation job (scope "final", heads among its components) over a patching job's clean prompts runs no clean
    pass of its own: a patching run holds what its clean run holds, from the same forward call, and serves it without
    a second entry. The numbers equal those of the ablation job on a model that never ran the patching job."""
    from worker.model_cache import load_model

    shared, alone = load_model(source), load_model(source)
    pairs = tiny_ioi(shared.tokenizer, 4, seed=2)
    _run(shared, _spec(source, {"intervention": "patch", "pairs": wire_pairs(pairs), "components": ["mlp.1"]}))
    entries = len(shared.clean_runs)
    ablation = _spec(source, {"prompts": [p.clean for p in pairs], "components": ["attn.0", "mlp.1", "head.1.2"],
                              "resample_samples": 2, "seed": 5})
    assert ablation.positions == "final" and ablation.ablation == "resample"
    with forward_passes(shared) as passes:
        got = _run(shared, ablation)
    assert passes == [] and len(shared.clean_runs) == entries  # served by the patching runs, nothing added
    with forward_passes(alone) as fresh:
        want = _run(alone, ablation)
    assert len(fresh) == len(pairs)
    assert_same_numbers(msgspec.to_builtins(got.prompts), msgspec.to_builtins(want.prompts))
    assert_same_numbers(msgspec.to_builtins(got.summary), msgspec.to_builtins(want.summary))
    # Scope "all" is another clean run (computed without a key/value cache): it runs its own passes.
    everywhere = msgspec.structs.replace(ablation, positions="all")
    with forward_passes(shared) as passes:
        _run(shared, everywhere)
    assert len(passes) == len(pairs)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_patching_run_serves_the_very_clean_run_of_its_prompt(
    arch: str, tiny_models: Callable[[str], PreTrainedModel]  # noqa: F811
) -> None:
    """On every family: the clean run (scope "final", with and without heads' inputs) that a patching run serves is
    equal, tensor for tensor and bit for bit, to `run_clean`'s own pass; and patching with the cache gives the very
    numbers of patching without it."""
    import torch

    from worker.engine.architecture import describe, head_part_refusal
    from worker.engine.clean import CleanRunCache, run_clean
    from worker.engine.patching import PatchPair, PatchSpec, run_patching

    model = tiny_models(arch)
    arch_ = describe(model)
    pair = PatchPair(_ids(CLEAN), _ids(CORRUPTED), int(_ids(" Mary")[0]), int(_ids(" John")[0]))
    parts = [f"head.1.2.{part}" for part in ("q", "pattern") if head_part_refusal(arch_, part) is None]
    spec = PatchSpec(sites=("resid_pre.1", "attn.0", "mlp.2", "head.1.3", *parts))
    cache = CleanRunCache(max_bytes=1 << 30)
    uncached = run_patching(model, spec, [pair])
    cached = [run_patching(model, spec, [pair], cache=cache) for _ in range(2)]
    assert cache.misses == 2 and cache.hits == 2  # the second run's two prompts came from the cache
    for result in cached:
        assert [p.patched_metric for p in result.pairs] == [p.patched_metric for p in uncached.pairs]
        assert [p.clean_metric for p in result.pairs] == [p.clean_metric for p in uncached.pairs]

    def not_computed() -> Any:
        raise AssertionError("the clean run was not served by the patching run")

    for ids in (pair.clean_ids, pair.corrupted_ids):
        for with_heads in (True, False):
            served = cache.get(ids, False, with_heads, not_computed)
            fresh = run_clean(model, arch_, ids, all_positions=False, with_heads=with_heads)
            for name in ("layer_out", "block_in", "head_in", "x_final", "logits_final", "x_all"):
                got, want = getattr(served, name), getattr(fresh, name)
                assert (got is None) == (want is None), name
                if want is not None:
                    assert got.shape == want.shape and torch.equal(got, want), (arch, name, with_heads)
            assert served.length == fresh.length
            assert len(served.past_keys) == len(fresh.past_keys) == arch_.n_layers
            for got, want in zip([*served.past_keys, *served.past_values], [*fresh.past_keys, *fresh.past_values],
                                 strict=True):
                assert got.shape == want.shape and torch.equal(got, want), arch
        # Scope "all" is a pass without a key/value cache: not served, computed.
        misses = cache.misses
        cache.get(ids, True, True, partial(run_clean, model, arch_, ids, all_positions=True, with_heads=True))
        assert cache.misses == misses + 1
    assert len(cache) == 4  # two patching runs, two runs of scope "all"; the served runs added no entry
