"""The OpenAPI 3.1 document, generated from the route table and the models the handlers
read and write (`iotflow.api.models`): nothing here describes a shape of its own."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from iotflow import __version__
from iotflow.api.models import Error
from iotflow.api.table import Answer, Auth, Param, Route, RouteTable

_REF = "#/components/schemas/{model}"
Refs = dict[Any, dict[str, Any]]


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"name": param.name, "in": param.where}
    if param.required:
        out["required"] = True
    out["schema"] = param.schema
    if param.description:
        out["description"] = param.description
    return out


def _answer(answer: Answer, refs: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    schema: dict[str, Any] | None
    if answer.schema is not None:
        schema = answer.schema
    elif answer.model is not None:
        schema = refs[answer.model]
        if answer.many:
            schema = {"type": "array", "items": schema}
    else:
        schema = None
    if schema is not None:
        out["content"] = {answer.media_type: {"schema": schema}}
    if answer.headers:
        out["headers"] = {
            name: {"schema": {"type": "string"}, "description": text}
            for name, text in answer.headers
        }
    return out


def _responses(route: Route, refs: Refs) -> dict[str, Any]:
    out = {}
    answers = dict(route.answers)
    if route.forbidden is not None:
        answers.setdefault(403, route.forbidden)
    for status, answer in sorted(answers.items()):
        if status >= 400 and answer.model is None and answer.schema is None:
            answer = Answer(answer.description, Error, headers=answer.headers)
        out[str(status)] = _answer(answer, refs)
    return out


_SECURITY: dict[Auth, list[dict[str, list[str]]] | None] = {
    Auth.BEARER: None,  # the document's default
    Auth.DOWNLINK: [{"downlinkToken": []}],
    Auth.OWN: [],
    Auth.OPEN: [],
}


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": route.summary}
    description = route.description
    if route.auth is Auth.BEARER:
        role = route.least_role.value
        needs = f"Needs a token of role {role} or above ([api] tokens); otherwise 403."
        description = f"{description} {needs}" if description else needs
        out["x-iotflow-role"] = role
    if description:
        out["description"] = description
    security = _SECURITY[route.auth]
    if security is not None:
        out["security"] = security
    if route.parameters:
        out["parameters"] = [_parameter(p) for p in route.parameters]
    if route.request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[route.request]}},
        }
    out["responses"] = _responses(route, refs)
    return out


def _models(table: RouteTable) -> list[type[BaseModel]]:
    found: dict[type[BaseModel], None] = {Error: None}
    for route in table:
        for model in (route.request, *(a.model for a in route.answers.values())):
            if model is not None:
                found[model] = None
    return list(found)


def generate(table: RouteTable) -> dict[str, Any]:
    schemas, definitions = models_json_schema(
        [(m, "validation") for m in _models(table)], ref_template=_REF
    )
    refs = {model: schema for (model, _), schema in schemas.items()}
    paths: dict[str, dict[str, Any]] = {}
    for route in table:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    downlink = next((r.path for r in table if r.auth is Auth.DOWNLINK), None)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "iotflow",
            "version": __version__,
            "description": "Connections API following ThingPark X IoT Flow's.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "downlinkToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "Token",
                    "description": f"With AS_ID and Time; see POST {downlink}",
                },
            },
        },
    }
