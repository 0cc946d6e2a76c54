"""Descriptions of every wire type and field for the OpenAPI document (service/api/openapi_polish.py applies them).

Kept apart from the wire types (hydra_ablate_client.wire) so they stay readable; a schema or property without a line
here is served without a description (h12 added none for fields merged later), so a new field should get one.
"""

from __future__ import annotations

from service.api.patch_schema_docs import PATCH_DOCS

_E = "Per component, in the order of `components`: "

DOCS: dict[str, str] = {
    # submitting
    "JobRequest": "A job as submitted: unset fields come from the preset, then from the defaults.",
    "JobRequest.preset": "A named setup (`hydra`: the Hydra-effect paper's sweep) whose values fill unset fields",
    "JobRequest.model": "Model id, one of GET /v1/models (default smollm2-135m)",
    "JobRequest.prompts": "The prompts (1 to 100 000); give these or `dataset`",
    "JobRequest.dataset": "A built-in prompt set instead of `prompts`",
    "JobRequest.answers": "Per prompt, the text whose first token is the target (default: the clean top token)",
    "JobRequest.counterfactuals": "Per prompt, a competing answer for the `logit_diff` metric",
    "JobRequest.components": (
        "What to ablate: kinds (`attn`, `mlp`, `head`: every layer) or names (`attn.3`, `mlp.0`, `head.2.5`)"
    ),
    "JobRequest.knockouts": (
        "Sets of explicit components (`attn.3`, `mlp.0`, `head.2.5`) each ablated together in one run and measured "
        "like one component, named by its members joined with `+` (`attn.3+head.5.1`), after `components` in the "
        "results; final-position jobs only. With knockouts and no `components`, only the sets are ablated. In a "
        "patching job (intervention `patch`): sets of explicit sites (`resid_pre.2`, `head.1.0.q`, …) each patched "
        "together from the source run, reported the same way"
    ),
    "JobRequest.ablation": "How a component's output is replaced: `resample` (another prompt's), `mean` or `zero`",
    "JobRequest.positions": "Ablate at the final position only (`final`) or at every position (`all`)",
    "JobRequest.metric": (
        "What is measured on the target token: logit, centred logit, log-probability or logit difference"
    ),
    "JobRequest.norm_scale": "Which run's final-norm scale the direct effects use: `clean` or `ablated`",
    "JobRequest.resample_samples": "Resample sources per prompt (1 to 64); effects are averaged over them",
    "JobRequest.resample_from": "Where resample sources come from: the `next` prompt or `random` others",
    "JobRequest.mean_reference": "The prompts whose mean activation `mean` ablation uses (default: the job's own)",
    "JobRequest.seed": "Seed of the random resample pairing",
    "JobRequest.source_seeds": (
        "Independent draws of resample_samples sources per prompt (1 to 16; seeds seed, seed + 1, …), for "
        "resample_from `random` at the final position: every measure averages all draws' runs, each draw's own "
        "means are kept in `draws`, and the summary's bootstrap redraws them"
    ),
    "JobRequest.name": "A label for people (at most 200 characters); not unique",
    "JobRequest.tags": "Labels to filter jobs by (GET /v1/jobs?tag=…); at most 20",
    "JobRequest.metadata": "Free key-value pairs returned as given (at most 50 keys and 4 KiB as JSON)",
    "JobRequest.callback_url": (
        "Where the final status is POSTed, signed (Hydra-Signature) and retried with backoff; private and "
        "loopback hosts are refused unless the operator allows them (HYDRA_CALLBACK_ALLOW)"
    ),
    "DatasetRef": "A slice of a built-in prompt set.",
    "DatasetRef.name": "The prompt set: `known_1000` (ROME's known facts)",
    "DatasetRef.limit": "At most this many prompts (null: all after `offset`)",
    "DatasetRef.offset": "Prompts to skip",
    "DatasetRef.relation": "Only prompts of this Wikidata relation, e.g. P36 (capital)",
    "DatasetRef.use_answers": "Take the dataset's answers as targets instead of the clean top token",
    "BatchRequest": "Many jobs in one request: all are checked first, and either every job is queued or none is.",
    "BatchRequest.jobs": "1 to 100 job requests",
    "BatchAccepted": "The queued jobs of a batch, in the order of the request.",
    "BatchAccepted.jobs": "One status per submitted job, in request order",
    # status
    "JobStatus": "A job's state, phase, progress and labels.",
    "JobStatus.id": "The job id (32 hex digits)",
    "JobStatus.status": "queued, running, succeeded, failed or cancelled",
    "JobStatus.model": "The model id the job runs on",
    "JobStatus.progress": "Ablated runs and prompts done so far",
    "JobStatus.error": "Why the job failed (null unless failed)",
    "JobStatus.created_at": "When the job was submitted (ISO-8601 UTC)",
    "JobStatus.started_at": "When a worker started it (null while queued)",
    "JobStatus.finished_at": "When it succeeded, failed or was cancelled (null until then)",
    "JobStatus.owner": "The name of the API key that submitted it (`local` with auth off)",
    "JobStatus.phase": "queued, loading_model, clean_passes, ablating, merging, finished: only moves forward",
    "JobStatus.name": "The submitted name (null when none)",
    "JobStatus.tags": "The submitted tags",
    "JobStatus.metadata": "The submitted metadata",
    "JobStatus.callback_url": "The submitted callback URL (null when none)",
    "JobStatus.callbacks": "Every webhook delivery attempt so far, oldest first",
    "Progress": "How far a job is.",
    "Progress.done": "Ablated runs done",
    "Progress.total": "Ablated runs in the job (prompts × components × samples)",
    "Progress.prompts_done": "Prompts whose ablations are all done",
    "Progress.prompts_total": "Prompts in the job",
    "CallbackAttempt": "One POST of the job's final status to its callback_url.",
    "CallbackAttempt.attempt": "1 for the first try, then 2, 3, …",
    "CallbackAttempt.at": "When the attempt ended (ISO-8601 UTC)",
    "CallbackAttempt.status_code": "The receiver's HTTP status (null when it could not be reached)",
    "CallbackAttempt.error": "Why the attempt failed (null when delivered)",
    "CallbackAttempt.duration_ms": "How long the attempt took, in milliseconds",
    "CallbackAttempt.delivered": "True when the receiver answered 2xx",
    "JobPage": "One page of jobs, newest first.",
    "JobPage.items": "The jobs of this page",
    "JobPage.total": "Jobs matching the filters, all pages together",
    "JobPage.offset": "Jobs skipped before this page",
    "JobPage.limit": "The page size asked for",
    "WebhookSecret": "The secret that signs this API key's webhook deliveries.",
    "WebhookSecret.key": "The API key's name",
    "WebhookSecret.secret": "HMAC-SHA256 key (hex): signature = HMAC(secret, timestamp + '.' + body)",
    # results
    "JobResult": "A finished job's measures: per prompt, the summary over prompts, and how it was computed.",
    "JobResult.id": "The job id",
    "JobResult.model": "The model id",
    "JobResult.components": "The ablated components, in the order of every per-component list",
    "JobResult.response_basis": "The downstream components the response matrices are measured on",
    "JobResult.prompts": "One entry per prompt, in submission order",
    "JobResult.summary": "Means, errors and regressions over all prompts",
    "JobResult.provenance": "Everything needed to reproduce the run",
    "PromptResult": "One prompt's measures (see docs/concepts/definitions.md).",
    "PromptResult.prompt": "The prompt text",
    "PromptResult.target_id": "The target token id",
    "PromptResult.target_token": "The target token, decoded",
    "PromptResult.clean_metric": "The metric on the clean (unablated) run",
    "PromptResult.top2_gap": "Clean logit gap between the top two tokens",
    "PromptResult.near_tie": "True when the gap is below the dtype's near-tie threshold (target may flip)",
    "PromptResult.sources": "The prompts whose activations replaced this one's (resample ablation)",
    "PromptResult.total_effect": _E + "metric change when the component is ablated",
    "PromptResult.direct_effect": _E + "the component's own direct contribution to the metric",
    "PromptResult.compensation": _E + "total effect minus direct effect (downstream compensation)",
    "PromptResult.norm_response": _E + "the change of the final-norm scale",
    "PromptResult.response": _E + "the change of each `response_basis` component's direct effect",
    "PromptResult.clean_direct_effect": "Per `response_basis` component: its direct effect on the clean run",
    "Summary": "Aggregates over the job's prompts.",
    "Summary.n_prompts": "Prompts summarised",
    "Summary.components": "One summary per ablated component",
    "Summary.response_matrix": "Mean response: rows are components, columns the response_basis",
    "Summary.clean_direct_effect_mean": "Mean clean direct effect per response_basis component",
    "Summary.total_vs_direct": "Regression of total effect on direct effect over all prompt × component pairs",
    "Summary.near_ties": "Prompts flagged near_tie",
    "ComponentSummary": "One component's means and standard errors over prompts.",
    "ComponentSummary.component": "The component name",
    "ComponentSummary.direct_effect_mean": "Mean direct effect",
    "ComponentSummary.direct_effect_se": "Standard error of the direct effect",
    "ComponentSummary.total_effect_mean": "Mean total effect",
    "ComponentSummary.total_effect_se": "Standard error of the total effect",
    "ComponentSummary.compensation_mean": "Mean compensation",
    "ComponentSummary.compensation_se": "Standard error of the compensation",
    "ComponentSummary.compensation_attn_mean": "Mean compensation by downstream attention layers",
    "ComponentSummary.compensation_mlp_mean": "Mean compensation by downstream MLP layers",
    "ComponentSummary.norm_response_mean": "Mean change of the final-norm scale",
    "ComponentSummary.compensation_vs_direct": "Regression of compensation on direct effect over prompts",
    "Regression": "Least-squares fit y = slope·x + intercept; nulls when x has no spread.",
    "Regression.slope": "Slope (null without spread in x)",
    "Regression.intercept": "Intercept (null without spread in x)",
    "Regression.r2": "Coefficient of determination (null without spread in x)",
    "Regression.n": "Points fitted",
    "Provenance": "How a result was computed: spec, model, software and machine.",
    "Provenance.spec": "The fully resolved job",
    "Provenance.model_id": "The model id",
    "Provenance.model_source": "Where the weights came from",
    "Provenance.model_revision": "The model's revision (null when unknown)",
    "Provenance.model_file_sha256": "SHA-256 of the weights file (null when not a single file)",
    "Provenance.architecture": "The model's architecture (transformers model_type)",
    "Provenance.dtype": "The dtype the engine ran in",
    "Provenance.device": "The device(s) the engine ran on",
    "Provenance.library_versions": "Versions of Python and the libraries that computed the result",
    "Provenance.seed": "The seed of the resample pairing",
    "Provenance.engine": "The engine that computed the result",
    "Provenance.worker": "The worker host(s)",
    "Provenance.elapsed_s": "Compute seconds, summed over chunks",
    "JobSpec": "A job fully resolved: explicit prompts and component names, every option set.",
    "JobSpec.model": "The model id",
    "JobSpec.prompts": "Every prompt",
    "JobSpec.answers": "Per prompt target text (null: the clean top token)",
    "JobSpec.counterfactuals": "Per prompt competing answer (null unless logit_diff)",
    "JobSpec.components": "Every ablated component, by name",
    "JobSpec.knockouts": (
        "Every knockout set, by its members' names (results name each by them joined with +); in patching jobs, "
        "sets of sites patched together"
    ),
    "JobSpec.ablation": "resample, mean or zero",
    "JobSpec.positions": "final or all",
    "JobSpec.metric": "The measured metric",
    "JobSpec.norm_scale": "clean or ablated",
    "JobSpec.resample_samples": "Resample sources per prompt",
    "JobSpec.resample_from": "next or random",
    "JobSpec.mean_reference_prompts": "The prompts of the mean activation (null: the job's own)",
    "JobSpec.seed": "Seed of the resample pairing",
    "JobSpec.source_seeds": "Independent draws of resample sources per prompt (seeds seed, seed + 1, …)",
    "JobSpec.preset": "The preset the request named (null when none)",
    "JobSpec.dataset": "The dataset slice the prompts came from (null when given explicitly)",
    "JobSpec.prompt_fields": "Per prompt dataset fields (null when the prompts were given explicitly)",
    "PromptFields": "A dataset prompt's own fields, kept so results can be grouped by them.",
    "PromptFields.relation": "Wikidata relation id, e.g. P36",
    "PromptFields.subject": "The subject of the fact",
    "PromptFields.answer": "The dataset's answer (without a leading space)",
    "PromptFields.dataset_index": "The record's index in the dataset (known_id)",
    # models, health, errors
    "ModelInfo": "A model some worker serves, with its shape.",
    "ModelInfo.id": "The id to submit jobs with",
    "ModelInfo.architecture": "transformers model_type",
    "ModelInfo.n_layers": "Transformer layers",
    "ModelInfo.n_heads": "Attention (query) heads per layer",
    "ModelInfo.n_kv_heads": "Key/value heads per layer (fewer with grouped-query attention)",
    "ModelInfo.d_model": "Residual stream width",
    "ModelInfo.vocab_size": "Vocabulary size",
    "ModelInfo.parallel_blocks": "True when attention and MLP read the same input (GPT-NeoX style)",
    "ModelInfo.source": "Where the worker loads it from",
    "Health": "Liveness.",
    "Health.status": "Always ok while the process answers",
    "Readiness": "Whether jobs can be accepted and run.",
    "Readiness.status": "ready",
    "Readiness.redis": "Redis answered",
    "Readiness.workers": "Workers that answered a ping",
    "ProblemDetails": "RFC 9457 problem details: every error response (application/problem+json).",
    "ProblemDetails.status": "The HTTP status",
    "ProblemDetails.title": "The status phrase",
    "ProblemDetails.detail": "What went wrong and what to change",
    "ProblemDetails.type": "A URI naming the problem type (absent: about:blank)",
    "ProblemDetails.instance": "The request path the problem occurred on",
    "ProblemDetails.field": "422: the request field to change",
    "ProblemDetails.errors": "400: every malformed field",
    "FieldError": "One malformed field of a request.",
    "FieldError.message": "What is wrong with it",
    "FieldError.key": "The field's name (null when the whole body is malformed)",
    "FieldError.source": "Where it was: body, query, header or path",
    # fields added after the first pass (paper measures, per-position jobs, selection, labels)
    "JobRequest.keep_samples": "Return every resample patch's TE, DE and ablated per-layer profile (`samples`)",
    "JobRequest.only_correct": (
        "Measure only prompts whose clean top token is the first token of their answer (the paper's selection; a "
        "dataset's answers are used)"
    ),
    "JobRequest.resample_within": "Draw resample sources from the whole `job` or from the prompt's dataset `relation`",
    "JobRequest.texts": "Documents to measure (1 to 100 000), instead of `prompts`, `dataset` or `corpus`",
    "JobRequest.corpus": "A built-in corpus of documents, instead of `prompts`, `dataset` or `texts`",
    "JobRequest.max_tokens": "Cut every prompt or text to its first `max_tokens` tokens (2 to 4096)",
    "JobRequest.measure_positions": "Measure at the `final` position only or at `all` positions",
    "JobRequest.target": (
        "`clean_top` (the clean run's top token; given answers win) or `next_token` (position p targets token p + 1)"
    ),
    "JobRequest.response_basis": "Downstream responses per `layers` (attention and MLP) or per `heads` (and MLP)",
    "JobRequest.position_responses": (
        "Per-position jobs: `split` (downstream heads / MLPs / norm sums) or `full` (the whole response vector)"
    ),
    "CorpusRef": "A slice of a built-in natural-text corpus (documents).",
    "CorpusRef.name": "The corpus: `known_1000_text` (known_1000 facts completed with their answers, 12 per document)",
    "CorpusRef.limit": "At most this many documents (null: all after `offset`)",
    "CorpusRef.offset": "Documents to skip",
    "JobSpec.keep_samples": "Whether every resample patch is returned",
    "JobSpec.only_correct": "Whether only correctly answered prompts are measured",
    "JobSpec.resample_within": "job or relation: where resample sources are drawn from",
    "JobSpec.resample_groups": "Per prompt, its relation's number (resample_within `relation`; null otherwise)",
    "JobSpec.max_tokens": "Prompts and texts are cut to their first max_tokens tokens (null: uncut)",
    "JobSpec.measure_positions": "final or all",
    "JobSpec.target": "clean_top or next_token (given answers win over clean_top)",
    "JobSpec.response_basis": "layers or heads",
    "JobSpec.position_responses": "split or full",
    "JobSpec.corpus": "The corpus slice the texts came from (null when not a corpus)",
    "JobStatus.note": "What recovery did to a job that is still active, e.g. a chunk sent again (null when nothing)",
    "ModelInfo.family": "The model family, e.g. Gemma 2",
    "ModelInfo.dtype": "What the worker runs the model in (HYDRA_DTYPE)",
    "ModelInfo.device": "Where the worker runs it (HYDRA_DEVICE), e.g. cuda:0",
    "ModelInfo.device_name": "The device's name, e.g. the GPU's or the CPU's model (null when unknown)",
    "ModelInfo.final_logit_softcap": "Gemma 2's final-logit soft cap (null for every other model)",
    "ModelInfo.post_norm": (
        "Whether the blocks normalise the attention output before adding it to the residual stream (OLMo 2, "
        "Gemma 2 and 3); there a knockout set cannot hold a head of layer L together with a member of an earlier "
        "layer"
    ),
    "ModelInfo.head_basis_refusal": (
        "Why this model cannot run `response_basis: \"heads\"` (a post-norm block whose attention output "
        "projection has a bias, which belongs to no head); null when it can"
    ),
    "PromptResult.index": "The prompt's index in the job's prompts (only_correct leaves some out)",
    "PromptResult.unembed_effect": _E + "the paper's Δunembed: the component's clean output onto the target (Eq. 10)",
    "PromptResult.compensatory_effect": (
        _E + "the paper's CE (Eq. 33–34): downstream responses summed, final norm excluded"
    ),
    "PromptResult.samples": "With keep_samples: per component, every resample patch (null otherwise)",
    "PromptResult.capped_total_effect": (
        _E + "soft-capped models only: the total effect on the capped logits (null for every other model)"
    ),
    "PromptResult.positions": "Per-position jobs: every measure per (component, position) (null otherwise)",
    "PromptResult.warnings": "What the numbers do not show, e.g. a multi-token answer of which the first is measured",
    "PromptResult.draws": (
        "With source_seeds > 1: each draw's own means, in seed order (the per-prompt lists average every draw's "
        "runs); null otherwise"
    ),
    "SourceDraw": "One independent draw of a prompt's resample sources: the means over its own runs, per component.",
    "SourceDraw.seed": "The seed the draw's sources were drawn with",
    "SourceDraw.sources": "The draw's resample sources (prompt indices)",
    "SourceDraw.total_effect": _E + "TE over the draw's runs",
    "SourceDraw.direct_effect": _E + "DE over the draw's runs",
    "SourceDraw.compensatory_effect": _E + "CE over the draw's runs",
    "SourceDraw.compensatory_effect_attn": _E + "CE's attention part over the draw's runs",
    "SourceDraw.compensatory_effect_mlp": _E + "CE's MLP part over the draw's runs",
    "SourceDraw.norm_response": _E + "the final norm's part of the compensation over the draw's runs",
    "PatchSample": "One ablated run of one prompt and component (one resample source; the single run for mean/zero).",
    "PatchSample.source": "The resample source's prompt index (null for mean and zero ablation)",
    "PatchSample.total_effect": "This run's total effect",
    "PatchSample.direct_effect": "This run's direct effect",
    "PatchSample.profile": "Δ̃unembed(k, l): every layer component's direct effect in this ablated run",
    "PatchSample.ablated_unembed_effect": (
        "Δ̃unembed(k, k): the ablated component's own write onto the target in this run (clean final-norm scale)"
    ),
    "PromptResult.ablated_unembed_effect": (
        "Ablation efficacy per component: Δ̃unembed(k, k), the ablated component's own write onto the target in the "
        "ablated run (clean final-norm scale), mean over the resample patches; ≈ 0 when the ablation removes its "
        "write; equals unembed_effect − direct_effect (null in older results)"
    ),
    "PositionColumns.ablated_unembed_effect": "(C, P): Δ̃unembed(k, k) at every position (null in older results)",
    "ComponentSummary.ablated_unembed_effect_mean": "Mean over prompts of Δ̃unembed(k, k) (null in older results)",
    "ComponentSummary.ablated_unembed_effect_se": "Its standard error over prompts",
    "ComponentSummary.unembed_removed_share": (
        "Share of Δunembed the ablation removed: 1 − mean Δ̃unembed(k, k) / mean Δunembed (null when |mean "
        "Δunembed| < 0.001 or < 2 standard errors: no clear write to remove)"
    ),
    "ComponentSummary.weak_ablation": (
        "True where the ablation removed less than Summary.efficacy_threshold of Δunembed: effects read off it "
        "(CE slopes above all) understate what the component does"
    ),
    "Summary.efficacy_threshold": "The removed share of Δunembed below which an ablation is flagged weak (0.5)",
    "JobRequest.resample_sources": (
        "Which prompts may be resample sources: `any` other prompt (the paper), or only those whose clean top token "
        "differs from the prompt's target (`different_target`); fails the job when a prompt has too few"
    ),
    "JobSpec.resample_sources": "any or different_target",
    "ModelInfo.about": "What the model is (built-in models; null otherwise)",
    "ModelInfo.licence": "The terms its weights are used under (built-in models; null otherwise)",
    "Provenance.model_about": "What the model is (built-in models; null otherwise)",
    "Provenance.model_licence": "The terms of its weights (built-in models; null otherwise)",
    "PositionColumns": (
        "One prompt's per-position measures as little-endian float32 arrays (base64 in JSON), row-major: P measured "
        "positions, C components, R response-basis entries."
    ),
    "PositionColumns.positions": "The measured positions: indices into the tokens the model read",
    "PositionColumns.capped_total_effect": (
        "(C, P) soft-capped models only: total effect on the capped logits (null for every other model)"
    ),
    "PositionColumns.target_ids": "Per measured position, the target token id",
    "PositionColumns.clean_metric": "(P,) the clean run's metric per position",
    "PositionColumns.top2_gap": "(P,) the clean top-1/top-2 logit gap per position",
    "PositionColumns.total_effect": "(C, P) total effect",
    "PositionColumns.direct_effect": "(C, P) direct effect",
    "PositionColumns.unembed_effect": "(C, P) Δunembed",
    "PositionColumns.compensation": "(C, P) compensation = response_heads + response_mlps + norm_response",
    "PositionColumns.compensatory_effect": "(C, P) CE: downstream responses summed, norm excluded",
    "PositionColumns.response_heads": "(C, P) sum of the downstream attention (head) responses",
    "PositionColumns.response_mlps": "(C, P) sum of the downstream MLP responses",
    "PositionColumns.norm_response": "(C, P) the final norm's part of the compensation",
    "PositionColumns.clean_direct_effect": "(R, P) every response-basis entry's clean direct effect",
    "PositionColumns.response": "(C, R, P) the full response, only with position_responses `full` (null otherwise)",
    "PositionColumns.atp": "(C, P) jobs with `estimates`: AtP at every measured position, an estimate of total_effect",
    "PositionColumns.atp_qkfix": "(C, P) AtP with the QK fix (with `atp_star`); equal to atp for ablation components",
    "PositionColumns.atp_star": "(C, P) AtP* (QK fix and GradDrop), an estimate of abs_total_effect",
    "PositionColumns.abs_total_effect": "(C, P) the mean over the ablated runs of |total_effect| (jobs with estimates)",
    "Summary.selection": "Which prompts the summary covers (only_correct)",
    "Summary.erasure": "Per ablated attention layer and downstream MLP, the erasure fit (null for per-position jobs)",
    "Summary.n_pairs": "Per-position jobs: (prompt, position) pairs measured (null otherwise)",
    "Summary.top_fraction": "Per-position jobs: the share of pairs by direct effect that self_repair covers",
    "Summary.self_repair": "Per-position jobs: per component, self-repair over its top pairs (null otherwise)",
    "Summary.self_repair_layers": (
        "Per-position jobs: per layer and component kind, the mean self-repair of its components with an interval "
        "(Rushing & Nanda's Fig. 1 trend line); null otherwise"
    ),
    "Summary.resampling": "How the summary's bootstrap intervals were drawn (unit, count, resamples, level, seed)",
    "Summary.source_seeds": "The seeds of the source draws (source_seeds > 1); null with a single draw",
    "Resampling": "How a summary's bootstrap intervals were drawn.",
    "Resampling.unit": (
        "What a resample draws with replacement: prompts, whole dataset relations (prompts clustered by relation), "
        "or documents (per-position jobs)"
    ),
    "Resampling.n_units": "How many prompts, relations or documents there are to draw from",
    "Resampling.n_boot": "Bootstrap resamples",
    "Resampling.ci_level": "The intervals' level, e.g. 0.95",
    "Resampling.seed": "The seed of numpy's PCG64 that draws the resamples (the job's seed)",
    "Selection": "Which prompts the summary covers.",
    "Selection.only_correct": "Whether only correctly answered prompts were kept",
    "Selection.n_candidates": "Prompts in the job",
    "Selection.n_kept": "Prompts measured (all, or those whose clean top token is the answer's first token)",
    "ComponentSummary.unembed_effect_mean": "Mean Δunembed (the paper's Eq. 10)",
    "ComponentSummary.unembed_effect_se": "Standard error of Δunembed",
    "ComponentSummary.compensatory_effect_mean": "Mean CE (the paper's Eq. 33–34)",
    "ComponentSummary.compensatory_effect_se": "Standard error of CE",
    "ComponentSummary.ce_vs_unembed": "CE on Δunembed across prompts (Fig. 7); null for per-position jobs",
    "ComponentSummary.ce_vs_direct": "CE on DE across prompts; null for per-position jobs",
    "ComponentSummary.ce_attn_vs_unembed": "CE's attention part on Δunembed (Fig. 8); null for per-position jobs",
    "ComponentSummary.ce_mlp_vs_unembed": "CE's MLP part on Δunembed (Fig. 8); null for per-position jobs",
    "ComponentSummary.ce_attn_vs_direct": "CE's attention part on DE; null for per-position jobs",
    "ComponentSummary.ce_mlp_vs_direct": "CE's MLP part on DE; null for per-position jobs",
    "ComponentSummary.unembed_drop_correlation": "Pearson correlation across prompts of Δunembed with TE (Fig. 2)",
    "ComponentSummary.unembed_exceeds_drop_share": "Share of prompts with Δunembed > TE (Fig. 2)",
    "Regression.y": "The regressed quantity (a PromptResult field, or a part of one)",
    "Regression.x": "The regressor (a PromptResult field)",
    "Fit": (
        "A Regression with percentile-bootstrap intervals of slope and R² (prompts or whole relations resampled, "
        "source draws redrawn), and for fits on Δunembed a permutation p-value of the slope with its Holm "
        "adjustment across the job's components. With several source draws slope, intercept and r2 are the means "
        "of each draw's own fit."
    ),
    "Fit.slope_ci_low": "Lower end of the slope's interval (null without spread in x)",
    "Fit.slope_ci_high": "Upper end of the slope's interval (null without spread in x)",
    "Fit.ci_level": "The intervals' level, e.g. 0.95",
    "Fit.n_boot": "Bootstrap resamples",
    "Fit.excludes_zero": "Older one-sided reading: the interval lies entirely above or below 0 (null without spread)",
    "Fit.excludes_one": (
        "Older one-sided reading: the interval lies entirely above or below 1; use slope_in_unit_interval for the "
        "paper's claim"
    ),
    "Fit.slope_in_unit_interval": (
        "The whole slope interval lies in (0, 1): partial repair, the paper's \"slope below 1\" (null without spread)"
    ),
    "Fit.r2_ci_low": "Lower end of R²'s bootstrap interval (null when R² is undefined)",
    "Fit.r2_ci_high": "Upper end of R²'s bootstrap interval",
    "Fit.bootstrap_unit": "What the bootstrap resamples: `prompt`, or `relation` (a dataset's prompts by relation)",
    "Fit.n_clusters": "Prompts or relations the bootstrap draws from",
    "Fit.n_draws": "Independent source draws behind each prompt's point (source_seeds)",
    "Fit.draw_slopes": "With several draws: each draw's own slope, in seed order (null with one draw)",
    "Fit.draw_r2": "With several draws: each draw's own R², in seed order (null with one draw)",
    "Fit.permutation_p": (
        "Fits on Δunembed: two-sided permutation p-value of the slope, Δunembed shuffled across prompts, "
        "(1 + #{|slope*| ≥ |slope|}) / (n_permutations + 1); null for fits on DE"
    ),
    "Fit.permutation_p_holm": (
        "permutation_p adjusted by Holm–Bonferroni over every component's fit of the same y on x in this job"
    ),
    "Fit.n_permutations": "Permutations drawn (0 where there is no permutation test)",
    "Fit.permutation_seed": "The seed of the permutations: numpy's PCG64 seeded with (seed, 1) (null without a test)",
    "ErasureFit": "For an ablated attention layer: one downstream MLP's response regressed on the layer's Δunembed.",
    "ErasureFit.ablated": "The ablated attention layer",
    "ErasureFit.mlp": "The downstream MLP",
    "ErasureFit.clean_direct_effect_mean": "The MLP's mean clean direct effect (negative: it erases the target)",
    "ErasureFit.response_mean": "The MLP's mean response to the ablation",
    "ErasureFit.fit": "The MLP's response on the layer's Δunembed, across prompts",
    "Quantiles": "Quantiles of a distribution.",
    "Quantiles.p05": "5th percentile",
    "Quantiles.p25": "25th percentile",
    "Quantiles.p50": "Median",
    "Quantiles.p75": "75th percentile",
    "Quantiles.p95": "95th percentile",
    "SelfRepair": (
        "One component's self-repair over its top (prompt, position) pairs by its direct effect as Rushing & Nanda "
        "define it: its clean write onto the target (unembed_effect)."
    ),
    "SelfRepair.component": "The component name",
    "SelfRepair.kind": "attn, mlp or head",
    "SelfRepair.layer": "The component's layer (the x of Rushing & Nanda's Fig. 1)",
    "SelfRepair.n_pairs": "Pairs kept: int(top_fraction × pairs), at least 1, by unembed_effect",
    "SelfRepair.unembed_effect_threshold": "The smallest clean write onto the target kept",
    "SelfRepair.unembed_effect_mean": "Mean clean write onto the target over the kept pairs (R&N's direct effect)",
    "SelfRepair.direct_effect_mean": "Mean DE (clean − ablated write of the component) over the kept pairs",
    "SelfRepair.total_effect_mean": "Mean total effect over the kept pairs",
    "SelfRepair.self_repair_mean": "Mean self-repair (= compensation DE − TE; R&N's Δlogit − Δ direct effect)",
    "SelfRepair.self_repair_se": "Standard error of the self-repair (pairs treated as independent)",
    "SelfRepair.self_repair_ci_low": "Lower end of the self-repair's bootstrap interval (documents resampled)",
    "SelfRepair.self_repair_ci_high": "Upper end of the self-repair's bootstrap interval",
    "SelfRepair.heads_mean": "Mean part of downstream attention heads",
    "SelfRepair.mlps_mean": "Mean part of downstream MLPs",
    "SelfRepair.norm_mean": "Mean part of the final norm",
    "SelfRepair.norm_share": (
        "R&N's LayerNorm share of the direct effect: mean over the kept pairs of clip(norm part / unembed_effect, "
        "0, 1) (null when every ratio is 0/0)"
    ),
    "SelfRepair.norm_share_ci_low": "Lower end of norm_share's bootstrap interval (documents resampled)",
    "SelfRepair.norm_share_ci_high": "Upper end of norm_share's bootstrap interval",
    "SelfRepair.heads_share": "Mean over the kept pairs of clip(heads part / unembed_effect, 0, 1)",
    "SelfRepair.mlps_share": "Mean over the kept pairs of clip(MLP part / unembed_effect, 0, 1)",
    "SelfRepair.self_repair_share": "Mean over the kept pairs of clip(self-repair / unembed_effect, 0, 1)",
    "SelfRepair.norm_of_direct": "Unclipped ratio of means norm_mean / unembed_effect_mean (null when that is 0)",
    "SelfRepair.self_repair_fraction": "Unclipped ratio of means self_repair_mean / unembed_effect_mean",
    "SelfRepair.self_repair_fraction_ci_low": (
        "Lower end of self_repair_fraction's bootstrap interval (the ratio of each document resample's means); "
        "above 1: the component over-corrects on average"
    ),
    "SelfRepair.self_repair_fraction_ci_high": "Upper end of self_repair_fraction's bootstrap interval",
    "SelfRepair.over_correction_share": "Share of the kept pairs whose self-repair exceeds unembed_effect",
    "SelfRepair.over_correction_ci_low": "Lower end of over_correction_share's bootstrap interval",
    "SelfRepair.over_correction_ci_high": "Upper end of over_correction_share's bootstrap interval",
    "SelfRepair.self_repair_quantiles": "5/25/50/75/95% quantiles of the self-repair over the kept pairs",
    "SelfRepairLayer": "The mean self-repair of one layer's components of one kind (Rushing & Nanda's Fig. 1 trend).",
    "SelfRepairLayer.kind": "attn, mlp or head",
    "SelfRepairLayer.layer": "The layer",
    "SelfRepairLayer.n_components": "Components of this kind in this layer",
    "SelfRepairLayer.self_repair_mean": "Mean over those components of their self_repair_mean",
    "SelfRepairLayer.ci_low": "Lower end of its bootstrap interval (the components' document resamples)",
    "SelfRepairLayer.ci_high": "Upper end of its bootstrap interval",
    # attribution-patching estimates (docs/concepts/attribution.md)
    "JobSpec.estimates": "The attribution-patching methods computed beside the exact effects (empty: none)",
    "PromptResult.estimates": (
        "Jobs with `estimates`: this prompt's attribution-patching estimates beside total_effect (null otherwise)"
    ),
    "Estimates": (
        "One prompt's attribution-patching estimates, one number per component in the order of `components`, each "
        "the mean over the prompt's ablated runs as total_effect is."
    ),
    "Estimates.atp": _E + "AtP, (n − ñ) · ∂m/∂n on the clean run: an estimate of total_effect, sign included",
    "Estimates.atp_qkfix": (
        _E + "AtP with the QK fix (with `atp_star`); equal to atp for ablation components, whose output is after "
        "their own softmax"
    ),
    "Estimates.atp_star": (
        _E + "AtP* (QK fix and GradDrop): an estimate of the magnitude |total_effect|, compared with abs_total_effect"
    ),
    "Estimates.abs_total_effect": _E + "the exact value atp_star is compared with: the mean over the runs of |TE|",
    # estimates first, then the exact ablation of a verification set (docs/concepts/attribution.md)
    "JobRequest.verify": (
        "With `estimates`: estimate every component first, then run the exact ablation of the verification set only "
        "(the `top` components by |mean estimate| plus `random` more drawn with the job's seed)"
    ),
    "JobSpec.verify": "With `estimates`: the verification set's sizes (null: every component runs exactly)",
    "Verify": "Estimates first: the sizes of the verification set, the components that then run exactly.",
    "Verify.top": "How many components with the largest |mean estimate| over the prompts run exactly (0 or more)",
    "Verify.random": "How many more, drawn from the rest with the job's seed, run exactly (0 or more; default 0)",
    "PromptResult.all_estimates": (
        "Jobs with `verify`: this prompt's estimates of every component, in the order of "
        "summary.attribution.verification.components (`estimates` covers the verified components only)"
    ),
    "ComponentEstimates": "One prompt's estimates of every component of a job with `verify`.",
    "ComponentEstimates.atp": "AtP of every component: an estimate of total_effect, sign included",
    "ComponentEstimates.atp_qkfix": "AtP with the QK fix of every component (with `atp_star`; null otherwise)",
    "ComponentEstimates.atp_star": "AtP* of every component, an estimate of |total_effect| (with `atp_star`)",
    "AttributionSummary.verified": (
        "Jobs with `verify`: the components with exact values (the result's `components`); agreement, cost and "
        "errors cover only these. Null otherwise"
    ),
    "AttributionSummary.verification": "Jobs with `verify`: how the verification set was chosen, both phases' costs",
    "Verification": "How a job with `verify` chose the components it ran exactly, and what both phases cost.",
    "Verification.ranked_by": "The estimate ranked by |mean over prompts|: atp, or atp_star when only it was asked",
    "Verification.top": "The top components by |mean estimate| that ran exactly",
    "Verification.random": "The further components drawn with the job's seed that ran exactly",
    "Verification.seed": "The job's seed, which drew the random part",
    "Verification.components": "Every component estimated, in the order of PromptResult.all_estimates",
    "Verification.mean_estimates": "Per component, the mean over the prompts of `ranked_by`",
    "Verification.verified": "The verification set, in the job's component order",
    "Verification.phases": "The estimates phase (every component), then the exact phase (the verified ones)",
    "Verification.exact_all_model_evaluations_per_prompt": (
        "What the exact ablation of every component would cost per prompt, counted as EstimateCost counts"
    ),
    "PhaseCost": "One phase of a job with `verify`: the components it covered and what it cost.",
    "PhaseCost.phase": "`estimates` (every component) or `exact` (the verified components)",
    "PhaseCost.n_components": "Components the phase covered",
    "PhaseCost.model_evaluations_per_prompt": "Model evaluations per prompt, as EstimateCost counts them",
    "PhaseCost.seconds": "The phase's chunks' compute time, summed over the job's prompts",
    "Summary.attribution": "Jobs with `estimates`: the estimates against the exact effects (null otherwise)",
    "AttributionSummary": (
        "How the job's estimates agree with its exact effects, what each method cost, and how much of their miss "
        "goes with the compensatory effect."
    ),
    "AttributionSummary.methods": "The methods summarised: atp, and with atp_star also atp_qkfix and atp_star",
    "AttributionSummary.agreement": "One entry per method: rank correlations, top-k recall, the largest misses",
    "AttributionSummary.cost": "Per prompt, what the exact engine (`exact`, first) and each method cost",
    "AttributionSummary.errors": "Per method and component (method-major): the error beside CE and the norm",
    "EstimateAgreement": "One method against the exact effects over every prompt × component.",
    "EstimateAgreement.method": "atp, atp_qkfix or atp_star",
    "EstimateAgreement.compared_with": "`total_effect` (signed) or `abs_total_effect` (atp_star, a magnitude)",
    "EstimateAgreement.n_prompts": "Prompts compared",
    "EstimateAgreement.n_components": "Components compared",
    "EstimateAgreement.k": "The k of the top-k recalls (10, or the number of components when fewer)",
    "EstimateAgreement.spearman_per_prompt_mean": (
        "Spearman's ρ across components within each prompt, mean over prompts (null when no prompt has spread)"
    ),
    "EstimateAgreement.spearman_per_prompt_median": "The median over prompts of the same per-prompt ρ",
    "EstimateAgreement.spearman_pooled": "Spearman's ρ over every (prompt, component)",
    "EstimateAgreement.spearman_of_means": "Spearman's ρ across components of the means over prompts",
    "EstimateAgreement.recall_at_k_per_prompt_mean": (
        "Share of the exact top-k components (by magnitude) found in the estimate's top-k, mean over prompts"
    ),
    "EstimateAgreement.recall_at_k_of_means": "The same recall on the means over prompts",
    "EstimateAgreement.mean_abs_error": "Mean over every (prompt, component) of |estimate − exact|",
    "EstimateAgreement.largest_misses": "The (prompt, component) pairs furthest from the exact value, largest first",
    "EstimateAgreement.n_pairs": (
        "Per-position jobs: the (prompt, position) pairs compared; the per-prompt statistics are then per pair and "
        "the means over pairs (null otherwise)"
    ),
    "EstimateMiss": "One (prompt, component) where an estimate is far from the exact value.",
    "EstimateMiss.index": "The prompt's index in the job",
    "EstimateMiss.component": "The component",
    "EstimateMiss.exact": "The exact value compared with: total_effect, or abs_total_effect for atp_star",
    "EstimateMiss.estimate": "The estimate",
    "EstimateMiss.error": "estimate − exact",
    "EstimateMiss.position": "Per-position jobs: the measured position of the miss (null otherwise)",
    "EstimateCost": "What a method cost per prompt, its shared clean passes excluded.",
    "EstimateCost.method": "`exact` (the exact engine), atp, atp_qkfix or atp_star",
    "EstimateCost.model_evaluations": "Forward plus backward passes, a pass over the prompt counting 1 (AtP's count)",
    "EstimateCost.forward_passes": "Forward passes per prompt (the clean run, each noise run, each ablated run)",
    "EstimateCost.backward_passes": "Backward passes per prompt (GradDrop's partial ones counted by their depth)",
    "EstimateCost.seconds": "Seconds per prompt of the method's own work (the clean passes excluded)",
    "EstimateCost.speedup": "The exact engine's seconds over this method's (null when it took no measurable time)",
    "EstimateError": "One method and component: the estimate's error beside the Hydra measures, over prompts.",
    "EstimateError.component": "The component",
    "EstimateError.method": "atp, atp_qkfix or atp_star",
    "EstimateError.error_mean": "Mean over prompts of estimate − exact",
    "EstimateError.abs_error_mean": "Mean over prompts of |estimate − exact|",
    "EstimateError.total_effect_mean": "Mean total effect over prompts",
    "EstimateError.compensatory_effect_mean": "Mean compensatory effect (CE) over prompts",
    "EstimateError.norm_response_mean": "Mean response of the final norm over prompts",
    "EstimateError.error_vs_ce": (
        "The error regressed on CE across prompts with a bootstrap interval of the slope: a slope of 1 means the "
        "miss is the compensation"
    ),
    "EstimateError.error_ce_correlation": "Pearson's r of the error and CE across prompts (null without spread)",
}

# A Fit is a Regression: its inherited fields read the same.
for _field in ("y", "x", "slope", "intercept", "r2", "n"):
    DOCS.setdefault(f"Fit.{_field}", DOCS[f"Regression.{_field}"])

DOCS.update(PATCH_DOCS)  # activation-patching types and fields (service/api/patch_schema_docs.py)
