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


def assert_same_numbers(got: Any, want: Any, path: str = "", tolerance: float = FLOAT_TOLERANCE) -> None:
    """Recursively: floats within `tolerance · (1 + |want|)`, everything else equal."""
    if isinstance(want, float) and isinstance(got, float):
        assert abs(got - want) <= tolerance * (1 + abs(want)), (path, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            assert_same_numbers(got[key], want[key], f"{path}.{key}", tolerance)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_numbers(g, w, f"{path}[{index}]", tolerance)
    else:
        assert got == want, (path, got, want)
