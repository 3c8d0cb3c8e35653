"""A connection's `upOperations`, compiled once (when its worker is made) and applied to
each delivery's document before the sink.

`Pipeline.apply` returns the new document, or `None` when a filter says not to send it;
a failing operation raises `ProcessorError` ("upOperations[1] jsonata: ..."), which the
worker turns into a `failed` delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from iotflow.errors import IotflowError
from iotflow.processors import builtins
from iotflow.processors.operations import (
    FLATTENER,
    PLACEHOLDER,
    CallProcessor,
    Filter,
    JmespathTemplate,
    JsonataExpression,
    compile_jmespath,
    compile_jsonata,
    operation_model,
)

# The bound on one JSONata evaluation: the library checks its clock and its call depth at
# every step, so an expression that loops or recurses without end stops with an error
# (a failed delivery) instead of holding the event loop.
JSONATA_TIMEOUT_MS = 100
JSONATA_MAX_DEPTH = 200


class ProcessorError(IotflowError):
    """An operation could not transform a document (the delivery fails with this reason)."""

    def __init__(self, index: int, kind: str, message: str) -> None:
        super().__init__(f"upOperations[{index}] {kind}: {message}")
        self.index = index
        self.kind = kind


Transform = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Step:
    index: int
    kind: str  # for the reason: "jsonata", "MESSAGE_FLATTENER", "filter"...
    condition: Any | None  # a compiled JMESPath expression
    transform: Transform | None  # None for a filter
    keep: Any  # a filter's compiled expression (None for the others)


def _truthy(value: Any) -> bool:
    # JMESPath's own notion of false: null, false, "", [], {} (0 is true, as in JMESPath).
    return not (value is None or value is False or value == "" or value == [] or value == {})


def _jmespath_transform(template: Any) -> Transform:
    # Compiled once: each `{{ expr }}` string maps to its compiled expression.
    expressions: dict[str, Any] = {}
    _collect(template, expressions)

    def transform(document: Any) -> Any:
        values = {text: expression.search(document) for text, expression in expressions.items()}
        return _substitute(template, values)

    return transform


def _collect(template: Any, into: dict[str, Any]) -> None:
    if isinstance(template, str):
        match = PLACEHOLDER.match(template)
        if match and template not in into:
            into[template] = compile_jmespath(match.group(1))
    elif isinstance(template, dict):
        for item in template.values():
            _collect(item, into)
    elif isinstance(template, list):
        for item in template:
            _collect(item, into)


def _substitute(template: Any, values: dict[str, Any]) -> Any:
    if isinstance(template, str):
        return values.get(template, template)
    if isinstance(template, dict):
        return {key: _substitute(item, values) for key, item in template.items()}
    if isinstance(template, list):
        return [_substitute(item, values) for item in template]
    return template


def _jsonata_transform(expression: str) -> Transform:
    compiled = compile_jsonata(expression)

    def transform(document: Any) -> Any:
        # Set at each evaluation: the library's bound starts its clock when it is set.
        compiled.environment.set_runtime_bounds(JSONATA_TIMEOUT_MS, JSONATA_MAX_DEPTH)
        result = compiled.evaluate(document)
        if result is None:
            raise ValueError("the expression gave no value")
        return result

    return transform


class Pipeline:
    """Compiled operations, applied in order."""

    def __init__(self, operations: list[dict[str, Any]]) -> None:
        self._steps: list[_Step] = []
        for index, document in enumerate(operations):
            operation = operation_model(document)
            condition = (
                compile_jmespath(operation.condition) if operation.condition is not None else None
            )
            if isinstance(operation, Filter):
                step = _Step(
                    index, "filter", condition, None, compile_jmespath(operation.expression)
                )
            elif isinstance(operation, CallProcessor):
                function = builtins.flatten if operation.id == FLATTENER else builtins.simplify
                step = _Step(index, operation.id, condition, function, None)
            elif isinstance(operation, JmespathTemplate):
                step = _Step(
                    index, "jmespath", condition, _jmespath_transform(operation.template), None
                )
            else:
                assert isinstance(operation, JsonataExpression)
                step = _Step(
                    index, "jsonata", condition, _jsonata_transform(operation.expression), None
                )
            self._steps.append(step)

    def __len__(self) -> int:
        return len(self._steps)

    def apply(self, document: Any) -> Any | None:
        """The transformed document, or None when a filter drops it."""
        for step in self._steps:
            try:
                if step.condition is not None and not _truthy(step.condition.search(document)):
                    continue
                if step.transform is None:
                    if not _truthy(step.keep.search(document)):
                        return None
                    continue
                document = step.transform(document)
            except Exception as exc:
                raise ProcessorError(step.index, step.kind, _message(exc)) from exc
        return document

    def apply_bytes(self, document: bytes) -> bytes | None:
        """`apply` on a delivery's JSON bytes; the result re-serialised."""
        try:
            parsed = orjson.loads(document)
        except orjson.JSONDecodeError as exc:
            raise ProcessorError(0, "input", f"the document is not JSON: {exc}") from exc
        result = self.apply(parsed)
        if result is None:
            return None
        try:
            return orjson.dumps(result)
        except TypeError as exc:
            last = self._steps[-1]
            raise ProcessorError(last.index, last.kind, f"result is not JSON: {exc}") from exc


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
