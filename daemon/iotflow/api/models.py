"""The bodies the API reads and writes, as models.

Handlers build their answers from these models (`body()` validates and serialises), and
the OpenAPI document is generated from the same models: what is documented is what is sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model, field_serializer

from iotflow.alarms.model import Alarm
from iotflow.connectors.connection import ID_PATTERN
from iotflow.connectors.inputs import connection_input_model
from iotflow.downlinks.parse import (
    CONFIRMED_TEXTS,
    MAX_CORRELATION_ID,
    MAX_PAYLOAD_BYTES,
    MAX_PORT,
    MIN_PORT,
    PAYLOAD_HEX_PATTERN,
    PORT_TEXT_PATTERN,
    SPELLINGS,
)
from iotflow.formats.fields import DEV_EUI_PATTERN, NORMAL_DEV_EUI_PATTERN
from iotflow.processors.operations import UpOperation
from iotflow.telemetry.metrics import STATES

# -- what comes in -------------------------------------------------------------------------


def connection_input() -> type[BaseModel]:
    """A connection as POST and PUT take it: one branch per registered connector, derived
    from the catalog (`connectors/inputs.py`), so a plugin's connections are described like
    the built-ins'. The one place the document learns of the connectors."""
    return connection_input_model()


ConnectionInput = connection_input()


class DeviceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devEUI: str | None = None
    connections: list[Annotated[str, Field(pattern=ID_PATTERN)]]


_DevEUI = Annotated[str, Field(pattern=DEV_EUI_PATTERN)]
_PayloadHex = Annotated[
    str, Field(pattern=rf"^{PAYLOAD_HEX_PATTERN}$", max_length=2 * MAX_PAYLOAD_BYTES)
]
_Port = (
    Annotated[int, Field(ge=MIN_PORT, le=MAX_PORT)]
    | Annotated[str, Field(pattern=rf"^{PORT_TEXT_PATTERN}$")]
)
_Flag = bool | Literal[0, 1] | Literal[CONFIRMED_TEXTS]  # type: ignore[valid-type]
_Correlation = Annotated[str, Field(min_length=1, max_length=MAX_CORRELATION_ID)]


def _downlink(name: str, shape: str, doc: str) -> type[BaseModel]:
    """A downlink shape, its fields spelt as the parser reads them first."""
    spelt = {what: names[0] for what, names in SPELLINGS[shape].items()}
    fields: dict[str, Any] = {
        spelt["dev_eui"]: (_DevEUI, ...),
        spelt["port"]: (
            _Port | None,
            Field(default=None, description="default: the connection's downlinkPort"),
        ),
        "payload_hex": (_PayloadHex, ...),
        spelt["confirmed"]: (_Flag | None, None),
        spelt["correlation"]: (_Correlation | None, None),
    }
    model: type[BaseModel] = create_model(
        name, __config__=ConfigDict(extra="allow"), __doc__=doc, **fields
    )
    return model


ThingParkDownlink = _downlink(
    "ThingParkDownlink",
    "thingpark",
    "ThingPark's downlink; its other fields (Time, AS_ID, ValidityTime...) are ignored.",
)
FlatDownlink = _downlink("FlatDownlink", "flat", "ThingPark's downlink fields, flat.")


class ThingParkDownlinkMessage(BaseModel):
    DevEUI_downlink: ThingParkDownlink  # type: ignore[valid-type]


class DownlinkInput(RootModel[ThingParkDownlinkMessage | FlatDownlink]):  # type: ignore[valid-type]
    """A downlink: ThingPark's `DevEUI_downlink` document, or the same fields flat."""

    model_config = ConfigDict(title="DownlinkInput")


class UplinkInput(RootModel[dict[str, Any]]):
    """An uplink in the [[ingest]] entry's format (see docs/ingest.md)."""

    model_config = ConfigDict(title="UplinkInput")


# -- what goes out -------------------------------------------------------------------------


class _Out(BaseModel):
    # A field the runtime adds and the model lacks fails the tests, not the document.
    model_config = ConfigDict(extra="forbid")


class _Counts(_Out):
    received: int
    delivered: int
    retried: int
    expired: int
    failed: int
    dropped: int
    filtered: int
    pending: int
    lastError: str | None
    lastDeliveryTime: str | None


class InstanceStatistics(_Counts):
    """One instance's share of a connection's statistics (fleets only)."""

    instance: str = Field(description="the instance's id ([mqtt] client_id)")


class Statistics(_Counts):
    """Since each instance started. With a PostgreSQL registry (a fleet), the sum over the
    live instances, and `instances` says what each counted; absent for a single instance."""

    instances: list[InstanceStatistics] | None = None


class InstanceView(_Out):
    """One daemon of the fleet that shares this registry."""

    model_config = ConfigDict(title="Instance")

    id: str = Field(description="[mqtt] client_id, unique in a fleet")
    apiUrl: str | None
    version: str
    schemaVersion: int = Field(description="the newest registry migration it knows")
    startedAt: str
    lastSeen: str = Field(description="its last heartbeat")
    alive: bool = Field(description="heard from within three heartbeats")
    answering: bool = Field(description="whether it is the instance answering this request")


class AlarmStatus(_Out):
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


class ActiveAlarm(_Out):
    """A raised alarm."""

    connectionId: str
    alarm: int
    message: str
    threshold: float
    rate: float
    since: str | None
    window: dict[str, str | None]


class Connection(_Out):
    """A connection as the API shows it: secrets as "*****", and its status."""

    id: str
    name: str
    connectorId: str
    brand: str | None = None  # left out when there is none
    active: bool
    alarms: list[Alarm]
    upOperations: list[UpOperation] | None = None  # left out when there are none
    configuration: dict[str, Any]
    state: str = Field(json_schema_extra={"enum": list(STATES)})
    startupTime: str | None
    statistics: Statistics
    provisioned: bool
    alarmStates: list[AlarmStatus]

    @field_serializer("alarms")
    def _alarms(self, alarms: list[Alarm]) -> list[dict[str, Any]]:
        # As the connection's own document writes them (and the registry stores them).
        return [a.model_dump(mode="json", exclude_none=True) for a in alarms]

    @field_serializer("upOperations")
    def _operations(self, operations: list[Any] | None) -> list[dict[str, Any]] | None:
        if operations is None:
            return None
        return [o.model_dump(mode="json", exclude_none=True) for o in operations]


class Device(_Out):
    devEUI: Annotated[str, Field(pattern=NORMAL_DEV_EUI_PATTERN)]
    connections: list[str]


class Event(_Out):
    id: int
    time: str
    type: str
    details: dict[str, Any]


class ErrorDetail(_Out):
    path: str
    message: str


class Error(_Out):
    code: str
    message: str
    details: list[ErrorDetail]


class Connector(_Out):
    id: str
    producerId: str
    moduleId: str
    version: str
    description: str
    brands: list[dict[str, Any]]
    connection: dict[str, Any]
    flow: dict[str, Any]


class DownlinkAccepted(_Out):
    """Published to the device's network server on the source broker."""

    devEUI: str
    fPort: int
    topic: str


class IngestAccepted(_Out):
    """Committed to the spool (routed), or bound to no connection."""

    accepted: bool
    routed: bool


class WhoAmI(_Out):
    """The caller's token, by its name (never the token) and role."""

    name: str
    role: Literal["reader", "writer", "owner"]


class Health(_Out):
    status: Literal["ok"]


class Readiness(_Out):
    status: Literal["ready", "not ready"]
    checks: dict[str, bool]


class OpenApi(RootModel[dict[str, Any]]):
    """An OpenAPI 3.1 document."""

    model_config = ConfigDict(title="OpenApi")


class Driver(_Out):
    """A TS013 codec found under [drivers] path (docs/drivers.md)."""

    id: str
    producer: str
    module: str
    version: str
    status: Literal["ready", "failed"]
    error: str | None
    encodeDownlink: bool


class DecodeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload_hex: Annotated[str, Field(pattern=r"^([0-9a-fA-F]{2}){0,242}$")]
    fPort: Annotated[int, Field(ge=0, le=255)] | None = None


class DecodedError(_Out):
    code: str
    message: str


class Decoded(_Out):
    """`payload` (the codec's data) or `payloadDecodedError`, as in DevEUI_uplink."""

    payload: Any = None
    payloadDecodedError: DecodedError | None = None


# -- dead letters and replays (docs/deadletters.md) ----------------------------------------

MAX_RESEND_IDS = 10_000  # ids in one re-send request
MAX_REPLAY_DEVICES = 10_000  # devEUIs in one replay request


class DeadLetter(_Out):
    """A delivery that ended failed or expired, kept to be looked at and re-sent."""

    id: int
    devEUI: str
    uplinkTime: str
    outcome: Literal["failed", "expired"]
    reason: str
    status: int | None = Field(default=None, description="when the cloud answered")
    body: str | None = Field(default=None, description="the cloud's answer, truncated")
    attempts: int
    firstAttemptTime: str | None
    lastAttemptTime: str | None
    time: str = Field(description="when it became a dead letter")
    instance: str | None = Field(
        default=None,
        description="fleets: the instance that holds it (its id is unique there only)",
    )


class DeadLetterDetail(DeadLetter):
    """One dead letter, with the document that was to be sent."""

    document: Any


class ResendInput(BaseModel):
    """Re-send by `ids`, or `all` those matching `outcome` and `devEUI` (both optional)."""

    model_config = ConfigDict(extra="forbid")

    ids: Annotated[list[Annotated[int, Field(ge=1)]], Field(max_length=MAX_RESEND_IDS)] | None = (
        None
    )
    all: bool | None = None
    outcome: Literal["failed", "expired"] | None = None
    devEUI: _DevEUI | None = None


class Resent(_Out):
    resent: int = Field(description="letters put back in the connection's queue")


class ReplayInput(BaseModel):
    """A window of uplink time (ISO 8601 with offset), and optionally the devices."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", description="ISO 8601 with offset, inclusive")
    to: str = Field(description="ISO 8601 with offset, inclusive; not before `from`")
    devEUIs: Annotated[list[_DevEUI], Field(max_length=MAX_REPLAY_DEVICES)] | None = None


class InstanceReplay(_Out):
    """Fleets: the replay one instance started on its own journal."""

    instance: str
    id: str
    uplinks: int


class ReplayStarted(_Out):
    id: str
    uplinks: int = Field(description="journaled uplinks of the window to send")
    instances: list[InstanceReplay] | None = Field(
        default=None, description="fleets: the replay each instance started"
    )


class Replay(_Out):
    id: str
    connectionId: str
    state: Literal["running", "done", "cancelled"]
    total: int
    delivered: int
    expired: int
    failed: int
    pending: int
    instance: str | None = Field(
        default=None, description="fleets: the instance it runs on, when not this one"
    )
