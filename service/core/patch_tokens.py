"""A patching job's pairs against the model's tokenizer (published by the workers, service/core/prompt_tokens.py):
clean and corrupted prompts of one token length, one-token answers and counterfactuals, prompts under the cap.

Checked on submit, so a pair that cannot be patched is a 422 naming it rather than a failed job; without a published
tokenizer the checks are skipped and the worker refuses the same pairs (worker/patch_execution.py). A job's
`pair_dataset` is drawn here too, on the same tokenizer, so that the spec queued lists its pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra_ablate_client.wire import JobSpec
from service.core.errors import BackendUnavailable, ValidationProblem
from service.core.ioi_pairs import ioi_pairs
from service.core.settings import Settings

MAX_SHOWN_TOKENS = 40  # a long prompt's tokens are shown cut, with the count


def check_pair_tokens(spec: JobSpec, tokenizer_for: Callable[[str], Any | None], settings: Settings) -> None:
    """422 for the first pair whose prompts differ in length, whose answer or counterfactual is several tokens, or
    whose prompt is over `max_prompt_tokens`; nothing to do without a tokenizer."""
    if spec.corrupted is None:
        return
    tokenizer = tokenizer_for(spec.model)
    if spec.pair_dataset is not None and not spec.prompts:
        draw_pairs(spec, tokenizer)
    if tokenizer is None:
        return
    answers = spec.answers or []
    counterfactuals = spec.counterfactuals or []
    for index, (clean, corrupted) in enumerate(zip(spec.prompts, spec.corrupted, strict=True)):
        clean_tokens = tokenizer.encode(clean).tokens
        corrupted_tokens = tokenizer.encode(corrupted).tokens
        if len(clean_tokens) != len(corrupted_tokens):
            raise ValidationProblem(
                f"pairs[{index}]: the clean prompt is {len(clean_tokens)} tokens long and the corrupted one "
                f"{len(corrupted_tokens)} on model {spec.model}; patching aligns them position by position, so make "
                f"them the same length. Clean tokens: {_shown(clean_tokens)}; corrupted tokens: "
                f"{_shown(corrupted_tokens)}",
                f"pairs[{index}].corrupted",
            )
        if settings.max_prompt_tokens > 0 and len(clean_tokens) > settings.max_prompt_tokens:
            raise ValidationProblem(
                f"pairs[{index}]: the prompts are {len(clean_tokens):,} tokens long for model {spec.model}, above "
                f"this server's limit of {settings.max_prompt_tokens:,} tokens per prompt; shorten them",
                f"pairs[{index}].clean",
            )
        for what, texts in (("answer", answers), ("counterfactual", counterfactuals)):
            tokens = tokenizer.encode(texts[index], add_special_tokens=False).tokens
            if len(tokens) != 1:
                raise ValidationProblem(
                    f"pairs[{index}].{what} {texts[index]!r} is {len(tokens)} tokens on model {spec.model} "
                    f"({_shown(tokens)}); the metric reads one token's logit: give a {what} that is one token "
                    "(often with its leading space, e.g. ' Paris')",
                    f"pairs[{index}].{what}",
                )


def draw_pairs(spec: JobSpec, tokenizer: Any | None) -> None:
    """Fill the spec's pairs from its pair dataset, drawn with its seed on the model's tokenizer (only one-token
    names are used, so clean and corrupted prompts have one length): the spec the worker runs lists them."""
    assert spec.pair_dataset is not None
    if tokenizer is None:
        raise BackendUnavailable(
            f"pair_dataset is drawn on model {spec.model}'s tokenizer, which no worker has published yet; try again "
            "in a minute, or give pairs"
        )
    try:
        pairs = ioi_pairs(
            spec.pair_dataset.limit, spec.seed, lambda text: tokenizer.encode(text, add_special_tokens=False).ids
        )
    except ValueError as error:
        raise ValidationProblem(f"pair_dataset {spec.pair_dataset.name!r} on model {spec.model}: {error}",
                                "pair_dataset") from None
    spec.prompts = [p.clean for p in pairs]
    spec.corrupted = [p.corrupted for p in pairs]
    spec.answers = [p.answer for p in pairs]
    spec.counterfactuals = [p.counterfactual for p in pairs]


def _shown(tokens: list[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:MAX_SHOWN_TOKENS])
    more = len(tokens) - MAX_SHOWN_TOKENS
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"
