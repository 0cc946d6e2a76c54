"""`source_seeds`: several independent draws of a job's resample sources, checked before the job is queued.

Each prompt gets `source_seeds` draws of `resample_samples` sources, drawn with seeds seed, seed + 1, …; every
measure averages all draws' runs and each draw's own means are kept (PromptResult.draws), so the summary's bootstrap
can redraw the sources (docs/definitions.md, "Per job"). Pure: no Redis, no HTTP.
"""

from __future__ import annotations

from service.core.errors import ValidationProblem


def check_source_seeds(draws: int, ablation: str, resample_from: str, per_position: bool) -> int:
    """The number of draws, or ValidationProblem (field `source_seeds`) saying what to change."""
    if draws == 1:
        return 1
    if ablation != "resample":
        reason = f"this job's ablation is {ablation}, which has no sources to draw"
    elif resample_from != "random":
        reason = "resample_from 'next' gives every draw the same sources: use resample_from 'random'"
    elif per_position:
        reason = "it serves the regressions across prompts at the final position; per-position jobs take 1"
    else:
        return draws
    raise ValidationProblem(f"source_seeds {draws} needs independent random draws of resample sources: {reason}",
                            "source_seeds")
