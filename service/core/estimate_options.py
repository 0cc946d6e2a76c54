"""Which jobs may ask for attribution-patching estimates (`estimates`), checked before the job is queued.

The engine (worker/engine/attribution.py) estimates the components of an ablation job from one backward pass per
prompt at the final position, with the exact engine's prompts, targets and replacements; per-position jobs
(worker/engine/position_attribution.py) take one backward pass per measured position, over the prompt's prefix up
to it, and are bounded here (`check_position_estimates`). What the engines cannot do is refused here with a 422
that names the field to change, so that a job never fails on a worker for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

from hydra_ablate_client.vocabulary import EstimateName
from hydra_ablate_client.wire import Verify
from service.core.errors import ValidationProblem

# Backward passes per prompt a per-position job with estimates may need, counted as the result's cost table counts
# them (a pass over the whole prompt counts 1, over a prefix of k of its T tokens k/T) for the longest prompt the
# job allows: (T + 1)/2 when every position is measured, times 1 + (L − 1)/2 with GradDrop (atp_star). The
# rushing_nanda preset (64 tokens, so 63 read, every position) needs 32 with atp, 496 with atp_star on a 30-layer
# model.
MAX_POSITION_BACKWARD_PASSES = 512


def check_estimates(
    estimates: Sequence[EstimateName],
    *,
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


def position_backward_passes(measure_positions: str, length: int, n_layers: int, star: bool) -> float:
    """Backward passes of one prompt the model reads as `length` tokens (MAX_POSITION_BACKWARD_PASSES' count)."""
    passes = (length + 1) / 2 if measure_positions == "all" else 1.0
    return passes * (1.0 + (n_layers - 1) / 2) if star else passes


def check_position_estimates(
    estimates: Sequence[EstimateName],
    *,
    measure_positions: str,
    target: str,
    max_tokens: int | None,
    n_layers: int,
    verify: Verify | None,
) -> None:
    """A per-position job's estimates: refused with a 422 naming `estimates` (or `verify`) when they would need more
    than MAX_POSITION_BACKWARD_PASSES backward passes per prompt. `max_tokens`: the longest prompt the job allows
    (its own max_tokens, or the server's limit per prompt; None or 0 when nothing bounds it)."""
    if not estimates:
        return
    if verify is not None:
        raise ValidationProblem(
            "verify ranks components by their estimates at the final position; a per-position job with estimates "
            "ablates every component exactly: drop verify (or the per-position options)",
            "verify",
        )
    if measure_positions != "all":
        return  # one backward pass per prompt (times GradDrop's), as at the final position
    star = "atp_star" in estimates
    read = 1 if target == "next_token" else 0  # the last token of a text is only a target

    def passes(tokens: int) -> float:
        return position_backward_passes(measure_positions, tokens - read, n_layers, star)

    if not max_tokens:
        raise ValidationProblem(
            "estimates at every measured position take one backward pass per position: give max_tokens to bound "
            f"them (at most {MAX_POSITION_BACKWARD_PASSES} backward passes per prompt)",
            "estimates",
        )
    needed = passes(max_tokens)
    if needed <= MAX_POSITION_BACKWARD_PASSES:
        return
    fits = max((t for t in range(2, max_tokens) if passes(t) <= MAX_POSITION_BACKWARD_PASSES), default=None)
    method = "atp_star (GradDrop: 1 + (L − 1)/2 times as many)" if star else "atp"
    raise ValidationProblem(
        f"estimates at every measured position take one backward pass per position over its prefix: {needed:g} per "
        f"prompt with {method} for prompts of up to {max_tokens} tokens on this {n_layers}-layer model, above this "
        f"server's limit of {MAX_POSITION_BACKWARD_PASSES}: "
        + (f"lower max_tokens to {fits} or less, " if fits is not None else "")
        + "use measure_positions 'final'"
        + (", or ask for atp only" if star else ""),
        "estimates",
    )


def check_patch_estimates(
    estimates: Sequence[EstimateName], *, knockouts: Sequence[Sequence[str]]
) -> list[EstimateName]:
    """The methods of a patching job's `estimates` in the engine's order (worker/engine/patch_attribution.py covers
    every site kind at both position scopes), or ValidationProblem saying what to change."""
    if not estimates:
        return []
    if knockouts:
        raise ValidationProblem(
            "estimates cover single sites (resid_pre.L, attn.L, mlp.L, head.L.H and its q, k, v and pattern), not "
            "knockout sets: drop knockouts or estimates, or submit the sets as a job of their own",
            "estimates",
        )
    return check_estimates(estimates, knockouts=[], resample_sources="any")


def patch_estimate_values(estimates: Sequence[EstimateName]) -> int:
    """Numbers the estimates add to a patching result per (pair, site, position): effect, atp and its score, and
    with atp_star also atp_qkfix, atp_star and their scores."""
    if not estimates:
        return 0
    return 7 if "atp_star" in estimates else 3


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
