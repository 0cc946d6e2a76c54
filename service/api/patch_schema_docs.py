"""Descriptions of the activation-patching wire types and fields for the OpenAPI document; merged into
service/api/schema_docs.py's DOCS (kept apart so that the patching texts read together)."""

from __future__ import annotations

_G = "Per site (outer) and patched position (inner), like patched_metric: "

PATCH_DOCS: dict[str, str] = {
    "JobRequest.intervention": (
        "`ablate` (the default: ablate each component) or `patch` (activation patching between the clean and "
        "corrupted prompts of `pairs`)"
    ),
    "JobRequest.pairs": "Patching: the pairs (1 to 10 000), each a clean and a corrupted prompt and two answers",
    "JobRequest.pair_dataset": "Patching: a built-in paired dataset instead of `pairs`, drawn with `seed`",
    "JobRequest.direction": (
        "Patching: `denoise` (the corrupted run with clean activations patched in, the default) or `noise` (the "
        "reverse)"
    ),
    "JobRequest.epsilon": (
        "Patching: pairs whose clean and corrupted metrics differ by less than this get no patching score "
        "(default 0.001)"
    ),
    "PromptPair": (
        "One activation-patching pair: clean and corrupted prompts of one token length, two one-token answers."
    ),
    "PromptPair.clean": "The clean prompt",
    "PromptPair.corrupted": "The corrupted prompt: as many tokens as the clean one",
    "PromptPair.answer": "The answer token's text (one token, often with its leading space)",
    "PromptPair.counterfactual": "The competing answer's text (one token); the metric is logit(answer) − logit(this)",
    "PairDatasetRef": "A built-in paired dataset of patching jobs, drawn with the job's seed on the model's tokenizer.",
    "PairDatasetRef.name": "`ioi`: indirect-object-identification prompts",
    "PairDatasetRef.limit": "How many pairs to draw (default 32)",
    "JobSpec.intervention": "`ablate` or `patch`",
    "JobSpec.corrupted": "Patching jobs: the corrupted prompt of each pair (`prompts` holds the clean ones)",
    "JobSpec.direction": "Patching jobs: denoise or noise",
    "JobSpec.epsilon": "Patching jobs: the smallest clean − corrupted gap that gets a patching score",
    "JobSpec.pair_dataset": "Patching jobs: the built-in dataset the pairs were drawn from (null for given pairs)",
    "JobResult.patching": "Patching jobs: the pairs' measures and their summary (null for ablation jobs)",
    "PatchingResult": "What a patching job measured: per pair, per site and patched position, and a summary per site.",
    "PatchingResult.direction": "denoise or noise",
    "PatchingResult.positions": "final (each pair's final position) or all (every position)",
    "PatchingResult.metric": "logit_diff: logit(answer) − logit(counterfactual) at the final position",
    "PatchingResult.epsilon": "Pairs whose clean and corrupted metrics differ by less are flagged (no score)",
    "PatchingResult.sites": (
        "The patched sites, then the knockout sets (members joined with `+`), in the order of the pairs' per-site "
        "lists"
    ),
    "PatchingResult.pairs": "Every pair, in the job's order",
    "PatchingResult.summary": "Per site (and, with positions all, per position), over the pairs",
    "PatchingResult.n_flagged": "Pairs whose clean and corrupted metrics differ by less than epsilon",
    "PatchingResult.clean_metric_mean": "Mean clean metric over the pairs",
    "PatchingResult.corrupted_metric_mean": "Mean corrupted metric over the pairs",
    "PatchingResult.ci_level": "Level of the summary's bootstrap intervals",
    "PatchingResult.n_boot": "Bootstrap resamples behind each interval",
    "PairResult": (
        "One pair of a patching job: both runs' metrics, and per site and position the patched metric and score."
    ),
    "PairResult.index": "The pair's position in the job's pairs",
    "PairResult.clean": "The clean prompt",
    "PairResult.corrupted": "The corrupted prompt",
    "PairResult.answer": "The answer's text",
    "PairResult.counterfactual": "The counterfactual's text",
    "PairResult.answer_id": "The answer's token id",
    "PairResult.counterfactual_id": "The counterfactual's token id",
    "PairResult.clean_metric": "logit(answer) − logit(counterfactual) at the clean run's final position",
    "PairResult.corrupted_metric": "The same on the corrupted run",
    "PairResult.flagged": "The two metrics differ by less than epsilon: no patching score",
    "PairResult.positions": "The patched token positions (the final one, or every one)",
    "PairResult.patched_metric": "[site][position]: the metric of the base run with that site patched there",
    "PairResult.patching_score": (
        "[site][position]: 0 the patch changed nothing, 1 it moved the metric to the source run's (null when flagged)"
    ),
    "PairResult.clean_tokens": (
        "The clean prompt's tokens as the model read them, one per position (the patching_grid figure's x labels); "
        "null in older results"
    ),
    "PatchSummary": "One site (and position) of a patching job over its pairs.",
    "PatchSummary.site": "The site",
    "PatchSummary.position": "The token position with positions all; null: each pair's final position",
    "PatchSummary.n_pairs": "Pairs with this position",
    "PatchSummary.n_scored": "Of them, the pairs not flagged",
    "PatchSummary.patched_metric_mean": "Mean patched metric over the pairs",
    "PatchSummary.score_mean": "Mean patching score over the scored pairs",
    "PatchSummary.score_ci_low": "Lower end of the score's percentile-bootstrap interval over the scored pairs",
    "PatchSummary.score_ci_high": "Upper end of the score's interval",
    "PatchSummary.pooled_score": "The score of the pairs' mean metrics (null when their mean gap is under epsilon)",
    "PatchJobSummary": (
        "GET /v1/jobs/{id}/summary of a patching job: its per-site summary and counts, without the pairs."
    ),
    "PatchJobSummary.intervention": "`patch`: tells this answer from an ablation job's Summary",
    "PatchJobSummary.direction": "denoise or noise",
    "PatchJobSummary.positions": "final (each pair's final position) or all (every position)",
    "PatchJobSummary.metric": "logit_diff: logit(answer) − logit(counterfactual) at the final position",
    "PatchJobSummary.epsilon": "Pairs whose clean and corrupted metrics differ by less are flagged (no score)",
    "PatchJobSummary.sites": "The patched sites, then the knockout sets (members joined with `+`)",
    "PatchJobSummary.n_pairs": "Pairs in the job",
    "PatchJobSummary.n_flagged": "Pairs whose clean and corrupted metrics differ by less than epsilon",
    "PatchJobSummary.clean_metric_mean": "Mean clean metric over the pairs",
    "PatchJobSummary.corrupted_metric_mean": "Mean corrupted metric over the pairs",
    "PatchJobSummary.ci_level": "Level of the summary's bootstrap intervals",
    "PatchJobSummary.n_boot": "Bootstrap resamples behind each interval",
    "PatchJobSummary.summary": "Per site and knockout set (and, with positions all, per position), over the pairs",
    "PatchJobSummary.attribution": "Jobs with `estimates`: the estimates against the exact patches (null otherwise)",
    # attribution-patching estimates of patching jobs (docs/concepts/attribution.md, "On patching jobs")
    "PairResult.estimates": (
        "Jobs with `estimates`: this pair's attribution-patching estimates beside its exact patches (null otherwise)"
    ),
    "PatchingResult.attribution": (
        "Jobs with `estimates`: the estimates' agreement with the exact patches across pairs × sites (site@position "
        "with positions all) and their cost per pair (null otherwise)"
    ),
    "PatchEstimates": (
        "One pair's attribution-patching estimates of its patches: the base run is the corrupted one for denoise, "
        "the clean one for noise."
    ),
    "PatchEstimates.effect": _G + "the exact change of the metric, patched_metric − the base run's metric",
    "PatchEstimates.atp": _G + "AtP, (ñ − n) · ∂m/∂n on the base run: an estimate of effect, sign included",
    "PatchEstimates.atp_qkfix": (
        _G + "AtP with the QK fix for head q and k sites (with `atp_star`); equal to atp for every other site"
    ),
    "PatchEstimates.atp_star": _G + "AtP* (QK fix and GradDrop): an estimate of |effect|",
    "PatchEstimates.atp_score": (
        _G + "atp divided as patching_score is, by the source run's metric − the base run's (null: flagged pair)"
    ),
    "PatchEstimates.atp_qkfix_score": _G + "atp_qkfix divided as patching_score is (null: flagged pair)",
    "PatchEstimates.atp_star_score": (
        _G + "atp_star over |source metric − base metric|, compared with |patching_score| (null: flagged pair)"
    ),
}
