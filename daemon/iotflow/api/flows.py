"""The flows API: `/iot-flow/v1/flows`, in the product's shape (issue #13).

Every change is in the registry, and in the router (`ControlPlane.refresh`), before the
call returns. Provisioned flows (the config file's `[[flows]]`) are read-only: 409.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from iotflow.api.auth import principal_of
from iotflow.api.body import PAGE, PAGE_HEADERS, json, page_params, paginated, read_object
from iotflow.api.control import CONTROL, ControlPlane
from iotflow.api.errors import ApiError, invalid
from iotflow.api.table import BASE, Answer, Param, RouteTable, errors
from iotflow.connectors.connection import ID_PATTERN
from iotflow.errors import Problem
from iotflow.flows.model import Flow, FlowInput, FlowView, parse_flow

__all__ = ["flow_routes"]

_FLOW_ID = re.compile(ID_PATTERN)
_ID = Param("id", "path", {"type": "string", "pattern": ID_PATTERN}, required=True)

flow_routes = RouteTable()


def _errors(*statuses: int) -> dict[int, Answer]:
    return errors(*statuses, what="flow")


def _control(request: web.Request) -> ControlPlane:
    return request.app[CONTROL]


def _flow_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if not _FLOW_ID.match(value):
        raise ApiError(404, "not_found", f"No flow {value!r}.")
    return value


def _view(flow: Flow) -> dict[str, Any]:
    return {**flow.document(), "provisioned": flow.provisioned}


def _input(body: dict[str, Any]) -> dict[str, Any]:
    # What GET shows and a client may send back unchanged.
    return {k: v for k, v in body.items() if k != "provisioned"}


def _record(
    control: ControlPlane, request: web.Request, kind: str, flow_id: str, connections: Iterable[str]
) -> None:
    """A flow changed through the API is an event of each connection it routes (or routed) to."""
    by = principal_of(request).name
    for cid in sorted(set(connections)):
        control.record(cid, kind, {"by": by, "flow": flow_id})


def _read_only(flow_id: str) -> ApiError:
    return ApiError(
        409,
        "read_only",
        f"Flow {flow_id!r} is provisioned by the config file; change it there and reload.",
    )


@flow_routes.route(
    "GET",
    f"{BASE}/flows",
    summary="List flows",
    parameters=PAGE,
    answers={200: Answer("A page", FlowView, many=True, headers=PAGE_HEADERS), **_errors(400)},
)
async def list_flows(request: web.Request) -> web.Response:
    page, per_page = page_params(request)
    flows = await _control(request).registry.list_flows()
    start = (page - 1) * per_page
    chosen = flows[start : start + per_page]
    return paginated([_view(f) for f in chosen], len(flows), page, per_page)


@flow_routes.route(
    "POST",
    f"{BASE}/flows",
    summary="Create a flow",
    request=FlowInput,
    answers={
        201: Answer("Created", FlowView, headers=(("Location", "the new flow"),)),
        **_errors(400, 409, 413, 415, 422),
    },
)
async def create_flow(request: web.Request) -> web.Response:
    control = _control(request)
    body = _input(await read_object(request))
    flow = parse_flow(body, default_id=uuid.uuid4().hex[:12])
    created = await control.registry.create_flow(flow)
    _record(control, request, "flow_created", created.id, created.connection_ids)
    await control.refresh()
    location = f"{BASE}/flows/{created.id}"
    return json(_view(created), status=201, headers={"Location": location})


@flow_routes.route(
    "GET",
    f"{BASE}/flows/{{id}}",
    summary="One flow",
    parameters=[_ID],
    answers={200: Answer("The flow", FlowView), **_errors(404)},
)
async def get_flow(request: web.Request) -> web.Response:
    flow = await _control(request).registry.get_flow(_flow_id(request))
    return json(_view(flow))


@flow_routes.route(
    "PUT",
    f"{BASE}/flows/{{id}}",
    summary="Replace a flow",
    parameters=[_ID],
    request=FlowInput,
    answers={200: Answer("Replaced", FlowView), **_errors(400, 404, 409, 413, 415, 422)},
)
async def replace_flow(request: web.Request) -> web.Response:
    control = _control(request)
    fid = _flow_id(request)
    body = _input(await read_object(request))
    current = await control.registry.get_flow(fid)
    if current.provisioned:
        raise _read_only(fid)
    if body.get("id") not in (None, fid):
        raise invalid([Problem("id", f"must be {fid!r}, the flow's id in the path")])
    replaced = await control.registry.replace_flow(parse_flow(body, default_id=fid))
    touched = {*current.connection_ids, *replaced.connection_ids}
    _record(control, request, "flow_changed", fid, touched)
    await control.refresh()
    return json(_view(replaced))


@flow_routes.route(
    "DELETE",
    f"{BASE}/flows/{{id}}",
    summary="Delete a flow",
    parameters=[_ID],
    answers={204: Answer("Deleted"), **_errors(404, 409)},
)
async def delete_flow(request: web.Request) -> web.Response:
    control = _control(request)
    fid = _flow_id(request)
    current = await control.registry.get_flow(fid)
    if current.provisioned:
        raise _read_only(fid)
    await control.registry.delete_flow(fid)
    _record(control, request, "flow_deleted", fid, current.connection_ids)
    await control.refresh()
    return web.Response(status=204)
