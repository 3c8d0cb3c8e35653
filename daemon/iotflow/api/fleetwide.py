"""Dead letters and replays across a fleet (docs/scale-out.md "What the API answers").

Each instance keeps its dead letters and its journal beside its own spool: they are its
own, and only it can re-send them. So that an operator asking any instance sees the fleet,
this middleware, in front of the dead-letter and replay routes, asks the other live
instances' APIs (with the caller's bearer token) and answers with the whole:

- listing a connection's dead letters merges every instance's, newest first, each marked
  with its `instance`; the page and the total are the fleet's;
- `?instance=<id>` on any of these routes sends the call to that instance alone (the owner
  of a letter: its id is unique on its instance only);
- re-sending `{"all": true}`, purging, and starting a replay go to every instance (each
  re-sends or replays what it holds) and the counts are summed; re-sending by `ids` without
  `?instance=` concerns the answering instance's letters;
- a replay id unknown here is looked up on the peers.

An instance that does not answer, or that missed its heartbeats, is named in the
`X-Iotflow-Unreachable` header; the answer is the rest of the fleet's. A call from a peer
carries `X-Iotflow-Fleet: local` and is answered locally, so that nothing fans out twice.
With SQLite (one instance) only `?instance=` is read, and must name this instance.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from iotflow.api.control import CONTROL
from iotflow.api.errors import ApiError, Handler, error_middleware
from iotflow.api.table import BASE, Answer, Param, RouteTable
from iotflow.fleet import Fleet, PeerAnswer
from iotflow.registry import Instance
from iotflow.telemetry.logging import get_logger

__all__ = ["FLEET_HEADER", "INSTANCE", "UNREACHABLE", "fleet_middleware", "fleet_wide"]

log = get_logger("iotflow.api")

FLEET_HEADER = "X-Iotflow-Fleet"
UNREACHABLE = "X-Iotflow-Unreachable"
INSTANCE = Param(
    "instance",
    "query",
    {"type": "string"},
    description="the instance to ask alone (GET /instances); default: the whole fleet",
)

_LETTERS = f"{BASE}/connections/{{id}}/deadLetters"
_LETTER = f"{BASE}/connections/{{id}}/deadLetters/{{letterId}}"
_RESEND = f"{BASE}/connections/{{id}}/deadLetters/resend"
_REPLAY = f"{BASE}/connections/{{id}}/replay"
_REPLAYS = f"{BASE}/replays/{{id}}"
_ROUTES = {_LETTERS, _LETTER, _RESEND, _REPLAY, _REPLAYS}
_PAGE = 100  # letters fetched per call when merging pages


@dataclass
class _Answer:
    """One instance's answer: status, JSON body, the page total header; or unreachable."""

    instance: str
    status: int | None
    body: Any = None
    total: int = 0


def fleet_wide(table: RouteTable) -> RouteTable:
    """The dead-letter and replay routes as the fleet answers them: `?instance=` and the
    answer of a peer that is unreachable (502) documented."""
    routes = []
    for route in table:
        if route.path in _ROUTES:
            answers = {**route.answers, 502: Answer("The instance asked for did not answer")}
            route = replace(route, parameters=(*route.parameters, INSTANCE), answers=answers)
        routes.append(route)
    return RouteTable(routes)


def fleet_middleware() -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        if route not in _ROUTES:
            return await handler(request)
        fleet = request.app[CONTROL].fleet
        if fleet is None:
            return await handler(request)
        wanted = request.query.get("instance")
        local = request.headers.get(FLEET_HEADER) == "local"
        if wanted is not None:
            return await _one_instance(request, handler, fleet, wanted)
        if local or not fleet.shared:
            return await handler(request)
        return await _fan_out(request, handler, fleet, route)

    return middleware


# -- one instance --------------------------------------------------------------------------


async def _one_instance(
    request: web.Request, handler: Handler, fleet: Fleet, wanted: str
) -> web.StreamResponse:
    query = {k: v for k, v in request.query.items() if k != "instance"}
    if wanted == fleet.id:
        # A POST's body is read from this request: a clone of it would have none (and
        # the POST routes read no query).
        if request.method == "POST":
            return await handler(request)
        return await handler(_without_instance(request, query))
    peer = next((i for i in await fleet.peers() if i.id == wanted), None)
    if peer is None:
        raise ApiError(404, "not_found", f"No live instance {wanted!r} (GET /instances).")
    body = await _body(request)
    answer = await fleet.ask(
        peer, request.method, _path(request, query), token=_token(request), json=body
    )
    if answer.status is None:
        raise ApiError(502, "instance_unreachable", f"Instance {wanted!r} did not answer.")
    return _relay(answer)


# -- the whole fleet -----------------------------------------------------------------------


async def _fan_out(
    request: web.Request, handler: Handler, fleet: Fleet, route: str
) -> web.StreamResponse:
    if route == _LETTERS and request.method == "GET":
        return await _merged_letters(request, handler, fleet)
    if route == _REPLAYS:
        return await _replay_anywhere(request, handler, fleet)
    body = await _body(request)
    fan_out = route == _REPLAY or (route == _LETTERS and request.method == "DELETE")
    fan_out |= route == _RESEND and isinstance(body, dict) and body.get("all") is True
    if not fan_out:
        return await handler(request)
    local = await _call_local(request, handler, None)
    if local.status is None or local.status >= 300:
        return _relay_local(local)  # refused here (invalid, unknown): refused everywhere
    peers = await fleet.peers()
    answers = [local] + [
        _answer(a)
        for a in await _ask(fleet, peers, request.method, _path(request), _token(request), body)
    ]
    unreachable = [a.instance for a in answers if a.status is None or a.status >= 500]
    unreachable += await _silent(fleet)
    done = [a for a in answers if a.status is not None and a.status < 300]
    headers = {UNREACHABLE: ",".join(unreachable)} if unreachable else {}
    if route == _RESEND:
        total = sum(int(a.body.get("resent", 0)) for a in done if isinstance(a.body, dict))
        return _json({"resent": total}, 202, headers)
    if route == _REPLAY:
        started = [{"instance": a.instance, **a.body} for a in done if isinstance(a.body, dict)]
        uplinks = sum(int(s.get("uplinks", 0)) for s in started)
        return _json({**local.body, "uplinks": uplinks, "instances": started}, 202, headers)
    return web.Response(status=204, headers=headers)


async def _merged_letters(
    request: web.Request, handler: Handler, fleet: Fleet
) -> web.StreamResponse:
    """The fleet's page: the newest page*perPage of each instance, merged, then sliced."""
    page = _int(request.query.get("page"), 1)
    per_page = _int(request.query.get("perPage"), 20)
    first = await _call_local(request, handler, dict(request.query))
    if first.status != 200:
        return _relay_local(first)  # a bad query or an unknown connection: said once
    need = page * per_page
    peers = await fleet.peers()
    letters: list[dict[str, Any]] = []
    total = 0
    unreachable = await _silent(fleet)
    for source in [None, *peers]:
        name = fleet.id if source is None else source.id
        got, count, ok = await _top_letters(request, handler, fleet, source, need)
        if not ok:
            unreachable.append(name)
            continue
        total += count
        letters += [{**letter, "instance": name} for letter in got]
    letters.sort(key=lambda letter: (letter.get("time") or "", letter["instance"]), reverse=True)
    chosen = letters[(page - 1) * per_page : page * per_page]
    pages = max(1, -(-total // per_page))
    headers = {"X-Total": str(total), "X-Total-Pages": str(pages), "X-Page": str(page)}
    if unreachable:
        headers[UNREACHABLE] = ",".join(unreachable)
    return _json(chosen, 200, headers)


async def _top_letters(
    request: web.Request,
    handler: Handler,
    fleet: Fleet,
    source: Instance | None,
    need: int,
) -> tuple[list[dict[str, Any]], int, bool]:
    """One instance's newest `need` letters (as filtered), its total, whether it answered."""
    found: list[dict[str, Any]] = []
    total = 0
    number = 1
    while len(found) < need:
        query = {**request.query, "page": str(number), "perPage": str(_PAGE)}
        if source is None:
            answer = await _call_local(request, handler, query)
        else:
            asked = await fleet.ask(source, "GET", _path(request, query), token=_token(request))
            answer = _answer(asked)
        if answer.status != 200 or not isinstance(answer.body, list):
            return found, total, False
        found += answer.body
        total = answer.total
        if len(answer.body) < _PAGE:
            break
        number += 1
    return found[:need], total, True


async def _replay_anywhere(
    request: web.Request, handler: Handler, fleet: Fleet
) -> web.StreamResponse:
    """A replay is its instance's: asked here first, then of the peers."""
    local = await _call_local(request, handler, None)
    if local.status != 404:
        return _relay_local(local)
    for peer in await fleet.peers():
        answer = await fleet.ask(peer, request.method, _path(request), token=_token(request))
        if answer.status is not None and answer.status < 300 and isinstance(answer.body, dict):
            return _json({**answer.body, "instance": peer.id}, answer.status)
    return _relay_local(local)


# -- plumbing ------------------------------------------------------------------------------


async def _silent(fleet: Fleet) -> list[str]:
    """Instances the registry knows that missed their heartbeats: not asked, but named,
    since what their spools hold is missing from the answer."""
    return [i.id for i in await fleet.instances() if not fleet.alive(i)]


def _without_instance(request: web.Request, query: dict[str, str]) -> web.Request:
    return request.clone(rel_url=request.rel_url.with_query(query))


async def _call_local(
    request: web.Request, handler: Handler, query: dict[str, str] | None
) -> _Answer:
    """This instance's answer to the request (with `query` instead of its own, unless
    None), as the API would write it."""
    target = request if query is None else _without_instance(request, query)
    response = await error_middleware(target, handler)
    raw = response.body if isinstance(response, web.Response) else None
    body = orjson.loads(raw) if isinstance(raw, bytes) and raw else None
    name = request.app[CONTROL].fleet
    instance = name.id if name is not None else ""
    return _Answer(instance, response.status, body, _int(response.headers.get("X-Total"), 0))


def _answer(peer: PeerAnswer) -> _Answer:
    return _Answer(peer.instance, peer.status, peer.body, 0 if peer.total is None else peer.total)


async def _ask(
    fleet: Fleet,
    peers: list[Instance],
    method: str,
    path: str,
    token: str | None,
    body: Any,
) -> list[PeerAnswer]:
    return list(
        await asyncio.gather(*(fleet.ask(p, method, path, token=token, json=body) for p in peers))
    )


async def _body(request: web.Request) -> Any:
    """The request's JSON body for a peer (read once; aiohttp keeps it for the handler)."""
    if request.method not in ("POST", "PUT") or not request.can_read_body:
        return None
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None  # the local handler says what is wrong with it


def _path(request: web.Request, query: dict[str, str] | None = None) -> str:
    params = dict(request.query) if query is None else query
    params.pop("instance", None)
    return request.path + (f"?{urlencode(params)}" if params else "")


def _token(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials else None


def _int(text: str | None, default: int) -> int:
    return int(text) if text is not None and text.isdigit() else default


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _relay(answer: PeerAnswer) -> web.Response:
    if answer.body is None:
        return web.Response(status=answer.status or 502)
    return _json(answer.body, answer.status or 502)


def _relay_local(answer: _Answer) -> web.Response:
    if answer.body is None:
        return web.Response(status=answer.status or 500)
    headers = {"X-Total": str(answer.total)} if answer.total else None
    return _json(answer.body, answer.status or 500, headers)
