"""The OpenAPI 3.1 document, generated from the models that validate requests."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema

from iotflow import __version__
from iotflow.alarms.model import Alarm
from iotflow.api.body import MAX_PAGE, MAX_PER_PAGE
from iotflow.api.routes import BASE, DOWNLINK_ROUTE
from iotflow.connectors.connection import ID_PATTERN
from iotflow.connectors.inputs import connection_input_model
from iotflow.downlinks.parse import MAX_CORRELATION_ID, MAX_PAYLOAD_BYTES
from iotflow.ingest.http import INGEST_ROUTE, RETRY_AFTER_SECONDS
from iotflow.telemetry.metrics import STATES


class Statistics(BaseModel):
    received: int
    delivered: int
    retried: int
    expired: int
    failed: int
    dropped: int
    pending: int
    lastError: str | None
    lastDeliveryTime: str | None


class AlarmStatus(BaseModel):
    """Where one alarm of a connection stands."""

    alarm: int = Field(description="index in the connection's alarms")
    state: str = Field(
        json_schema_extra={"enum": ["PENDING", "OUTSIDE_WINDOW", "OBSERVING", "CLEAR", "RAISED"]}
    )
    rate: float | None = None
    window: dict[str, str | None] | None = None
    evaluatedAt: str | None = None
    evaluatedFrom: str | None = None
    since: str | None = None
    raisedRate: float | None = None


class ActiveAlarm(BaseModel):
    """A raised alarm."""

    connectionId: str
    alarm: int
    message: str
    threshold: float
    rate: float
    since: str | None
    window: dict[str, str | None]


class Connection(BaseModel):
    """A connection as the API shows it: secrets as "*****", and its status."""

    id: str
    name: str
    connectorId: str
    brand: str | None = None
    active: bool
    alarms: list[Alarm]
    configuration: dict[str, Any]
    state: str = Field(json_schema_extra={"enum": list(STATES)})
    startupTime: str | None
    statistics: Statistics
    provisioned: bool
    alarmStates: list[AlarmStatus]


class Device(BaseModel):
    devEUI: Annotated[str, Field(pattern=r"^[0-9A-F]{16}$")]
    connections: list[str]


class DeviceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devEUI: str | None = None
    connections: list[Annotated[str, Field(pattern=ID_PATTERN)]]


class Event(BaseModel):
    id: int
    time: str
    type: str
    details: dict[str, Any]


class ErrorDetail(BaseModel):
    path: str
    message: str


class Error(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail]


_DEV_EUI = r"^[-:]*(?:[0-9A-Fa-f][-:]*){16}$"  # what `normalize_dev_eui` accepts
_PAYLOAD_HEX = rf"^(?:[0-9A-Fa-f]{{2}}){{0,{MAX_PAYLOAD_BYTES}}}$"
_Port = Annotated[int, Field(ge=1, le=223)] | Annotated[str, Field(pattern=r"^[0-9]{1,3}$")]
_Flag = bool | Literal[0, 1, "0", "1", "true", "false"]
_Correlation = Annotated[str, Field(min_length=1, max_length=MAX_CORRELATION_ID)]


class ThingParkDownlink(BaseModel):
    """ThingPark's downlink; its other fields (Time, AS_ID, ValidityTime...) are ignored."""

    model_config = ConfigDict(extra="allow")

    DevEUI: Annotated[str, Field(pattern=_DEV_EUI)]
    FPort: _Port | None = Field(default=None, description="default: the connection's downlinkPort")
    payload_hex: Annotated[str, Field(pattern=_PAYLOAD_HEX)]
    Confirmed: _Flag | None = None
    CorrelationID: _Correlation | None = None


class ThingParkDownlinkMessage(BaseModel):
    DevEUI_downlink: ThingParkDownlink


class FlatDownlink(BaseModel):
    model_config = ConfigDict(extra="allow")

    DevEUI: Annotated[str, Field(pattern=_DEV_EUI)]
    FPort: _Port | None = Field(default=None, description="default: the connection's downlinkPort")
    payload_hex: Annotated[str, Field(pattern=_PAYLOAD_HEX)]
    confirmed: _Flag | None = None
    correlationId: _Correlation | None = None


class DownlinkInput(RootModel[ThingParkDownlinkMessage | FlatDownlink]):
    """A downlink: ThingPark's `DevEUI_downlink` document, or the same fields flat."""

    model_config = ConfigDict(title="DownlinkInput")


class DownlinkAccepted(BaseModel):
    """Published to the device's network server on the source broker."""

    devEUI: str
    fPort: int
    topic: str


class Connector(BaseModel):
    id: str
    producerId: str
    moduleId: str
    version: str
    description: str
    brands: list[dict[str, Any]]
    connection: dict[str, Any]
    flow: dict[str, Any]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        answer["headers"] = {
            name: {"schema": {"type": "string"}, "description": text}
            for name, text in (
                ("X-Total", "items in all pages"),
                ("X-Total-Pages", "number of pages"),
                ("X-Page", "this page"),
            )
        }
    return answer


def _errors(*statuses: int) -> dict[str, Any]:
    texts = {
        400: "Malformed JSON, body or query",
        401: "Missing or wrong bearer token",
        404: "Not found",
        409: "Conflict (duplicate id, read-only provisioned connection)",
        413: "Body too large",
        415: "Body is not application/json",
        422: "Invalid connection or binding, field by field",
        503: "Registry unavailable",
    }
    return {str(s): _json(_ref("Error"), texts[s]) for s in (401, 503, *statuses)}


_SIGNED = [
    {
        "name": name,
        "in": "query",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
        "description": text,
    }
    for name, text in (
        ("AS_ID", "the connection's downlinkAsId"),
        ("Time", "ISO 8601 with offset; within [downlinks] max_time_deviation of the server"),
        ("Token", "last: hex SHA-256 of the query before Token, the body and downlinkAsKey"),
    )
]


_PAGE = [
    {
        "name": "page",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 1},
    },
    {
        "name": "perPage",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE, "default": 20},
    },
]
_CONNECTOR_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": ID_PATTERN},
}
_EUI = {
    "name": "devEUI",
    "in": "path",
    "required": True,
    # What `normalize_dev_eui` accepts: 16 hex digits once the separators are removed.
    "schema": {"type": "string", "pattern": r"^[-:]*(?:[0-9A-Fa-f][-:]*){16}$"},
    "description": "16 hex digits; '-' or ':' separators and lower case accepted",
}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _paths() -> dict[str, Any]:
    connection = _ref("Connection")
    return {
        f"{BASE}/connectors": {
            "get": {
                "summary": "The connector catalog",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Connector")}, "Connectors"),
                    **_errors(),
                },
            }
        },
        f"{BASE}/connectors/{{id}}": {
            "get": {
                "summary": "One connector",
                "parameters": [_CONNECTOR_ID],
                "responses": {"200": _json(_ref("Connector"), "A connector"), **_errors(404)},
            }
        },
        f"{BASE}/connections": {
            "get": {
                "summary": "List connections",
                "parameters": _PAGE,
                "responses": {
                    "200": _json({"type": "array", "items": connection}, "A page", headers=True),
                    **_errors(400),
                },
            },
            "post": {
                "summary": "Create a connection",
                "requestBody": _body("ConnectionInput"),
                "responses": {
                    "201": {
                        **_json(connection, "Created"),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 409, 413, 415, 422),
                },
            },
        },
        f"{BASE}/connections/{{id}}": {
            "parameters": [_ID],
            "get": {
                "summary": "One connection, with state, startupTime and statistics",
                "responses": {"200": _json(connection, "The connection"), **_errors(404)},
            },
            "put": {
                "summary": "Replace a connection ('*****' keeps a stored secret)",
                "requestBody": _body("ConnectionInput"),
                "responses": {
                    "200": _json(connection, "Replaced"),
                    **_errors(400, 404, 409, 413, 415, 422),
                },
            },
            "delete": {
                "summary": "Delete a connection; its pending deliveries are dropped",
                "responses": {"204": {"description": "Deleted"}, **_errors(404, 409)},
            },
        },
        f"{BASE}/connections/{{id}}/events": {
            "get": {
                "summary": "The connection's event log, newest first",
                "parameters": [_ID, *_PAGE],
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Event")}, "A page", headers=True),
                    **_errors(400, 404),
                },
            }
        },
        f"{BASE}/devices": {
            "get": {
                "summary": "Device bindings",
                "parameters": [
                    {"name": "connectionId", "in": "query", "schema": {"type": "string"}},
                    *_PAGE,
                ],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": _ref("Device")}, "A page", headers=True
                    ),
                    **_errors(400),
                },
            }
        },
        f"{BASE}/devices/{{devEUI}}": {
            "parameters": [_EUI],
            "get": {
                "summary": "A device's connections",
                "responses": {"200": _json(_ref("Device"), "The device"), **_errors(400, 404)},
            },
            "put": {
                "summary": "Set a device's connections",
                "requestBody": _body("DeviceInput"),
                "responses": {
                    "200": _json(_ref("Device"), "The device"),
                    **_errors(400, 409, 413, 415, 422),
                },
            },
            "delete": {
                "summary": "Unbind a device from every connection",
                "responses": {"204": {"description": "Unbound"}, **_errors(400, 404, 409)},
            },
        },
        f"{BASE}/alarms": {
            "get": {
                "summary": "Raised alarms, across connections",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("ActiveAlarm")}, "Raised alarms"),
                    **_errors(),
                },
            }
        },
        DOWNLINK_ROUTE: {
            "post": {
                "summary": "Send a downlink to a device of the connection, through its network"
                " server",
                "description": "Signed as ThingPark signs downlinks, with the connection's"
                " downlinkAsId and downlinkAsKey instead of the bearer token: the query carries"
                " AS_ID, Time and, last, Token = lower-case hex SHA-256 of (the query before"
                " '&Token=', percent-decoded) + (the body) + (downlinkAsKey). Each Token is"
                " accepted once.",
                "security": [{"downlinkToken": []}],
                "parameters": [_ID, *_SIGNED],
                "requestBody": _body("DownlinkInput"),
                "responses": {
                    "202": _json(_ref("DownlinkAccepted"), "Published on the source broker"),
                    **{
                        str(status): _json(_ref("Error"), text)
                        for status, text in (
                            (401, "Missing, wrong, stale or replayed signature"),
                            (404, "No such connection"),
                            (413, "Body too large"),
                            (415, "Body is not application/json"),
                            (
                                422,
                                "Refused; code: not_json, wrong_shape, bad_dev_eui, bad_port,"
                                " bad_payload, unknown_device or disabled",
                            ),
                            (
                                503,
                                "Source broker not connected (not_connected), or registry"
                                " unavailable",
                            ),
                        )
                    },
                },
            }
        },
        INGEST_ROUTE: {
            "post": {
                "summary": "An uplink pushed by a network server, to an [[ingest]] entry",
                "description": "Not bearer-authenticated: each [[ingest]] entry checks its own"
                " credentials (auth = thingpark: ThingPark's AS_ID, Time and Token query"
                " parameters; header: the entry's header and token; bearer: Authorization:"
                " Bearer <token>). 200 only once the uplink's deliveries are committed to the"
                " spool. See docs/ingest.md.",
                "security": [],
                "parameters": [
                    {
                        "name": "ingestId",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "event",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "ChirpStack's event type; only 'up' is an uplink",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "accepted": {"type": "boolean"},
                                "routed": {"type": "boolean"},
                            },
                            "required": ["accepted", "routed"],
                        },
                        "Committed to the spool (routed), or bound to no connection",
                    ),
                    "204": {"description": "A ChirpStack event that is not an uplink"},
                    **{
                        str(status): _json(_ref("Error"), text)
                        for status, text in (
                            (
                                400,
                                "Not an uplink of the entry's format; code: not_json,"
                                " wrong_shape, bad_dev_eui",
                            ),
                            (
                                401,
                                "Unknown ingest id, or missing, wrong, stale or replayed"
                                " credentials",
                            ),
                            (413, "Body larger than the entry's max_body_bytes"),
                            (
                                503,
                                f"The spool could not commit it; Retry-After:"
                                f" {RETRY_AFTER_SECONDS}",
                            ),
                        )
                    },
                },
            }
        },
        f"{BASE}/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors()},
            }
        },
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        connection_input_model(),
        Connection,
        Statistics,
        Device,
        DeviceInput,
        Event,
        Error,
        Connector,
        ActiveAlarm,
        DownlinkInput,
        DownlinkAccepted,
    ]
    _, definitions = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "iotflow",
            "version": __version__,
            "description": "Connections API following ThingPark X IoT Flow's.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": definitions["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "downlinkToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "Token",
                    "description": f"With AS_ID and Time; see POST {DOWNLINK_ROUTE}",
                },
            },
        },
    }
