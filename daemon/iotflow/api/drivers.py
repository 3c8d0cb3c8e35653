"""GET /drivers, GET /drivers/{id}, POST /drivers/{id}/decode (try a codec)."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from iotflow.api.body import dump, json, read_object, validated
from iotflow.api.control import CONTROL
from iotflow.api.errors import ApiError
from iotflow.api.models import Decoded, DecodedError, DecodeInput, Driver
from iotflow.api.table import BASE, Answer, Param, RouteTable, errors
from iotflow.config.model import Role
from iotflow.drivers import CodecFault, DriverInfo, Drivers

driver_routes = RouteTable()

_ID = Param("id", "path", {"type": "string"}, required=True, description="producer:module:version")


def _drivers(request: web.Request) -> Drivers:
    drivers = request.app[CONTROL].drivers
    if drivers is None:
        raise ApiError(503, "unavailable", "The drivers are not loaded yet.")
    return drivers


def _view(info: DriverInfo) -> Driver:
    return Driver.model_validate(info.document())


def _one(request: web.Request) -> DriverInfo:
    driver_id = request.match_info["id"]
    info = _drivers(request).get(driver_id)
    if info is None:
        raise ApiError(404, "not_found", f"No driver {driver_id!r}.")
    return info


@driver_routes.route(
    "GET",
    f"{BASE}/drivers",
    summary="List the payload drivers (TS013 codecs) and whether each loaded",
    answers={200: Answer("The drivers, by id", Driver, many=True), **errors()},
)
async def list_drivers(request: web.Request) -> web.Response:
    return json([dump(_view(i)) for i in _drivers(request).list()])


@driver_routes.route(
    "GET",
    f"{BASE}/drivers/{{id}}",
    summary="One payload driver",
    parameters=[_ID],
    answers={200: Answer("The driver", Driver), **errors(404)},
)
async def get_driver(request: web.Request) -> web.Response:
    return json(dump(_view(_one(request))))


@driver_routes.route(
    "POST",
    f"{BASE}/drivers/{{id}}/decode",
    summary="Decode a payload with a driver (try it out)",
    description="Changes nothing: a reader may try a driver.",
    role=Role.READER,
    request=DecodeInput,
    parameters=[_ID],
    answers={
        200: Answer("The decoded payload, or the codec's error", Decoded),
        400: Answer("Malformed JSON"),
        422: Answer("Invalid body, field by field"),
        **errors(404),
    },
)
async def decode_with_driver(request: web.Request) -> web.Response:
    info = _one(request)
    given = validated(DecodeInput, await read_object(request))
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    try:
        data = await _drivers(request).decode_bytes(
            info.id, bytes.fromhex(given.payload_hex), given.fPort, now
        )
    except CodecFault as fault:
        result = Decoded(payloadDecodedError=DecodedError(code=fault.code, message=fault.message))
    else:
        result = Decoded(payload=data)
    return json(dump(result))
