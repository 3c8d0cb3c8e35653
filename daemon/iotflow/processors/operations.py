"""`upOperations`: what an operator writes, validated at the edge with key paths.

An operation is one of (docs/processors.md):
- `{"type": "callProcessor", "id": "MESSAGE_FLATTENER" | "MESSAGE_SIMPLIFIER"}`
- `{"type": "jmespath", "template": <JSON>}`
- `{"type": "jsonata", "expression": "..."}`
- `{"type": "filter", "expression": "<jmespath>"}`
each with an optional `condition` (JMESPath). Expressions are compiled here, so that one
that does not compile is a 422 with its path (`upOperations.1.expression`), not a failed
delivery later.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import jmespath
import jsonata
from jmespath.exceptions import JMESPathError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from iotflow.errors import Problem

FLATTENER = "MESSAGE_FLATTENER"
SIMPLIFIER = "MESSAGE_SIMPLIFIER"
MAX_OPERATIONS = 32
MAX_EXPRESSION = 8192

# A template string that is exactly one `{{ expr }}` (the product's JMESPath processor).
PLACEHOLDER = re.compile(r"^\{\{\s*(.+?)\s*\}\}$", re.DOTALL)

_Expression = Annotated[str, Field(min_length=1, max_length=MAX_EXPRESSION)]


def compile_jmespath(expression: str) -> Any:
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        raise ValueError(f"not a JMESPath expression: {_first_line(exc)}") from None


def compile_jsonata(expression: str) -> Any:
    try:
        return jsonata.Jsonata(expression)
    except Exception as exc:  # the library raises its own JException (and others) on syntax
        raise ValueError(f"not a JSONata expression: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def template_expressions(value: Any, path: str = "template") -> list[tuple[str, str]]:
    """(key path, expression) of every `{{ expr }}` string in a template."""
    found: list[tuple[str, str]] = []
    if isinstance(value, str):
        match = PLACEHOLDER.match(value)
        if match:
            found.append((path, match.group(1)))
    elif isinstance(value, dict):
        for key, item in value.items():
            found += template_expressions(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += template_expressions(item, f"{path}.{index}")
    return found


class _Operation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    condition: _Expression | None = None

    @field_validator("condition")
    @classmethod
    def _condition(cls, value: str | None) -> str | None:
        if value is not None:
            compile_jmespath(value)
        return value


class CallProcessor(_Operation):
    """A built-in processor of the product, by id."""

    type: Literal["callProcessor"]
    id: Literal["MESSAGE_FLATTENER", "MESSAGE_SIMPLIFIER"]


class JmespathTemplate(_Operation):
    """A JSON template; strings that are exactly `"{{ expr }}"` become the JMESPath result."""

    type: Literal["jmespath"]
    template: dict[str, Any] | list[Any] | str

    # Its `{{ expr }}` strings are compiled by parse_operations, for a path to each one.


class JsonataExpression(_Operation):
    """A JSONata expression whose result is the new document."""

    type: Literal["jsonata"]
    expression: _Expression

    @field_validator("expression")
    @classmethod
    def _expression(cls, value: str) -> str:
        compile_jsonata(value)
        return value


class Filter(_Operation):
    """A JMESPath expression: falsy, the delivery is not sent (outcome `filtered`)."""

    type: Literal["filter"]
    expression: _Expression

    @field_validator("expression")
    @classmethod
    def _expression(cls, value: str) -> str:
        compile_jmespath(value)
        return value


Operation = CallProcessor | JmespathTemplate | JsonataExpression | Filter
# For the OpenAPI document: one branch per `type`.
UpOperation = Annotated[Operation, Field(discriminator="type")]

_BY_TYPE: dict[str, type[_Operation]] = {
    "callProcessor": CallProcessor,
    "jmespath": JmespathTemplate,
    "jsonata": JsonataExpression,
    "filter": Filter,
}

TYPES = tuple(_BY_TYPE)


def parse_operations(raw: Any) -> tuple[list[dict[str, Any]] | None, list[Problem]]:
    """Validate `upOperations`: (their canonical documents, problems with key paths).

    Each operation is validated by its own `type`, so that a path reads
    `upOperations.1.expression` rather than naming the union's branch.
    """
    from iotflow.connectors.connection import problems_of  # the one formatter of paths

    if raw is None:
        return None, []
    if not isinstance(raw, list):
        return None, [Problem("upOperations", "must be a list of operations")]
    if len(raw) > MAX_OPERATIONS:
        return None, [Problem("upOperations", f"at most {MAX_OPERATIONS} operations")]
    problems: list[Problem] = []
    documents: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        where = f"upOperations.{index}"
        if not isinstance(item, dict):
            problems.append(Problem(where, "must be an object"))
            continue
        kind = item.get("type")
        model = _BY_TYPE.get(kind) if isinstance(kind, str) else None
        if model is None:
            problems.append(Problem(f"{where}.type", f"must be one of {', '.join(TYPES)}"))
            continue
        try:
            operation = model.model_validate(item)
        except ValidationError as exc:
            problems.extend(problems_of(exc, where))
            continue
        if isinstance(operation, JmespathTemplate):
            failed = False
            for path, expression in template_expressions(operation.template):
                try:
                    compile_jmespath(expression)
                except ValueError as exc:
                    problems.append(Problem(f"{where}.{path}", str(exc)))
                    failed = True
            if failed:
                continue
        documents.append(operation.model_dump(mode="json", exclude_none=True))
    return documents, problems


def operation_model(document: dict[str, Any]) -> Operation:
    """An operation from its (already validated) document."""
    model = _BY_TYPE[document["type"]]
    return model.model_validate(document)  # type: ignore[return-value]
