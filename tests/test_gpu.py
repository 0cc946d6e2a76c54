"""The engine on CUDA: every family against the float32 oracle (run on the CPU) at 1e-4 in float32, bfloat16 and
float16 within the tolerance documented in README "Precision", and the memory behaviour on a real device.

Marked `gpu`; skipped, with the reason, where torch sees no CUDA device. `bash bench/gpu_run.sh` runs them first.
`HYDRA_GPU_DEVICE=cpu` runs the same tests on the CPU (bench/gpu_dry_run.sh does, to rehearse a GPU run); the
memory tests need CUDA's allocator and are skipped there with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.engine_fixtures import PromptSet, prompt_set, tiny_model_dir  # noqa: F401 (fixtures)
from tests.numbers import assert_same_numbers
from tests.oracle import oracle_sweep
from tests.test_engine_oracle import ATOL, CASE_IDS, CASES, Case, compare_results
from tests.test_reduced_precision import TOLERANCE
from tests.tiny_models import TINY_ARCHS, load_tiny_model, refusal
from worker.engine.architecture import describe
from worker.engine.memory import BatchDoesNotFit, device_batch_tokens
from worker.engine.sweep import run_sweep
from worker.engine.types import SweepInputs, SweepSpec

# The device under test: CUDA, or the CPU for a dry run of the GPU session (bench/gpu_dry_run.sh).
CUDA = torch.device(os.environ.get("HYDRA_GPU_DEVICE", "").strip() or "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        CUDA.type == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA GPU here (torch.cuda.is_available() is False)",
    ),
]
needs_cuda_allocator = pytest.mark.skipif(
    CUDA.type != "cuda", reason=f"caps CUDA's allocator (HYDRA_GPU_DEVICE={CUDA}); tests/test_memory.py covers the CPU"
)


@pytest.fixture(autouse=True)
def _exact_float32() -> Iterator[None]:
    """TF32 would round float32 matrix products to 10 mantissa bits; the 1e-4 comparison needs IEEE float32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


_ORACLE: dict[tuple[str, str], object] = {}


def skip_if_refused(arch: str) -> None:
    """The GPU machine's transformers may be older than CI's: a family the engine refuses there (with the reason,
    as a worker would) is skipped with that reason rather than failed."""
    reason = refusal(arch)
    if reason is not None:
        pytest.skip(reason)


def _on(inputs: SweepInputs, device: torch.device) -> SweepInputs:
    def move(ids: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        return None if ids is None else [t.to(device) for t in ids]

    return SweepInputs(
        token_ids=move(inputs.token_ids) or [],
        target_ids=inputs.target_ids,
        counterfactual_ids=inputs.counterfactual_ids,
        mean_reference_ids=move(inputs.mean_reference_ids),
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cuda_float32_matches_the_oracle(
    tiny_model_dir: Callable[[str], Path], prompt_set: PromptSet, arch: str, case: Case  # noqa: F811
) -> None:
    skip_if_refused(arch)
    path = tiny_model_dir(arch)
    # transformers wraps `to` with functools.wraps: mypy takes the first argument for self
    model = load_tiny_model(path).to(CUDA)  # type: ignore[arg-type]
    engine = run_sweep(model, case.spec(), _on(case.inputs(prompt_set), CUDA))
    sources = [list(p.sources) for p in engine.prompts] if case.resample_from == "random" else None
    oracle = oracle_sweep(load_tiny_model(path), case.spec(), case.inputs(prompt_set), sources=sources)
    bad = compare_results(engine, oracle, ATOL)
    assert not bad, f"{arch} {case.id} on CUDA: {len(bad)} disagreements:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cuda_reduced_precision_within_the_documented_tolerance(
    tiny_model_dir: Callable[[str], Path], prompt_set: PromptSet, arch: str, dtype: torch.dtype  # noqa: F811
) -> None:
    skip_if_refused(arch)
    path = tiny_model_dir(arch)
    spec = SweepSpec(components=("attn.0", "mlp.1", "head.1.2", "attn.2"), metric="logit")
    reference = oracle_sweep(load_tiny_model(path), spec, SweepInputs(token_ids=prompt_set.token_ids))
    targets = [p.target_id for p in reference.prompts]
    # transformers wraps `to` with functools.wraps: mypy takes the first argument for self
    model = load_tiny_model(path).to(device=CUDA, dtype=dtype)  # type: ignore[call-arg]
    reduced = run_sweep(model, spec, _on(SweepInputs(token_ids=prompt_set.token_ids, target_ids=targets), CUDA))
    scale = 1 + max(abs(p.clean_metric) for p in reference.prompts)
    for field in ("total_effect", "direct_effect"):
        got = torch.tensor([getattr(p, field) for p in reduced.prompts])
        want = torch.tensor([getattr(p, field) for p in reference.prompts])
        assert (got - want).abs().max() <= TOLERANCE[dtype] * scale, (field, float((got - want).abs().max()))


def _mid_sized_llama() -> torch.nn.Module:
    """A random Llama of about 0.3 GB in float32, big enough for batches to need real memory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    with torch.device(CUDA):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture
def _memory_cap() -> Iterator[Callable[[int], None]]:
    """Cap this process's CUDA memory at the model plus `extra` bytes (a real allocator limit), then lift it."""

    def cap(extra: int) -> None:
        total = torch.cuda.get_device_properties(CUDA).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + extra) / total), CUDA)

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    torch.cuda.empty_cache()


@needs_cuda_allocator
def test_cuda_out_of_memory_halves_the_batch_and_keeps_the_numbers(
    prompt_set: PromptSet, _memory_cap: Callable[[int], None]  # noqa: F811
) -> None:
    model = _mid_sized_llama()
    components = tuple(f"{k}.{layer}" for layer in range(8) for k in ("attn", "mlp"))
    spec = SweepSpec(components=components, resample_samples=3)
    inputs = _on(SweepInputs(token_ids=prompt_set.token_ids), CUDA)
    reference = run_sweep(model, spec, inputs, batch_tokens=64)  # small batches: fits anywhere
    _memory_cap(96 * 2**20)  # 96 MiB beyond the model: a 1M-token batch cannot fit, small ones can
    halved = run_sweep(model, spec, inputs, batch_tokens=1 << 20)
    assert_same_numbers([asdict(p) for p in halved.prompts], [asdict(p) for p in reference.prompts], tolerance=1e-4)


@needs_cuda_allocator
def test_cuda_a_job_that_cannot_fit_fails_with_the_reason(
    prompt_set: PromptSet, _memory_cap: Callable[[int], None]  # noqa: F811
) -> None:
    model = _mid_sized_llama()
    inputs = _on(SweepInputs(token_ids=prompt_set.token_ids), CUDA)
    _memory_cap(1 * 2**20)
    with pytest.raises(BatchDoesNotFit, match="memory"):
        run_sweep(model, SweepSpec(components=("mlp.3",)), inputs, batch_tokens=None)


@needs_cuda_allocator
def test_cuda_budget_comes_from_free_memory() -> None:
    model = _mid_sized_llama()
    arch = describe(model)
    free = torch.cuda.mem_get_info(CUDA)[0]
    tokens = device_batch_tokens(arch, CUDA, torch.float32, 20, False)
    assert tokens > 8192 or free < 8 * 2**30  # a large GPU gets far more than the CPU default
    assert device_batch_tokens(arch, CUDA, torch.bfloat16, 20, False) >= tokens  # half the bytes per row-token
