"""The finishing pass over the app's OpenAPI document, so generated clients read well (issue 12).

- nullable types instead of one-element `oneOf`: `oneOf: [X]` (an optional field's only arm) becomes X, and
  `oneOf: [{type: T}, {type: null}]` becomes `type: [T, "null"]`;
- a description on every schema and property (service/api/schema_docs.py) and every parameter;
- examples on the submit body: the README's curl body and each preset;
- readable operationIds (`operation_id`, used by OpenAPIConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from litestar.openapi.spec import Example, OpenAPI, OpenAPIType, Reference, Schema

from service.api.schema_docs import DOCS
from service.core.resolve import PRESETS

# Handler function name -> operationId, where the default (e.g. V1JobsSubmit) reads badly.
OPERATION_IDS = {
    "submit": "submitJob",
    "get_result": "getJobResult",
    "get_figure": "getJobFigure",
    "list_models": "listModels",
    "health": "getHealth",
    "ready": "getReadiness",
}

README_EXAMPLE = {
    "model": "smollm2-135m",
    "prompts": [
        "The Eiffel Tower is located in the city of",
        "Beats Music is owned by",
        "Vinson Massif is located in the continent of",
    ],
    "components": ["attn", "mlp"],
    "ablation": "resample",
    "positions": "final",
    "metric": "logit",
    "seed": 0,
}


def operation_id(route_handler: Any, http_method: Any, path_components: list[Any]) -> str:
    """OpenAPIConfig.operation_id_creator: explicit ids win, then OPERATION_IDS, then camelCase of the handler."""
    name = route_handler.handler_name
    if name in OPERATION_IDS:
        return OPERATION_IDS[name]
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _merge(into: Schema, source: Schema) -> None:
    for field in dataclasses.fields(source):
        value = getattr(source, field.name)
        if value is not None and getattr(into, field.name) is None:
            setattr(into, field.name, value)


def _is_null(value: Any) -> bool:
    return isinstance(value, Schema) and value.type == OpenAPIType.NULL and not value.one_of


def _fix(value: Any) -> Any:
    """`value` with every one-element oneOf flattened and every [T, null] made a nullable type."""
    if isinstance(value, list):
        return [_fix(item) for item in value]
    if isinstance(value, dict):
        return {key: _fix(item) for key, item in value.items()}
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    for field in dataclasses.fields(value):
        current = getattr(value, field.name)
        if current is not None and not isinstance(current, (str, int, float, bool)):
            setattr(value, field.name, _fix(current))
    if isinstance(value, Schema) and value.one_of:
        arms = value.one_of
        if len(arms) == 1:
            only = arms[0]
            if isinstance(only, Reference):
                return Reference(ref=only.ref, description=value.description or only.description)
            value.one_of = None
            _merge(value, only)
        elif len(arms) == 2 and any(_is_null(arm) for arm in arms):
            other = next(arm for arm in arms if not _is_null(arm))
            if isinstance(other, Schema) and isinstance(other.type, OpenAPIType) and not other.one_of:
                value.one_of = None
                _merge(value, dataclasses.replace(other, type=None))
                value.type = [other.type, OpenAPIType.NULL]
    return value


def _describe(openapi: OpenAPI) -> None:
    schemas = openapi.components.schemas if openapi.components and openapi.components.schemas else {}
    for name, schema in schemas.items():
        if not isinstance(schema, Schema):
            continue
        schema.description = schema.description or DOCS.get(name)
        for prop, sub in (schema.properties or {}).items():
            if isinstance(sub, (Schema, Reference)) and not sub.description:
                sub.description = DOCS.get(f"{name}.{prop}")


def _examples(openapi: OpenAPI) -> None:
    examples = {"readme": Example(summary="The README's curl body: three prompts on SmolLM2", value=README_EXAMPLE)}
    for preset in PRESETS:
        examples[f"preset_{preset}"] = Example(
            summary=f"The `{preset}` preset on 100 known_1000 prompts",
            value={"preset": preset, "dataset": {"name": "known_1000", "limit": 100}},
        )
    for item in (openapi.paths or {}).values():
        operation = getattr(item, "post", None)
        if operation is None or operation.operation_id != "submitJob" or operation.request_body is None:
            continue
        body = operation.request_body
        media = body.content.get("application/json") if hasattr(body, "content") else None
        if media is not None:
            media.examples = examples


def _operations(openapi: OpenAPI) -> list[Any]:
    methods = ("get", "put", "post", "delete", "patch")
    return [op for item in (openapi.paths or {}).values() for op in (getattr(item, m, None) for m in methods) if op]


def _optional_parameters(openapi: OpenAPI) -> None:
    """An optional query or header parameter is simply left out: no `null` in its type or enum."""
    for operation in _operations(openapi):
        for parameter in operation.parameters or []:
            schema = getattr(parameter, "schema", None)
            if getattr(parameter, "required", False) or not isinstance(schema, Schema):
                continue
            if isinstance(schema.type, list):
                kept = [t for t in schema.type if t != OpenAPIType.NULL]
                schema.type = kept[0] if len(kept) == 1 else kept
            if schema.enum:
                schema.enum = [value for value in schema.enum if value is not None]


PARAMETER_DOCS = {"job_id": "The job id (32 hex digits), as POST /v1/jobs returned it"}


def _describe_parameters(openapi: OpenAPI) -> None:
    """Parameters declared without a description (path parameters) get PARAMETER_DOCS's."""
    for operation in _operations(openapi):
        for parameter in operation.parameters or []:
            if not getattr(parameter, "description", None) and getattr(parameter, "name", None) in PARAMETER_DOCS:
                parameter.description = PARAMETER_DOCS[parameter.name]  # type: ignore[union-attr]


def polish(openapi: OpenAPI) -> OpenAPI:
    """Apply every step above in place (the app caches the object, so /schema serves the polished document)."""
    _fix(openapi)
    _optional_parameters(openapi)
    _describe(openapi)
    _describe_parameters(openapi)
    _examples(openapi)
    return openapi
