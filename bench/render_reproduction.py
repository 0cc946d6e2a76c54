"""Draw the reproductions' figures from the raw results of bench/reproduce_hydra.py and
bench/reproduce_rushing_nanda.py, derive the correctly answered subset, then write the pages.

    python bench/render_reproduction.py

Reads .bench-out/hydra_<model>_{all_seeds,different_target,samples}.json and rushing_nanda_<model>_result.json
(whichever exist; <model> is gemma or smollm2) and writes into docs/results/reproduction/:

- hydra_<model>_correct_summary.json: the prompts of the all_seeds run whose clean top token is the first token of
  their known_1000 answer, summarised by the service's own summary code (worker/summary.py) from that run's
  per-prompt results, with the same sources;
- the paper's figures as PNG (1200 × 800), named <figure>_<model>_<run>.png, and profile_<model>.png from the samples
  job;
- then the pages, through bench/reproduction_report.py (from the summaries alone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec
from msgspec.structs import replace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import reproduction_report
from bench.reproduce_hydra import summary_document
from hydra_ablate_client.vocabulary import FigureName
from hydra_ablate_client.wire import JobResult
from service.rendering.figures import render

RAW = ROOT / ".bench-out"
OUT = reproduction_report.OUT
FIGURES: dict[str, tuple[FigureName, ...]] = {
    "all_seeds": ("fig2", "fig7", "fig8", "erasure", "response_heatmap", "layer_effects"),
    "correct": ("fig2", "fig7", "fig8", "erasure"),
    "different_target": ("fig2", "fig7", "fig8"),
}


def load(slug: str, name: str) -> JobResult | None:
    path = RAW / f"hydra_{slug}_{name}.json"
    return msgspec.json.decode(path.read_bytes(), type=JobResult) if path.exists() else None


def correct_subset(result: JobResult, alias: str) -> JobResult:
    """The all-prompts result cut to the prompts the model answers correctly (its clean top token, the measured
    target, is the answer's first token: the service's `only_correct` rule), with the summary recomputed."""
    from transformers import AutoTokenizer

    from service.core.datasets import select
    from worker.engine.types import SweepResult
    from worker.job_runner import NEAR_TIE_GAP
    from worker.model_sources import parse_source
    from worker.summary import summarise

    spec = result.provenance.spec
    fields = spec.prompt_fields
    if fields is None or spec.dataset is None:
        raise SystemExit("the all-prompts result has no dataset fields: it was not run on known_1000")
    answers = select(spec.dataset)[1]  # the answers only_correct compares with, as the service spells them
    source = parse_source(alias)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)

    def answer_token(text: str) -> int:
        return int(tokenizer(text, add_special_tokens=False).input_ids[0])

    kept = [p for p in result.prompts if answer_token(answers[p.index]) == p.target_id]
    summary = summarise(
        # The wire's PromptResult carries every field summarise reads (as when the worker merges chunks).
        SweepResult(result.components, result.response_basis, prompts=kept),  # type: ignore[arg-type]
        NEAR_TIE_GAP[result.provenance.dtype],
        seed=spec.seed,
        n_candidates=len(spec.prompts),
        only_correct=True,
        relations=[fields[p.index].relation for p in kept],
    )
    return replace(result, prompts=kept, summary=summary)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for model in reproduction_report.MODELS:
        results = {name: load(model.slug, name) for name in ("all_seeds", "different_target")}
        everything = results["all_seeds"]
        if everything is not None:
            subset = correct_subset(everything, model.alias)
            results["correct"] = subset
            summary_path = OUT / f"hydra_{model.slug}_all_seeds_summary.json"
            base = json.loads(summary_path.read_text())
            document = summary_document(subset, float(base["elapsed_s"]), base["request"])
            document["derived_from"] = (
                f"hydra_{model.slug}_all_seeds: its prompts whose clean top token is the first token of the answer"
            )
            (OUT / f"hydra_{model.slug}_correct_summary.json").write_text(json.dumps(document, indent=1))
        for run, result in results.items():
            if result is None:
                print(f"{model.slug}: no raw result for {run}; skipped")
                continue
            for name in FIGURES[run]:
                (OUT / f"{name}_{model.slug}_{run}.png").write_bytes(render(result, name, "png"))
            print(f"{model.slug} {run}: {len(FIGURES[run])} figures written")
        samples = load(model.slug, "samples")
        if samples is not None:
            (OUT / f"profile_{model.slug}.png").write_bytes(render(samples, "profile", "png"))
            print(f"{model.slug}: profile written")
        rn = RAW / f"rushing_nanda_{model.slug}_result.json"
        if rn.exists():
            result = msgspec.json.decode(rn.read_bytes(), type=JobResult)
            (OUT / f"self_repair_{model.slug}.png").write_bytes(render(result, "self_repair", "png"))
            print(f"{model.slug}: self_repair written")
    for path, text in reproduction_report.pages().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
