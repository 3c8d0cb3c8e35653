"""The management API, following ThingPark X IoT Flow's connections API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from iotflow.api.auth import principal_of
from iotflow.api.body import (
    DEV_EUI,
    PAGE,
    PAGE_HEADERS,
    dev_eui_param,
    dump,
    json,
    page_params,
    paginated,
    read_json_bytes,
    read_object,
)
from iotflow.api.control import CONTROL, ControlPlane
from iotflow.api.errors import ApiError, invalid
from iotflow.api.models import (
    ActiveAlarm,
    AlarmStatus,
    ConnectionInput,
    Device,
    DeviceInput,
    DownlinkAccepted,
    DownlinkInput,
    Event,
    InstanceStatistics,
    InstanceView,
    Statistics,
)
from iotflow.api.models import Connection as ConnectionView
from iotflow.api.models import Connector as ConnectorView
from iotflow.api.table import BASE, Answer, Auth, Param, RouteTable, errors
from iotflow.config.types import secret_value, unmask
from iotflow.connectors import CATALOG, Connection, connector_document, parse_connection
from iotflow.connectors.connection import CONNECTION_ID, ID_PATTERN
from iotflow.connectors.secrets import unmask_url
from iotflow.delivery.worker import Statistics as WorkerStatistics
from iotflow.delivery.worker import iso
from iotflow.downlinks import DownlinkRejected, parse_downlink
from iotflow.downlinks.signature import ReplayGuard, Unauthorized, verify
from iotflow.errors import NotFoundError, Problem
from iotflow.fleet import sum_statistics
from iotflow.formats import normalize_dev_eui
from iotflow.registry import Event as StoredEvent
from iotflow.registry import Instance
from iotflow.states import ConnectionState
from iotflow.telemetry.logging import get_logger

# Output fields a client may send back unchanged (GET, edit, PUT): ignored on input.
READ_ONLY = ("state", "startupTime", "statistics", "provisioned", "alarmStates")

DOWNLINK_ROUTE = f"{BASE}/downlinkMessages/{{id}}"
# Tokens of downlink requests accepted lately, so that none is accepted twice.
REPLAYS: web.AppKey[ReplayGuard] = web.AppKey("downlink_replays", ReplayGuard)

log = get_logger("iotflow.api")

routes = RouteTable()


_CONNECTOR_ID = Param("id", "path", {"type": "string"}, required=True)
# The path parameter `connection_id` reads.
_ID = Param("id", "path", {"type": "string", "pattern": ID_PATTERN}, required=True)


def control_of(request: web.Request) -> ControlPlane:
    return request.app[CONTROL]


def connection_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if not CONNECTION_ID.match(value):
        raise ApiError(404, "not_found", f"No connection {value!r}.")
    return value


FleetStatistics = dict[str, dict[str, dict[str, Any]]]


async def fleet_statistics(control: ControlPlane) -> FleetStatistics | None:
    """Per connection, each live instance's statistics; None for a single instance."""
    fleet = control.fleet
    if fleet is None or not fleet.shared:
        return None
    return await fleet.statistics()


def _statistics(
    connection_id: str, own: WorkerStatistics, fleet: FleetStatistics | None
) -> Statistics:
    if fleet is None:
        return Statistics.model_validate(own.document())
    by_instance = fleet.get(connection_id, {})
    breakdown = [
        InstanceStatistics.model_validate({"instance": instance, **document})
        for instance, document in sorted(by_instance.items())
    ]
    return Statistics.model_validate({**sum_statistics(by_instance), "instances": breakdown})


def connection_document(
    control: ControlPlane, connection: Connection, fleet: FleetStatistics | None = None
) -> dict[str, Any]:
    """The connection as the product shows it: configuration (secrets masked) and status;
    with `fleet`, its statistics are the fleet's, instance by instance too."""
    document = connection.document()
    worker = control.worker(connection.id)
    state: str
    if not connection.active:
        state = ConnectionState.DEACTIVATED
    else:
        state = worker.state if worker is not None else ConnectionState.OPENING
    startup = worker.startup_time if worker is not None else None
    stats = worker.stats if worker is not None else WorkerStatistics()
    view = ConnectionView(
        **{k: v for k, v in document.items() if k != "alarms"},
        # The validated alarms, not their document: one stored by an older version is
        # shown as it is, never validated again by today's rules.
        alarms=connection.alarms if connection.fault is None else [],
        state=state,
        startupTime=iso(startup) if startup is not None else None,
        statistics=_statistics(connection.id, stats, fleet),
        provisioned=connection.provisioned,
        alarmStates=[AlarmStatus.model_validate(s) for s in control.alarm_states(connection.id)],
    )
    result: dict[str, Any] = dump(view)
    return result


def _input(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in READ_ONLY}


# -- connectors ----------------------------------------------------------------------------


@routes.route(
    "GET",
    f"{BASE}/connectors",
    summary="The connector catalog",
    answers={200: Answer("Connectors", ConnectorView, many=True), **errors()},
)
async def list_connectors(request: web.Request) -> web.Response:
    return json(
        [dump(ConnectorView.model_validate(connector_document(c))) for c in CATALOG.values()]
    )


@routes.route(
    "GET",
    f"{BASE}/connectors/{{id}}",
    summary="One connector",
    parameters=[_CONNECTOR_ID],
    answers={200: Answer("A connector", ConnectorView), **errors(404)},
)
async def get_connector(request: web.Request) -> web.Response:
    connector = CATALOG.get(request.match_info["id"])
    if connector is None:
        raise ApiError(404, "not_found", f"No connector {request.match_info['id']!r}.")
    return json(dump(ConnectorView.model_validate(connector_document(connector))))


# -- connections ---------------------------------------------------------------------------


@routes.route(
    "GET",
    f"{BASE}/connections",
    summary="List connections",
    parameters=PAGE,
    answers={
        200: Answer("A page", ConnectionView, many=True, headers=PAGE_HEADERS),
        **errors(400),
    },
)
async def list_connections(request: web.Request) -> web.Response:
    control = control_of(request)
    page, per_page = page_params(request)
    connections = await control.registry.list_connections()
    start = (page - 1) * per_page
    chosen = connections[start : start + per_page]
    fleet = await fleet_statistics(control) if chosen else None
    return paginated(
        [connection_document(control, c, fleet) for c in chosen], len(connections), page, per_page
    )


@routes.route(
    "POST",
    f"{BASE}/connections",
    summary="Create a connection",
    request=ConnectionInput,
    answers={
        201: Answer("Created", ConnectionView, headers=(("Location", "the new connection"),)),
        **errors(400, 409, 413, 415, 422),
    },
)
async def create_connection(request: web.Request) -> web.Response:
    control = control_of(request)
    body = _input(await read_object(request))
    connection = parse_connection(body, default_id=uuid.uuid4().hex[:12])
    created = await control.registry.create_connection(connection)
    control.record(created.id, "connection_created", {"by": principal_of(request).name})
    await control.refresh()
    location = f"{BASE}/connections/{created.id}"
    return json(connection_document(control, created), status=201, headers={"Location": location})


@routes.route(
    "GET",
    f"{BASE}/connections/{{id}}",
    summary="One connection, with state, startupTime and statistics",
    parameters=[_ID],
    answers={200: Answer("The connection", ConnectionView), **errors(404)},
)
async def get_connection(request: web.Request) -> web.Response:
    control = control_of(request)
    connection = await control.registry.get_connection(connection_id(request))
    return json(connection_document(control, connection, await fleet_statistics(control)))


@routes.route(
    "PUT",
    f"{BASE}/connections/{{id}}",
    summary="Replace a connection ('*****' keeps a stored secret)",
    parameters=[_ID],
    request=ConnectionInput,
    answers={200: Answer("Replaced", ConnectionView), **errors(400, 404, 409, 413, 415, 422)},
)
async def replace_connection(request: web.Request) -> web.Response:
    control = control_of(request)
    cid = connection_id(request)
    body = _input(await read_object(request))
    current = await control.registry.get_connection(cid)
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
    replaced = await control.registry.replace_connection(connection)
    now = replaced.document(reveal=True)
    changed = sorted(key for key in set(stored) | set(now) if stored.get(key) != now.get(key))
    by = principal_of(request).name
    control.record(cid, "configuration_changed", {"by": by, "fields": changed})
    await control.refresh()
    return json(connection_document(control, replaced))


@routes.route(
    "DELETE",
    f"{BASE}/connections/{{id}}",
    summary="Delete a connection; its pending deliveries are dropped",
    parameters=[_ID],
    answers={204: Answer("Deleted"), **errors(404, 409)},
)
async def delete_connection(request: web.Request) -> web.Response:
    control = control_of(request)
    cid = connection_id(request)
    current = await control.registry.get_connection(cid)
    if current.provisioned:
        raise _provisioned(cid)
    await control.registry.delete_connection(cid)
    # Its event log goes with it: the log line is what remains of who deleted it.
    log.info("Connection deleted", connection=cid, by=principal_of(request).name)
    await control.refresh()
    return web.Response(status=204)


def _provisioned(cid: str) -> ApiError:
    return ApiError(
        409,
        "read_only",
        f"Connection {cid!r} is provisioned by the config file; change it there and reload.",
    )


@routes.route(
    "GET",
    f"{BASE}/connections/{{id}}/events",
    summary="The connection's event log, newest first",
    parameters=[_ID, *PAGE],
    answers={200: Answer("A page", Event, many=True, headers=PAGE_HEADERS), **errors(400, 404)},
)
async def list_events(request: web.Request) -> web.Response:
    control = control_of(request)
    cid = connection_id(request)
    page, per_page = page_params(request)
    events, total = await control.registry.list_events(cid, (page - 1) * per_page, per_page)
    return paginated([event_document(e) for e in events], total, page, per_page)


def event_document(event: StoredEvent) -> dict[str, Any]:
    view = Event(
        id=event.id,
        time=event.time.isoformat(timespec="milliseconds"),
        type=event.kind,
        details=event.data,
    )
    result: dict[str, Any] = dump(view)
    return result


# -- instances -----------------------------------------------------------------------------


def _instance_view(control: ControlPlane, instance: Instance) -> dict[str, Any]:
    fleet = control.fleet
    assert fleet is not None
    view = InstanceView(
        id=instance.id,
        apiUrl=instance.api_url,
        version=instance.version,
        schemaVersion=instance.schema_version,
        startedAt=iso(instance.started_at.timestamp()),
        lastSeen=iso(instance.seen_at.timestamp()),
        alive=fleet.alive(instance),
        answering=instance.id == fleet.id,
    )
    result: dict[str, Any] = dump(view)
    return result


@routes.route(
    "GET",
    f"{BASE}/instances",
    summary="The instances sharing this registry (the fleet), by id",
    description=(
        "With a PostgreSQL registry, every instance that published a heartbeat and has not"
        " stopped (one silent for three heartbeats is `alive: false`, and forgotten after a"
        " day); with SQLite, this instance alone."
    ),
    answers={200: Answer("The instances", InstanceView, many=True), **errors()},
)
async def list_instances(request: web.Request) -> web.Response:
    control = control_of(request)
    fleet = control.fleet
    if fleet is None:
        raise ApiError(503, "starting", "The daemon is starting.")
    return json([_instance_view(control, i) for i in await fleet.instances()])


# -- alarms --------------------------------------------------------------------------------


@routes.route(
    "GET",
    f"{BASE}/alarms",
    summary="Raised alarms, across connections",
    answers={200: Answer("Raised alarms", ActiveAlarm, many=True), **errors()},
)
async def list_alarms(request: web.Request) -> web.Response:
    control = control_of(request)
    return json([dump(ActiveAlarm.model_validate(a)) for a in control.active_alarms()])


# -- devices -------------------------------------------------------------------------------


@routes.route(
    "GET",
    f"{BASE}/devices",
    summary="Device bindings",
    parameters=[Param("connectionId", "query", {"type": "string"}), *PAGE],
    answers={200: Answer("A page", Device, many=True, headers=PAGE_HEADERS), **errors(400)},
)
async def list_devices(request: web.Request) -> web.Response:
    control = control_of(request)
    page, per_page = page_params(request)
    wanted = request.query.get("connectionId")
    bindings, total = await control.registry.list_devices(wanted, (page - 1) * per_page, per_page)
    items = [dump(Device(devEUI=b.dev_eui, connections=list(b.connections))) for b in bindings]
    return paginated(items, total, page, per_page)


@routes.route(
    "GET",
    f"{BASE}/devices/{{devEUI}}",
    summary="A device's connections",
    parameters=[DEV_EUI],
    answers={200: Answer("The device", Device), **errors(400, 404)},
)
async def get_device(request: web.Request) -> web.Response:
    control = control_of(request)
    dev_eui = dev_eui_param(request)
    try:
        connections = await control.registry.get_device(dev_eui)
    except NotFoundError:
        raise ApiError(404, "not_found", f"Device {dev_eui} is bound to no connection.") from None
    return json(dump(Device(devEUI=dev_eui, connections=connections)))


@routes.route(
    "PUT",
    f"{BASE}/devices/{{devEUI}}",
    summary="Set a device's connections",
    parameters=[DEV_EUI],
    request=DeviceInput,
    answers={200: Answer("The device", Device), **errors(400, 409, 413, 415, 422, what="binding")},
)
async def put_device(request: web.Request) -> web.Response:
    control = control_of(request)
    dev_eui = dev_eui_param(request)
    body = await read_object(request)
    wanted = _connection_ids(body, dev_eui)
    try:
        before = set(await control.registry.get_device(dev_eui))
    except NotFoundError:
        before = set()
    await _check_bindable(control, before ^ set(wanted))
    try:
        await control.registry.set_device(dev_eui, wanted)
    except NotFoundError as exc:
        raise invalid([Problem("connections", str(exc))]) from None
    _record_binding(
        control, request, dev_eui, bound=set(wanted) - before, unbound=before - set(wanted)
    )
    await control.refresh()
    return json(dump(Device(devEUI=dev_eui, connections=sorted(set(wanted)))))


@routes.route(
    "DELETE",
    f"{BASE}/devices/{{devEUI}}",
    summary="Unbind a device from every connection",
    parameters=[DEV_EUI],
    answers={204: Answer("Unbound"), **errors(400, 404, 409)},
)
async def delete_device(request: web.Request) -> web.Response:
    control = control_of(request)
    dev_eui = dev_eui_param(request)
    try:
        bound = set(await control.registry.get_device(dev_eui))
    except NotFoundError:
        raise ApiError(404, "not_found", f"Device {dev_eui} is bound to no connection.") from None
    await _check_bindable(control, bound)
    await control.registry.delete_device(dev_eui)
    _record_binding(control, request, dev_eui, bound=set(), unbound=bound)
    await control.refresh()
    return web.Response(status=204)


def _record_binding(
    control: ControlPlane, request: web.Request, dev_eui: str, *, bound: set[str], unbound: set[str]
) -> None:
    """A binding changed through the API is an event of each connection it changed."""
    by = principal_of(request).name
    for cid in sorted(bound):
        control.record(cid, "device_bound", {"by": by, "devEUI": dev_eui})
    for cid in sorted(unbound):
        control.record(cid, "device_unbound", {"by": by, "devEUI": dev_eui})


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


async def _check_bindable(control: ControlPlane, changed: set[str]) -> None:
    """Bindings of provisioned connections belong to the config file (a reload resets them)."""
    problems = []
    for cid in sorted(changed):
        try:
            connection = await control.registry.get_connection(cid)
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


_SIGNED = [
    Param(name, "query", {"type": "string", "minLength": 1}, required=True, description=text)
    for name, text in (
        ("AS_ID", "the connection's downlinkAsId"),
        ("Time", "ISO 8601 with offset; within [downlinks] max_time_deviation of the server"),
        ("Token", "last: hex SHA-256 of the query before Token, the body and downlinkAsKey"),
    )
]


@routes.route(
    "POST",
    DOWNLINK_ROUTE,
    summary="Send a downlink to a device of the connection, through its network server",
    description="Signed as ThingPark signs downlinks, with the connection's downlinkAsId and"
    " downlinkAsKey instead of the bearer token: the query carries AS_ID, Time and, last,"
    " Token = lower-case hex SHA-256 of (the query before '&Token=', percent-decoded) + (the"
    " body) + (downlinkAsKey). Each Token is accepted once.",
    auth=Auth.DOWNLINK,
    parameters=[_ID, *_SIGNED],
    request=DownlinkInput,
    answers={
        202: Answer("Published on the source broker", DownlinkAccepted),
        401: Answer("Missing, wrong, stale or replayed signature"),
        404: Answer("No such connection"),
        413: Answer("Body too large"),
        415: Answer("Body is not application/json"),
        422: Answer(
            "Refused; code: not_json, wrong_shape, bad_dev_eui, bad_port, bad_payload,"
            " unknown_device or disabled"
        ),
        503: Answer("Source broker not connected (not_connected), or registry unavailable"),
    },
)
async def post_downlink(request: web.Request) -> web.Response:
    """A cloud's command to one of its devices, signed with the connection's AS id and key
    (see iotflow.downlinks.signature), published to the device's network server.

    Not bearer-authenticated, so until the signature holds nothing in the answer depends
    on the connection: an unknown id, a connection without downlink credentials and wrong
    credentials all get the same 401, and the log says which it was.
    """
    control = control_of(request)
    cid = request.match_info["id"]
    connection: Connection | None = None
    if CONNECTION_ID.match(cid):
        try:
            connection = await control.registry.get_connection(cid)
        except NotFoundError:
            connection = None
    body = await read_json_bytes(request)
    config = connection.configuration if connection is not None else None
    settings = control.config.downlinks
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
    downlinks = control.downlinks
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
    accepted = DownlinkAccepted(devEUI=sent.dev_eui, fPort=sent.f_port, topic=sent.topic)
    return json(dump(accepted), status=202)


def _downlink_error(rejection: DownlinkRejected) -> ApiError:
    status = 503 if rejection.reason == "not_connected" else 422
    details = [Problem(rejection.path, rejection.message)] if rejection.path else []
    return ApiError(status, rejection.reason, f"Downlink refused: {rejection.message}.", details)
