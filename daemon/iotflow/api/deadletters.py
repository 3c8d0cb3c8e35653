"""Dead letters and replays: `/connections/{id}/deadLetters`, `/connections/{id}/replay` and
`/replays/{id}` (issue #14, docs/deadletters.md)."""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from iotflow.api.auth import principal_of
from iotflow.api.body import (
    PAGE,
    PAGE_HEADERS,
    dump,
    json,
    page_params,
    paginated,
    read_object,
    validated,
)
from iotflow.api.control import CONTROL, ControlPlane
from iotflow.api.errors import ApiError, invalid
from iotflow.api.models import (
    DeadLetter,
    DeadLetterDetail,
    Replay,
    ReplayInput,
    ReplayStarted,
    ResendInput,
    Resent,
)
from iotflow.api.table import BASE, Answer, Handler, Param, RouteTable, errors
from iotflow.config.model import Role
from iotflow.connectors.connection import CONNECTION_ID, ID_PATTERN
from iotflow.delivery.recovery import LetterFilter, LetterRow, Recovery, ReplayRow
from iotflow.delivery.worker import iso
from iotflow.errors import Problem
from iotflow.formats import normalize_dev_eui
from iotflow.formats.fields import DEV_EUI_PATTERN
from iotflow.spool import SpoolError
from iotflow.telemetry.logging import get_logger

__all__ = ["recovery_routes"]

log = get_logger("iotflow.api")

recovery_routes = RouteTable()

_ID = Param("id", "path", {"type": "string", "pattern": ID_PATTERN}, required=True)
_LETTER = Param("letterId", "path", {"type": "integer", "minimum": 1}, required=True)
_REPLAY_ID = re.compile(r"^[0-9a-f]{1,64}$")
_REPLAY = Param("id", "path", {"type": "string", "pattern": _REPLAY_ID.pattern}, required=True)
_FILTERS = (
    Param("outcome", "query", {"type": "string", "enum": ["failed", "expired"]}),
    Param("devEUI", "query", {"type": "string", "pattern": DEV_EUI_PATTERN}),
)
_MAX_LETTER_ID = 2**63 - 1  # SQLite's largest integer


def _control(request: web.Request) -> ControlPlane:
    return request.app[CONTROL]


def _recovery(request: web.Request) -> Recovery:
    recovery = _control(request).recovery
    if recovery is None:
        raise ApiError(503, "not_ready", "The daemon is starting; try again shortly.")
    return recovery


def _spool_errors(handler: Handler) -> Handler:
    """The spool cannot commit (disk full) or is closing: 503, nothing changed."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SpoolError as exc:
            log.warning("Dead letters or replays unavailable", error=str(exc))
            raise ApiError(
                503,
                "spool_unavailable",
                "The spool cannot commit now (see iotflow_spool_writable); try again later.",
                headers={"Retry-After": "10"},
            ) from None

    return guarded


async def _connection(request: web.Request) -> str:
    """The path's connection id, once the registry knows it (404 otherwise)."""
    value = request.match_info["id"]
    if not CONNECTION_ID.match(value):
        raise ApiError(404, "not_found", f"No connection {value!r}.")
    await _control(request).registry.get_connection(value)  # NotFoundError: 404
    return value


def _filters(request: web.Request) -> LetterFilter:
    problems: list[Problem] = []
    outcome = request.query.get("outcome")
    if outcome is not None and outcome not in ("failed", "expired"):
        problems.append(Problem("outcome", "expected 'failed' or 'expired'"))
    dev_eui = request.query.get("devEUI")
    if dev_eui is not None:
        try:
            dev_eui = normalize_dev_eui(dev_eui)
        except ValueError:
            problems.append(Problem("devEUI", "expected 16 hex digits"))
    unknown = sorted(set(request.query) - {"outcome", "devEUI", "page", "perPage"})
    problems.extend(Problem(name, "unknown query parameter") for name in unknown)
    if problems:
        raise ApiError(400, "invalid_query", "The query parameters are invalid.", problems)
    return LetterFilter(outcome=outcome, dev_eui=dev_eui)


def _letter(row: LetterRow, *, document: bool = False) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": row.id,
        "devEUI": row.dev_eui,
        "uplinkTime": iso(row.uplink_time),
        "outcome": row.outcome,
        "reason": row.reason,
        "attempts": row.attempts,
        "firstAttemptTime": iso(row.first_attempt) if row.first_attempt is not None else None,
        "lastAttemptTime": iso(row.last_attempt) if row.last_attempt is not None else None,
        "time": iso(row.time),
    }
    if row.status is not None:
        fields["status"] = row.status
        fields["body"] = row.body
    if not document:
        return dict(dump(DeadLetter(**fields)))
    try:
        fields["document"] = orjson.loads(row.document) if row.document is not None else None
    except orjson.JSONDecodeError:  # processors may render anything: shown as text then
        fields["document"] = (row.document or b"").decode("utf-8", "replace")
    return dict(dump(DeadLetterDetail(**fields)))


def _replay(row: ReplayRow) -> dict[str, Any]:
    return dict(
        dump(
            Replay(
                id=row.id,
                connectionId=row.connection_id,
                state=row.state,  # type: ignore[arg-type]
                total=row.total,
                delivered=row.delivered,
                expired=row.expired,
                failed=row.failed,
                pending=row.pending,
            )
        )
    )


# -- dead letters --------------------------------------------------------------------------


@recovery_routes.route(
    "GET",
    f"{BASE}/connections/{{id}}/deadLetters",
    summary="The connection's dead letters (failed and expired deliveries), newest first",
    parameters=[_ID, *_FILTERS, *PAGE],
    answers={
        200: Answer("A page", DeadLetter, many=True, headers=PAGE_HEADERS),
        **errors(400, 404),
    },
)
@_spool_errors
async def list_dead_letters(request: web.Request) -> web.Response:
    cid = await _connection(request)
    page, per_page = page_params(request)
    filters = _filters(request)
    rows, total = await _recovery(request).letters(cid, filters, (page - 1) * per_page, per_page)
    return paginated([_letter(r) for r in rows], total, page, per_page)


@recovery_routes.route(
    "GET",
    f"{BASE}/connections/{{id}}/deadLetters/{{letterId}}",
    summary="One dead letter, with the document that was to be sent",
    parameters=[_ID, _LETTER],
    answers={200: Answer("The dead letter", DeadLetterDetail), **errors(404)},
)
@_spool_errors
async def get_dead_letter(request: web.Request) -> web.Response:
    cid = await _connection(request)
    text = request.match_info["letterId"]
    letter_id = int(text) if text.isdigit() and len(text) < 19 else 0
    row = await _recovery(request).letter(cid, letter_id) if letter_id > 0 else None
    if row is None:
        raise ApiError(404, "not_found", f"No dead letter {text!r} of connection {cid!r}.")
    return json(_letter(row, document=True))


@recovery_routes.route(
    "POST",
    f"{BASE}/connections/{{id}}/deadLetters/resend",
    summary="Re-send dead letters through the connection's queue",
    description='`{"ids": [...]}`, or `{"all": true}` with optional `outcome` and `devEUI`.'
    " Each goes through the normal queue (per-device order, retries) with a validity"
    " counted from now; delivered, it leaves the dead letters. Letters already being"
    " re-sent and unknown ids are skipped.",
    parameters=[_ID],
    request=ResendInput,
    answers={202: Answer("Queued", Resent), **errors(400, 404, 413, 415, 422)},
)
@_spool_errors
async def resend_dead_letters(request: web.Request) -> web.Response:
    cid = await _connection(request)
    given = validated(ResendInput, await read_object(request))
    problems: list[Problem] = []
    if (given.ids is None) == (given.all is not True):
        problems.append(Problem("ids", 'give either "ids" or "all": true'))
    if given.ids is not None and (given.outcome is not None or given.devEUI is not None):
        problems.append(Problem("ids", 'filters ("outcome", "devEUI") go with "all"'))
    if given.ids is not None and any(i > _MAX_LETTER_ID for i in given.ids):
        problems.append(Problem("ids", "an id is out of range"))
    if problems:
        raise invalid(problems)
    recovery = _recovery(request)
    by = principal_of(request).name
    if given.ids is not None:
        count = await recovery.resend(cid, ids=given.ids, by=by)
    else:
        dev_eui = normalize_dev_eui(given.devEUI) if given.devEUI else None
        filters = LetterFilter(given.outcome, dev_eui)
        count = await recovery.resend(cid, filters=filters, by=by)
    return json(dump(Resent(resent=count)), status=202)


@recovery_routes.route(
    "DELETE",
    f"{BASE}/connections/{{id}}/deadLetters",
    summary="Purge the dead letters matching the filters (all without filters)",
    role=Role.OWNER,
    parameters=[_ID, *_FILTERS],
    answers={204: Answer("Purged"), **errors(400, 404)},
)
@_spool_errors
async def purge_dead_letters(request: web.Request) -> web.Response:
    cid = await _connection(request)
    filters = _filters(request)
    await _recovery(request).purge(cid, filters, by=principal_of(request).name)
    return web.Response(status=204)


# -- replays -------------------------------------------------------------------------------


def _instant(text: str, path: str, problems: list[Problem]) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        problems.append(Problem(path, "expected an ISO 8601 date and time"))
        return 0.0
    if moment.tzinfo is None:
        problems.append(Problem(path, "expected a UTC offset (Z or +hh:mm)"))
        return 0.0
    return moment.timestamp()


@recovery_routes.route(
    "POST",
    f"{BASE}/connections/{{id}}/replay",
    summary="Send the journal's uplinks of a time window to the connection again",
    role=Role.OWNER,
    description="The window is on uplink time, both ends included. Without `devEUIs`, the"
    " devices routed to the connection now (bindings and flows). Validity is counted from"
    " the request; the replay never takes more than the connection's max_in_flight.",
    parameters=[_ID],
    request=ReplayInput,
    answers={202: Answer("Started", ReplayStarted), **errors(400, 404, 413, 415, 422)},
)
@_spool_errors
async def start_replay(request: web.Request) -> web.Response:
    cid = await _connection(request)
    given = validated(ReplayInput, await read_object(request))
    problems: list[Problem] = []
    start = _instant(given.from_, "from", problems)
    end = _instant(given.to, "to", problems)
    if not problems and start > end:
        problems.append(Problem("to", "must not be before 'from'"))
    if problems:
        raise invalid(problems)
    devices = (
        sorted({normalize_dev_eui(d) for d in given.devEUIs}) if given.devEUIs is not None else None
    )
    by = principal_of(request).name
    row = await _recovery(request).start_replay(cid, start, end, devices, by=by)
    return json(dump(ReplayStarted(id=row.id, uplinks=row.total)), status=202)


def _replay_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if not _REPLAY_ID.match(value):
        raise ApiError(404, "not_found", f"No replay {value!r}.")
    return value


@recovery_routes.route(
    "GET",
    f"{BASE}/replays/{{id}}",
    summary="Where a replay stands",
    parameters=[_REPLAY],
    answers={200: Answer("The replay", Replay), **errors(404)},
)
@_spool_errors
async def get_replay(request: web.Request) -> web.Response:
    rid = _replay_id(request)
    row = await _recovery(request).replay(rid)
    if row is None:
        raise ApiError(404, "not_found", f"No replay {rid!r}.")
    return json(_replay(row))


@recovery_routes.route(
    "DELETE",
    f"{BASE}/replays/{{id}}",
    summary="Cancel a replay (what it already queued is still sent)",
    role=Role.OWNER,
    parameters=[_REPLAY],
    answers={200: Answer("The replay, cancelled (or already over)", Replay), **errors(404)},
)
@_spool_errors
async def cancel_replay(request: web.Request) -> web.Response:
    rid = _replay_id(request)
    row = await _recovery(request).cancel_replay(rid)
    if row is None:
        raise ApiError(404, "not_found", f"No replay {rid!r}.")
    if row.state == "cancelled":  # by this call or an earlier one: who asked is worth saying
        by = principal_of(request).name
        _control(request).record(row.connection_id, "replay_cancelled", {"by": by, "replay": rid})
    return json(_replay(row))
