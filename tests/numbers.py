"""Comparing results of computations that are equal in exact arithmetic but not necessarily in float32.

Results computed with other batch compositions, chunk splits, processes or thread counts may differ in the last
float32 bits (matrix products reduce in other orders; CPUs differ), so they are compared within FLOAT_TOLERANCE,
relative to the value's size. Everything that is not a float (targets, sources, structure, counts) must be equal.
Only truly identical computations (same inputs, same batches, same process) may be compared exactly.
"""

from __future__ import annotations

from typing import Any

# Prompts batched together at the final position share matrix products, so a different split into chunks changes
# float32 rounding (never more than ~1e-6 seen); docs/operations/scaling-and-faults.md states chunked = unchunked up
# to 1e-5.
FLOAT_TOLERANCE = 1e-5
# A permutation p-value counts the permuted slopes at least as large as the observed one: a permuted slope within
# float32 rounding of the observed one is counted in one computation and not in the other, moving p by a whole
# count, 1 / (N + 1) (times the number of components after Holm's adjustment). Compared within two counts so.
PERMUTATION_P = ("permutation_p", "permutation_p_holm")
PERMUTATION_COUNTS = 2


def assert_same_numbers(got: Any, want: Any, path: str = "", tolerance: float = FLOAT_TOLERANCE) -> None:
    """Recursively: floats within `tolerance · (1 + |want|)`, everything else equal."""
    if isinstance(want, float) and isinstance(got, float):
        assert abs(got - want) <= tolerance * (1 + abs(want)), (path, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            if key in PERMUTATION_P and isinstance(want[key], float) and isinstance(got[key], float):
                _assert_same_permutation_p(got[key], want[key], want, f"{path}.{key}")
                continue
            assert_same_numbers(got[key], want[key], f"{path}.{key}", tolerance)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_numbers(g, w, f"{path}[{index}]", tolerance)
    else:
        assert got == want, (path, got, want)


def _assert_same_permutation_p(got: float, want: float, fit: dict[str, Any], path: str) -> None:
    n_perm = fit.get("n_permutations") or 0
    assert n_perm > 0, (path, "a permutation p-value without its number of permutations")
    # Holm multiplies by at most the number of tests, which n_permutations grows with (worker/fit_statistics.py:
    # N ≥ 2m/α − 1), so m ≤ (N + 1)·α/2 ≤ N; the unadjusted p moves by one count.
    steps = PERMUTATION_COUNTS * (1 if path.endswith("permutation_p") else max(1, (n_perm + 1) // 40))
    assert abs(got - want) <= steps / (n_perm + 1) + 1e-12, (path, got, want, n_perm)
