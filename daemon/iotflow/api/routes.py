"""The management API, following ThingPark X IoT Flow's connections API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from iotflow.api.body import (
    dev_eui_param,
    json,
    page_params,
    paginated,
    read_json_bytes,
    read_object,
)
from iotflow.api.errors import ApiError, invalid
from iotflow.config.types import secret_value, unmask
from iotflow.connectors import CATALOG, Connection, connector_document, parse_connection
from iotflow.connectors.connection import CONNECTION_ID
from iotflow.connectors.secrets import unmask_url
from iotflow.delivery.worker import Statistics, iso
from iotflow.downlinks import DownlinkRejected, parse_downlink
from iotflow.downlinks.signature import ReplayGuard, Unauthorized, verify
from iotflow.errors import NotFoundError, Problem
from iotflow.formats import normalize_dev_eui
from iotflow.registry import Event
from iotflow.states import ConnectionState
from iotflow.telemetry.logging import get_logger

if TYPE_CHECKING:
    from iotflow.app import Daemon

BASE = "/iot-flow/v1"

# Output fields a client may send back unchanged (GET, edit, PUT): ignored on input.
READ_ONLY = ("state", "startupTime", "statistics", "provisioned", "alarmStates")

DOWNLINK_ROUTE = f"{BASE}/downlinkMessages/{{id}}"
# Tokens of downlink requests accepted lately, so that none is accepted twice.
REPLAYS: web.AppKey[ReplayGuard] = web.AppKey("downlink_replays", ReplayGuard)

log = get_logger("iotflow.api")

routes = web.RouteTableDef()


def daemon_of(request: web.Request) -> Daemon:
    from iotflow.api.server import DAEMON

    return request.app[DAEMON]


def connection_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if not CONNECTION_ID.match(value):
        raise ApiError(404, "not_found", f"No connection {value!r}.")
    return value


def connection_document(daemon: Daemon, connection: Connection) -> dict[str, Any]:
    """The connection as the product shows it: configuration (secrets masked) and status."""
    document = connection.document()
    worker = daemon.deliveries.worker(connection.id) if daemon.deliveries else None
    if not connection.active:
        state = ConnectionState.DEACTIVATED
    else:
        state = worker.state if worker is not None else ConnectionState.OPENING
    document["state"] = state
    startup = worker.startup_time if worker is not None else None
    document["startupTime"] = iso(startup) if startup is not None else None
    stats = worker.stats if worker is not None else Statistics()
    document["statistics"] = stats.document()
    document["provisioned"] = connection.provisioned
    document["alarmStates"] = daemon.alarms.states_of(connection.id) if daemon.alarms else []
    return document


def _input(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in READ_ONLY}


# -- connectors ----------------------------------------------------------------------------


@routes.get(f"{BASE}/connectors")
async def list_connectors(request: web.Request) -> web.Response:
    return json([connector_document(c) for c in CATALOG.values()])


@routes.get(f"{BASE}/connectors/{{id}}")
async def get_connector(request: web.Request) -> web.Response:
    connector = CATALOG.get(request.match_info["id"])
    if connector is None:
        raise ApiError(404, "not_found", f"No connector {request.match_info['id']!r}.")
    return json(connector_document(connector))


# -- connections ---------------------------------------------------------------------------


@routes.get(f"{BASE}/connections")
async def list_connections(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    page, per_page = page_params(request)
    connections = await daemon.registry.list_connections()
    start = (page - 1) * per_page
    chosen = connections[start : start + per_page]
    return paginated(
        [connection_document(daemon, c) for c in chosen], len(connections), page, per_page
    )


@routes.post(f"{BASE}/connections")
async def create_connection(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    body = _input(await read_object(request))
    connection = parse_connection(body, default_id=uuid.uuid4().hex[:12])
    created = await daemon.registry.create_connection(connection)
    daemon.record(created.id, "connection_created", {"by": "api"})
    await daemon.refresh()
    location = f"{BASE}/connections/{created.id}"
    return json(connection_document(daemon, created), status=201, headers={"Location": location})


@routes.get(f"{BASE}/connections/{{id}}")
async def get_connection(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    connection = await daemon.registry.get_connection(connection_id(request))
    return json(connection_document(daemon, connection))


@routes.put(f"{BASE}/connections/{{id}}")
async def replace_connection(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    cid = connection_id(request)
    body = _input(await read_object(request))
    current = await daemon.registry.get_connection(cid)
    if current.provisioned:
        raise _provisioned(cid)
    if body.get("id") not in (None, cid):  # null, as in POST, means "the one in the path"
        raise invalid([Problem("id", f"must be {cid!r}, the connection's id in the path")])
    # A secret read back as "*****" and sent again keeps its stored value.
    stored = current.document(reveal=True)
    body["configuration"] = unmask(
        body.get("configuration", {}), stored.get("configuration"), unmask_url
    )
    connection = parse_connection(body, default_id=cid)
    replaced = await daemon.registry.replace_connection(connection)
    now = replaced.document(reveal=True)
    changed = sorted(key for key in set(stored) | set(now) if stored.get(key) != now.get(key))
    daemon.record(cid, "configuration_changed", {"by": "api", "fields": changed})
    await daemon.refresh()
    return json(connection_document(daemon, replaced))


@routes.delete(f"{BASE}/connections/{{id}}")
async def delete_connection(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    cid = connection_id(request)
    current = await daemon.registry.get_connection(cid)
    if current.provisioned:
        raise _provisioned(cid)
    await daemon.registry.delete_connection(cid)
    await daemon.refresh()
    return web.Response(status=204)


def _provisioned(cid: str) -> ApiError:
    return ApiError(
        409,
        "read_only",
        f"Connection {cid!r} is provisioned by the config file; change it there and reload.",
    )


@routes.get(f"{BASE}/connections/{{id}}/events")
async def list_events(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    cid = connection_id(request)
    page, per_page = page_params(request)
    events, total = await daemon.registry.list_events(cid, (page - 1) * per_page, per_page)
    return paginated([event_document(e) for e in events], total, page, per_page)


def event_document(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "time": event.time.isoformat(timespec="milliseconds"),
        "type": event.kind,
        "details": event.data,
    }


# -- alarms --------------------------------------------------------------------------------


@routes.get(f"{BASE}/alarms")
async def list_alarms(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    return json(daemon.alarms.active() if daemon.alarms else [])


# -- devices -------------------------------------------------------------------------------


@routes.get(f"{BASE}/devices")
async def list_devices(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    page, per_page = page_params(request)
    wanted = request.query.get("connectionId")
    bindings, total = await daemon.registry.list_devices(wanted, (page - 1) * per_page, per_page)
    items = [{"devEUI": b.dev_eui, "connections": list(b.connections)} for b in bindings]
    return paginated(items, total, page, per_page)


@routes.get(f"{BASE}/devices/{{devEUI}}")
async def get_device(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    dev_eui = dev_eui_param(request)
    try:
        connections = await daemon.registry.get_device(dev_eui)
    except NotFoundError:
        raise ApiError(404, "not_found", f"Device {dev_eui} is bound to no connection.") from None
    return json({"devEUI": dev_eui, "connections": connections})


@routes.put(f"{BASE}/devices/{{devEUI}}")
async def put_device(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    dev_eui = dev_eui_param(request)
    body = await read_object(request)
    wanted = _connection_ids(body, dev_eui)
    try:
        before = set(await daemon.registry.get_device(dev_eui))
    except NotFoundError:
        before = set()
    await _check_bindable(daemon, before ^ set(wanted))
    try:
        await daemon.registry.set_device(dev_eui, wanted)
    except NotFoundError as exc:
        raise invalid([Problem("connections", str(exc))]) from None
    await daemon.refresh()
    return json({"devEUI": dev_eui, "connections": sorted(set(wanted))})


@routes.delete(f"{BASE}/devices/{{devEUI}}")
async def delete_device(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    dev_eui = dev_eui_param(request)
    try:
        bound = set(await daemon.registry.get_device(dev_eui))
    except NotFoundError:
        raise ApiError(404, "not_found", f"Device {dev_eui} is bound to no connection.") from None
    await _check_bindable(daemon, bound)
    await daemon.registry.delete_device(dev_eui)
    await daemon.refresh()
    return web.Response(status=204)


def _connection_ids(body: dict[str, Any], dev_eui: str) -> list[str]:
    problems = [
        Problem(key, "unknown field") for key in body if key not in ("connections", "devEUI")
    ]
    if "devEUI" in body:
        try:
            same = normalize_dev_eui(str(body["devEUI"])) == dev_eui
        except ValueError:
            same = False
        if not same:
            problems.append(Problem("devEUI", f"must be {dev_eui}, the device in the path"))
    value = body.get("connections")
    if not isinstance(value, list):
        problems.append(Problem("connections", "expected a list of connection ids"))
        value = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not CONNECTION_ID.match(item):
            problems.append(Problem(f"connections[{i}]", "expected a connection id"))
    if problems:
        raise invalid(problems)
    return [str(v) for v in value]


async def _check_bindable(daemon: Daemon, changed: set[str]) -> None:
    """Bindings of provisioned connections belong to the config file (a reload resets them)."""
    problems = []
    for cid in sorted(changed):
        try:
            connection = await daemon.registry.get_connection(cid)
        except NotFoundError:
            continue  # reported as unknown by set_device
        if connection.provisioned:
            problems.append(Problem("connections", f"{cid!r} is provisioned by the config file"))
    if problems:
        raise ApiError(
            409,
            "read_only",
            "The devices of provisioned connections are bound in the config file.",
            problems,
        )


# -- downlinks -----------------------------------------------------------------------------


@routes.post(DOWNLINK_ROUTE)
async def post_downlink(request: web.Request) -> web.Response:
    """A cloud's command to one of its devices, signed with the connection's AS id and key
    (see iotflow.downlinks.signature), published to the device's network server.

    Not bearer-authenticated, so until the signature holds nothing in the answer depends
    on the connection: an unknown id, a connection without downlink credentials and wrong
    credentials all get the same 401, and the log says which it was.
    """
    daemon = daemon_of(request)
    cid = request.match_info["id"]
    connection: Connection | None = None
    if CONNECTION_ID.match(cid):
        try:
            connection = await daemon.registry.get_connection(cid)
        except NotFoundError:
            connection = None
    body = await read_json_bytes(request)
    config = connection.configuration if connection is not None else None
    settings = daemon.settings.config.downlinks
    try:
        token, sent_at = verify(
            request.rel_url.raw_query_string,
            body,
            # An unknown connection is checked as one without credentials: same work, same
            # answer.
            as_id=config.downlinkAsId if config is not None else None,
            key=secret_value(config.downlinkAsKey) if config is not None else None,
            now=datetime.now(UTC),
            max_deviation=settings.max_time_deviation,
        )
        request.app[REPLAYS].use(token, sent_at, settings.max_time_deviation)
    except Unauthorized as exc:
        why = str(exc) if connection is not None else "no such connection"
        log.warning(
            "Downlink request not authenticated",
            connection=cid if connection is not None else None,
            error=why,
        )
        raise ApiError(
            401,
            "unauthorized",
            f"Sign the request with the connection's downlinkAsId and downlinkAsKey: {exc.public}.",
            headers={"WWW-Authenticate": 'ThingPark-Token realm="iotflow downlinks"'},
        ) from None
    # verify() refuses a request for no connection: both are there from here on.
    assert connection is not None
    assert config is not None
    downlinks = daemon.downlinks
    if downlinks is None:
        raise ApiError(503, "not_ready", "The daemon is starting; try again shortly.")
    try:
        downlink = parse_downlink(body, default_port=config.downlinkPort)
    except DownlinkRejected as rejection:
        downlinks.rejected(cid, rejection)
        raise _downlink_error(rejection) from None
    try:
        sent = await downlinks.send(cid, downlink, connection=connection)
    except DownlinkRejected as rejection:
        raise _downlink_error(rejection) from None
    return json({"devEUI": sent.dev_eui, "fPort": sent.f_port, "topic": sent.topic}, status=202)


def _downlink_error(rejection: DownlinkRejected) -> ApiError:
    status = 503 if rejection.reason == "not_connected" else 422
    details = [Problem(rejection.path, rejection.message)] if rejection.path else []
    return ApiError(status, rejection.reason, f"Downlink refused: {rejection.message}.", details)
