"""The submit form: form fields to a JobRequest, and the API's validation messages back to the form fields.

Pure functions, no I/O. The form sends only what the user filled in, so presets and defaults resolve exactly as
for a JSON submit; every check is the API's own (msgspec's schema, then `resolve`), so the page shows the same
messages the API would answer, next to the field they are about.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

import msgspec

from hydra_ablate_client.vocabulary import AblationKind, EstimateName, MetricName, PositionScope, PresetName
from hydra_ablate_client.wire import DatasetRef, JobRequest, Verify

# Choices offered by the form's selects, straight from the schema (so new values appear without touching the page).
CHOICES: dict[str, tuple[str, ...]] = {
    "preset": get_args(PresetName),
    "ablation": get_args(AblationKind),
    "positions": get_args(PositionScope),
    "metric": get_args(MetricName),
}
# Optional request fields other issues add to the schema: the form offers them once the schema has them.
OPTIONAL_FIELDS = ("name", "tags")
TEXT_FIELDS = ("name",)
# Dataset checkboxes: `use_answers` is a field of the dataset reference, `only_correct` (the paper's selection of
# prompts the model answers correctly) a field of the request; the form offers each where the schema has it.
DATASET_FLAGS = tuple(
    f for f in ("use_answers", "only_correct") if f in DatasetRef.__struct_fields__ or f in JobRequest.__struct_fields__
)
# Attribution-patching estimates: one checkbox per method (docs/concepts/attribution.md).
ESTIMATES: tuple[str, ...] = get_args(EstimateName)
# Estimates first, then the exact ablation of a verification set: one box per field of `verify` (top, random).
VERIFY_FIELDS: tuple[str, ...] = tuple(Verify.__struct_fields__)
FORM_FIELDS = (
    "name", "tags", "model", "preset", "source", "prompts", "dataset_limit", "dataset_offset", "dataset_relation",
    *(f"dataset_{flag}" for flag in DATASET_FLAGS), "components", "knockouts", "ablation", "positions", "metric",
    "resample_samples", "seed", *(f"estimates_{method}" for method in ESTIMATES), "estimates",
    *(f"verify_{name}" for name in VERIFY_FIELDS), "verify",
)  # fmt: skip
_PATH = re.compile(r"at `\$\.([A-Za-z_]+)(?:\.([A-Za-z_]+))?")


def request_has(name: str) -> bool:
    return name in JobRequest.__struct_fields__


@dataclass
class FormOutcome:
    """The request the form describes, or the messages per form field ("" = about the form as a whole)."""

    request: JobRequest | None
    errors: dict[str, str] = field(default_factory=dict)


def _int_or_raw(raw: str) -> int | str:
    """An integer when the text is one; otherwise the text itself, so the schema reports it as the API would."""
    try:
        return int(raw.strip())
    except ValueError:
        return raw


def _split(raw: str, pattern: str) -> list[str]:
    return [part.strip() for part in re.split(pattern, raw) if part.strip()]


def form_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The JSON body the form describes: only the fields the user filled in."""
    body: dict[str, Any] = {}

    def get(name: str) -> str:
        return (form.get(name) or "").strip()

    for name in ("model", "preset", "ablation", "positions", "metric"):
        if get(name):
            body[name] = get(name)
    for name in ("resample_samples", "seed"):
        if get(name):
            body[name] = _int_or_raw(get(name))
    if get("components"):
        body["components"] = _split(get("components"), r"[,\s]+")
    # Knockouts: one set per line, its members separated by commas, spaces or "+" (a set's own name). With sets
    # and an empty components box only the sets are measured (the preset's components would otherwise be added).
    knockouts = [_split(line, r"[,\s+]+") for line in (form.get("knockouts") or "").splitlines() if line.strip()]
    if knockouts:
        body["knockouts"] = knockouts
        body.setdefault("components", [])
    estimates = [method for method in ESTIMATES if get(f"estimates_{method}")]
    if estimates:
        body["estimates"] = estimates
    # Verify: sent when either box is filled; an empty box then counts none (0) of its kind.
    verify = {name: _int_or_raw(get(f"verify_{name}")) for name in VERIFY_FIELDS if get(f"verify_{name}")}
    if verify:
        body["verify"] = {name: verify.get(name, 0) for name in VERIFY_FIELDS}
    if request_has("name") and get("name"):
        body["name"] = get("name")
    if request_has("tags") and get("tags"):
        body["tags"] = _split(get("tags"), r",")
    source = get("source") or "prompts"
    if source == "dataset":
        dataset: dict[str, Any] = {"name": "known_1000"}
        if get("dataset_limit"):
            dataset["limit"] = _int_or_raw(get("dataset_limit"))
        if get("dataset_offset"):
            dataset["offset"] = _int_or_raw(get("dataset_offset"))
        if get("dataset_relation"):
            dataset["relation"] = get("dataset_relation")
        for flag in DATASET_FLAGS:
            if get(f"dataset_{flag}"):
                (dataset if flag in DatasetRef.__struct_fields__ else body)[flag] = True
        body["dataset"] = dataset
    elif source == "prompts":
        # An empty box is sent as an empty list: the API's "at least one prompt" message, unless a preset brings
        # its own dataset.
        prompts = [line.strip() for line in (form.get("prompts") or "").splitlines() if line.strip()]
        if prompts or not get("preset"):
            body["prompts"] = prompts
    else:
        body["source"] = source  # not a request field: the schema refuses it by name
    return body


_API_FIELD = re.compile(r"^([A-Za-z_]+)(?:\[\d+\])?(?:\.([A-Za-z_]+))?")


def form_field(api_field: str | None, sub: str | None = None) -> str:
    """The form field an API field path (`components[3]`, `dataset.limit`) is about ("" when none fits: shown above
    the form)."""
    match = _API_FIELD.match(api_field or "")
    if match is None:
        return ""
    api_field, sub = match.group(1), sub or match.group(2)
    if api_field == "dataset":
        return f"dataset_{sub}" if sub and f"dataset_{sub}" in FORM_FIELDS else "source"
    if api_field == "verify":
        return f"verify_{sub}" if sub and f"verify_{sub}" in FORM_FIELDS else "verify"
    if api_field == "answers":
        return "source"
    return api_field if api_field in FORM_FIELDS else ""


def parse_form(form: Mapping[str, str]) -> FormOutcome:
    """Schema check of the form's request: the API's 400 messages, each placed at its field."""
    try:
        return FormOutcome(msgspec.convert(form_body(form), JobRequest))
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        target = form_field(match.group(1), match.group(2)) if match else ""
        return FormOutcome(None, {target: message})
