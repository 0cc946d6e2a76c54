"""Write the IOI worked example's page from the stored result of bench/ioi_knockout.py: every number on the page is
read or computed here, none typed.

    python bench/ioi_report.py            # writes docs/results/ioi-knockout-gemma.md
    python bench/ioi_report.py --check    # exits 1 when the page differs from what the result gives
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "ioi-knockout-gemma.json"
PAGE = ROOT / "docs" / "results" / "ioi-knockout-gemma.md"
COMMAND = "python bench/ioi_knockout.py --model gemma-3-270m --pairs 32 --seed 1 --out bench/ioi-knockout-gemma.json"
MEASURES = (
    ("total_effect", "TE: the drop of the logit difference"),
    ("direct_effect", "DE: what the set wrote directly onto the logit difference"),
    ("compensatory_effect", "CE: the downstream components' responses (norm excluded)"),
    ("norm_response", "the final norm's response"),
)


def interval(value: dict[str, float]) -> str:
    return f"{value['mean']:+.2f} [{value['ci_low']:+.2f}, {value['ci_high']:+.2f}]"


def compensated_share(knockout: dict[str, Any]) -> float:
    """The share of the set's direct effect that the drop does not show: 1 − TE / DE."""
    return 1.0 - knockout["total_effect"]["mean"] / knockout["direct_effect"]["mean"]


def page(report: dict[str, Any]) -> str:
    knockout = report["knockout"]
    orders = report["orders"]
    responders = list(knockout["responses_above_zero"].items())
    lines = [
        "# Backup behaviour in indirect-object identification on Gemma-3-270M",
        "",
        "A worked example of what activation patching and a joint knockout show together: which heads carry the",
        "answer of an indirect-object-identification (IOI) prompt, and what takes over when they are removed. It is",
        "an exploration of one small base model on the service's built-in IOI pairs, not a reproduction of Wang et",
        "al.'s circuit. This page is written by `bench/ioi_report.py` from the stored result",
        "([ioi-knockout-gemma.json](bench/ioi-knockout-gemma.json)); no number on it is typed.",
        "",
        f"Run: `{COMMAND}` (the engine directly, CPU, float32).",
        "",
        "## Setup",
        "",
        f"- Model: {report['model']} (pretrained base model; prompts tokenised with its BOS token, as the service"
        " does).",
        f"- Pairs: {report['pairs']} built-in IOI pairs (seed {report['seed']}; {orders.count('ABBA')} ABBA, "
        f"{orders.count('BABA')} BABA); the corrupted prompt replaces the names by three other names.",
        "- Metric: logit(answer) − logit(counterfactual) at the final position (the indirect object against the"
        " subject).",
        f"- Clean metric {interval(report['clean_metric'])}; corrupted metric {interval(report['corrupted_metric'])}"
        f" (means over the pairs, 95% bootstrap intervals over the pairs, {report['bootstrap']} resamples).",
        "",
        "## 1. Which heads carry the answer: patching every head's output at the final position",
        "",
        "Each head's output at the final position is patched from the clean run into the corrupted run (denoising); a",
        "head's pooled score is (mean patched − mean corrupted) / (mean clean − mean corrupted) over the pairs.",
        "",
        "| rank | head | pooled patching score |",
        "|---:|---|---:|",
        *(f"| {rank} | `{row['head']}` | {row['pooled_score']:.3f} |"
          for rank, row in enumerate(report["top_heads_by_pooled_score"], start=1)),
        "",
        "## 2. What takes over: the top heads knocked out together",
        "",
        f"Knocked out: `{report['knocked_out']}`, chosen as {report['knockout_rule']}. The set is ablated by"
        f" {report['ablation']}, in one run per pair. Each measure is the mean over the pairs with its 95% bootstrap"
        " interval:",
        "",
        "| measure | mean [95% interval] |",
        "|---|---:|",
        *(f"| {label} | {interval(knockout[key])} |" for key, label in MEASURES),
        "",
    ]
    share = compensated_share(knockout)
    if responders:
        top_name, top = responders[0]
        lines += [
            f"The set's direct effect is {knockout['direct_effect']['mean']:.2f} logits, but the logit difference"
            f" drops by {knockout['total_effect']['mean']:.2f}: {100 * share:.0f}% of the direct effect does not show"
            f" in the output. {len(responders)} downstream component(s) respond with an interval wholly above 0;"
            f" the largest is `{top_name}` ({interval(top)}):",
            "",
            "| component | response (change of its direct effect) |",
            "|---|---:|",
            *(f"| `{name}` | {interval(value)} |" for name, value in responders),
            "",
        ]
    else:
        lines += ["No downstream component responds with an interval wholly above 0.", ""]
    lines += [
        "Each member knocked out alone:",
        "",
        "| head | TE | DE | CE | components responding above 0 |",
        "|---|---:|---:|---:|---|",
        *(f"| `{name}` | {interval(alone['total_effect'])} | {interval(alone['direct_effect'])} | "
          f"{interval(alone['compensatory_effect'])} | "
          f"{', '.join(f'`{c}`' for c in alone['responses_above_zero']) or 'none'} |"
          for name, alone in report["each_alone"].items()),
        "",
        "## What this shows, and what it does not",
        "",
        "- It shows compensation in a circuit: the components downstream of the knocked-out heads write more onto the",
        "  answer than they do on the clean prompt, so the drop (TE) understates what the heads wrote (DE), the Hydra",
        "  effect of the paper measured on IOI prompts.",
        "- Responses are per layer component (`attn.L`, `mlp.L`): the final-position engine's response basis. Which",
        "  heads inside a responding attention layer take over is not measured here.",
        "- On Gemma 3 a norm after attention mixes the heads of a layer, so a knockout set cannot hold heads of two",
        "  layers (the service refuses it): the set is the top heads of the best head's layer, not the overall top",
        "  heads.",
        "- Mean ablation over the pairs' own clean prompts, one seed of pairs, one small model: the intervals are over",
        "  pairs, not over seeds or models. The patching ranking uses the final position only.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = page(json.loads(RESULT.read_text()))
    if args.check:
        if PAGE.read_text() != text:
            sys.exit(f"{PAGE} differs from what {RESULT.name} gives: run python bench/ioi_report.py")
        return
    PAGE.write_text(text)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
