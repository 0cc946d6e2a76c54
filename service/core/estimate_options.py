"""Which jobs may ask for attribution-patching estimates (`estimates`), checked before the job is queued.

The engine (worker/engine/attribution.py) estimates the components of an ablation job from one backward pass per
prompt at the final position, with the exact engine's prompts, targets and replacements. What it cannot do is
refused here with a 422 that names the field to change, so that a job never fails on a worker for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

from hydra_ablate_client.vocabulary import EstimateName
from hydra_ablate_client.wire import Verify
from service.core.errors import ValidationProblem


def check_estimates(
    estimates: Sequence[EstimateName],
    *,
    per_position: bool,
    knockouts: Sequence[Sequence[str]],
    resample_sources: str,
) -> list[EstimateName]:
    """The requested methods in the engine's order (atp, atp_star), or ValidationProblem saying what to change."""
    if not estimates:
        return []
    repeated = sorted({name for name in estimates if list(estimates).count(name) > 1})
    if repeated:
        raise ValidationProblem(
            f"estimates names {', '.join(repr(r) for r in repeated)} twice: name each method once", "estimates"
        )
    if per_position:
        raise ValidationProblem(
            "estimates read the metric at the final position (one backward pass per prompt): drop the per-position "
            "options (measure_positions 'all', target 'next_token') or the estimates",
            "estimates",
        )
    if knockouts:
        raise ValidationProblem(
            "estimates cover single components (attn.L, mlp.L, head.L.H), not knockout sets: drop knockouts or "
            "estimates, or submit the sets as a job of their own",
            "estimates",
        )
    if resample_sources != "any":
        raise ValidationProblem(
            f"estimates are not available with resample_sources {resample_sources!r} (the estimates draw their "
            "resample sources without the prompts' clean top tokens): use resample_sources 'any' or drop estimates",
            "resample_sources",
        )
    return [name for name in get_args(EstimateName) if name in estimates]


def estimate_values(estimates: Sequence[EstimateName]) -> int:
    """Numbers the estimates add to a result per (prompt, component): atp and abs_total_effect, and with atp_star
    also atp_qkfix and atp_star (the result-size check counts them)."""
    if not estimates:
        return 0
    return 4 if "atp_star" in estimates else 2


def check_verify(verify: Verify | None, *, estimates: Sequence[EstimateName], n_components: int) -> Verify | None:
    """`verify` as given, or ValidationProblem naming `verify` with what to change."""
    if verify is None:
        return None
    if not estimates:
        raise ValidationProblem(
            "verify picks the components to run exactly from the estimates: add estimates (e.g. [\"atp\"]) or drop "
            "verify",
            "verify",
        )
    if verify.top < 0 or verify.random < 0:
        raise ValidationProblem(
            f"verify top ({verify.top}) and random ({verify.random}) count components: use 0 or more", "verify"
        )
    if verify.top + verify.random < 1:
        raise ValidationProblem("verify top + random is 0, so nothing would run exactly: ask for 1 or more", "verify")
    if verify.top + verify.random > n_components:
        raise ValidationProblem(
            f"verify asks for top {verify.top} + random {verify.random} = {verify.top + verify.random} components, "
            f"but the job has {n_components}: lower top or random, or drop verify to run every component exactly",
            "verify",
        )
    return verify
