"""Reading requests: JSON bodies, pagination, DevEUIs in paths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from iotflow.api.errors import ApiError, invalid
from iotflow.api.table import Param
from iotflow.connectors.connection import problems_of
from iotflow.errors import Problem
from iotflow.formats import normalize_dev_eui
from iotflow.formats.fields import DEV_EUI_PATTERN

M = TypeVar("M", bound=BaseModel)

DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100
MAX_PAGE = 1_000_000


async def read_json_bytes(request: web.Request) -> bytes:
    """The request's body, declared as JSON, as bytes; or the right error (415, 413)."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    return await request.read()  # aiohttp answers 413 past client_max_size


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or the right error (415, 413, 400)."""
    raw = await read_json_bytes(request)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"The body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "The body must be a JSON object.")
    return data


# The query parameters `page_params` reads, as the document shows them.
PAGE = (
    Param("page", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 1}),
    Param(
        "perPage",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE, "default": DEFAULT_PER_PAGE},
    ),
)
# The path parameter `dev_eui_param` reads.
DEV_EUI = Param(
    "devEUI",
    "path",
    {"type": "string", "pattern": DEV_EUI_PATTERN},
    required=True,
    description="16 hex digits; '-' or ':' separators and lower case accepted",
)
# The headers of a page (`paginated`).
PAGE_HEADERS = (
    ("X-Total", "items in all pages"),
    ("X-Total-Pages", "number of pages"),
    ("X-Page", "this page"),
)


def validated(model: type[M], body: dict[str, Any]) -> M:
    """`body` read as `model`, or a 422 naming each field's problem (never its value)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid(problems_of(exc)) from None


def page_params(request: web.Request) -> tuple[int, int]:
    """`page` (1 to 1 000 000) and `perPage` (1 to 100, default 20) from the query."""
    problems: list[Problem] = []
    values: dict[str, int] = {}
    for name, default, high in (
        ("page", 1, MAX_PAGE),
        ("perPage", DEFAULT_PER_PAGE, MAX_PER_PAGE),
    ):
        text = request.query.get(name)
        if text is None:
            values[name] = default
            continue
        try:
            value = int(text)
        except ValueError:
            problems.append(Problem(name, "expected an integer"))
            continue
        if not 1 <= value <= high:
            problems.append(Problem(name, f"must be between 1 and {high}"))
            continue
        values[name] = value
    if problems:
        raise ApiError(400, "invalid_query", "The query parameters are invalid.", problems)
    return values["page"], values["perPage"]


def paginated(items: Sequence[Any], total: int, page: int, per_page: int) -> web.Response:
    pages = max(1, math.ceil(total / per_page))
    headers = {"X-Total": str(total), "X-Total-Pages": str(pages), "X-Page": str(page)}
    return web.json_response(list(items), headers=headers, dumps=_dumps)


def json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def dump(model: BaseModel) -> Any:
    """A model as the API writes it: fields left unset (an absent brand) left out."""
    return model.model_dump(mode="json", exclude_unset=True)


def _dumps(data: Any) -> str:
    return orjson.dumps(data).decode()


def dev_eui_param(request: web.Request) -> str:
    try:
        return normalize_dev_eui(request.match_info["devEUI"])
    except ValueError:
        raise ApiError(
            400,
            "invalid_dev_eui",
            "A DevEUI is 16 hex digits (separators '-' or ':' allowed).",
            [Problem("devEUI", "expected 16 hex digits")],
        ) from None
