"""The config file, as typed and validated models (TOML, see docs/architecture.md "Config file")."""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from iotflow.config.types import Duration, PositiveDuration, Secret
from iotflow.formats import FORMATS, MAX_UPLINK_BYTES, Template


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"unknown format {value!r}; expected one of {sorted(FORMATS)}")
    return value


# The name of an uplink format (formats/), for a subscription or an ingest endpoint.
FormatName = Annotated[str, AfterValidator(_known_format)]


class Subscription(Section):
    topic: Annotated[str, Field(min_length=1)]
    format: FormatName
    # 0 for a broker that offers no more (The Things Stack): at most once from the broker.
    # No 2: at least once is what the spool gives, QoS 2's extra round trip adds nothing.
    qos: Literal[0, 1] = 1

    @field_validator("qos", mode="before")
    @classmethod
    def _qos_number(cls, value: object) -> object:
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError("expected 0 or 1")
        return value

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        levels = value.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError("'#' must be a whole level and the last one")
            if "+" in level and level != "+":
                raise ValueError("'+' must be a whole level")
        return value


class MqttSettings(Section):
    url: str = "mqtt://127.0.0.1:1883"
    # "3.1.1" for brokers without MQTT 5 (The Things Stack, RabbitMQ, older embedded ones).
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: Annotated[str, Field(min_length=1, max_length=64)] = "iotflow"
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None  # for mqtts:// with a private CA
    session_expiry: Duration = timedelta(days=1)
    keepalive: Duration = timedelta(seconds=30)
    shared_group: str = ""
    # How many uncommitted uplinks iotflow takes in: sent as MQTT 5 Receive Maximum, and
    # enforced by iotflow itself on both protocols (3.1.1 has no such field). The window
    # that group commits to the spool are filled from.
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 1000
    # Low cap: the source broker is local and a blip must not become a backlog (#10).
    reconnect_initial: PositiveDuration = timedelta(milliseconds=500)
    reconnect_max: PositiveDuration = timedelta(seconds=2)
    subscriptions: list[Subscription] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("expected mqtt://host:port or mqtts://host:port")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: object) -> object:
        # `protocol = 5` in TOML is an integer; 3.1.1 can only be written as a string.
        if value == 5 and not isinstance(value, bool):
            return "5"
        if value not in ("5", "3.1.1"):
            raise ValueError('expected "5" or "3.1.1"')
        return value

    @field_validator("shared_group")
    @classmethod
    def _valid_group(cls, value: str) -> str:
        if any(c in value for c in "/+#"):
            raise ValueError("a share group name may not contain '/', '+' or '#'")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    def credentials(self) -> tuple[str | None, str | None]:
        """User and password, from the dedicated keys or else from the URL."""
        parts = urlsplit(self.url)
        user = self.username if self.username is not None else parts.username
        if self.password is not None:
            return user, self.password.get_secret_value()
        return user, parts.password


class RegistrySettings(Section):
    url: str = "sqlite:///var/registry.db"
    # PostgreSQL (a fleet): how often this instance publishes its heartbeat and statistics;
    # an instance silent for three of these is shown as not alive (docs/scale-out.md).
    heartbeat: PositiveDuration = timedelta(seconds=5)

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(
                "expected sqlite:///relative.db, sqlite:////absolute.db or postgresql://"
            )
        return value


class SpoolSettings(Section):
    path: str = "var/spool.db"


class JournalSettings(Section):
    """Every decoded uplink kept for replays (docs/deadletters.md); "0s" turns it off."""

    retention: Duration = timedelta(hours=24)
    max_size: ByteSize = ByteSize(1 << 30)

    @field_validator("max_size")
    @classmethod
    def _room(cls, value: ByteSize) -> ByteSize:
        if value < 1 << 20:
            raise ValueError("must be at least 1MiB")
        return value


class DeadLetterSettings(Section):
    """Failed and expired deliveries kept per connection (docs/deadletters.md)."""

    retention: PositiveDuration = timedelta(days=7)
    max_per_connection: Annotated[int, Field(ge=1, le=100_000_000)] = 100_000


class DriverSettings(Section):
    """[drivers]: TS013 JavaScript codecs under `path` (docs/drivers.md)."""

    path: str | None = None  # <producer>/<module>/<version>/driver.js below it; None: none
    # Each decodeUplink/encodeDownlink call; a codec that runs longer is interrupted.
    timeout: Duration = timedelta(milliseconds=50)
    # V8 heap of one codec ("64MiB", "32MB" or bytes); past it the call is stopped.
    memory_limit: ByteSize = ByteSize(64 * 1024 * 1024)

    @field_validator("timeout")
    @classmethod
    def _sane_timeout(cls, value: timedelta) -> timedelta:
        if not timedelta(milliseconds=1) <= value <= timedelta(seconds=10):
            raise ValueError("expected a duration between 1ms and 10s")
        return value

    @field_validator("memory_limit")
    @classmethod
    def _sane_memory(cls, value: ByteSize) -> ByteSize:
        # Below a few MiB V8 cannot even create its context.
        if not 8 * 1024 * 1024 <= value <= 4 * 1024**3:
            raise ValueError("expected between 8MiB and 4GiB")
        return value


class Role(StrEnum):
    """What an API token may do; each role may do all that the ones before it may."""

    READER = "reader"  # read everything (secrets masked, as for everyone)
    WRITER = "writer"  # also change connections, devices and flows, re-send dead letters
    OWNER = "owner"  # everything, including replays and purges

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


TOKEN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class ApiToken(Section):
    """An API token with the name events and logs give it (never the token itself)."""

    name: Annotated[str, Field(pattern=TOKEN_NAME)]
    token: SecretStr
    role: Role = Role.OWNER


class ApiSettings(Section):
    listen: str = "127.0.0.1:8080"
    # Where the other instances of a fleet reach this one's API (http://host:port), for the
    # fleet-wide answers; default: from `listen`, with the host name for a wildcard address.
    url: str | None = None
    # A bare string is an owner named `token-<its position>`, as before roles existed.
    tokens: list[ApiToken] = Field(default_factory=list)
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port, e.g. 127.0.0.1:8080")
        return value

    @field_validator("tokens", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        return [
            {"name": f"token-{i}", "token": item} if isinstance(item, str) else item
            for i, item in enumerate(value, start=1)
        ]

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http://host:port or https://host:port")
        return value.rstrip("/")

    @field_validator("tokens")
    @classmethod
    def _drop_empty(cls, value: list[ApiToken]) -> list[ApiToken]:
        # `${IOTFLOW_API_TOKEN:-}` left unset is no token, not an empty token that matches.
        tokens = [token for token in value if token.token.get_secret_value()]
        names = [token.name for token in tokens]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"token names must be unique: {', '.join(twice)} used twice")
        secrets = [token.token.get_secret_value() for token in tokens]
        if len(set(secrets)) != len(secrets):
            # Which ones is not said: that would tell a reader of the logs that two match.
            raise ValueError("two entries have the same token; each needs its own")
        return tokens

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class DeliverySettings(Section):
    timeout: Duration = timedelta(seconds=10)
    max_in_flight: Annotated[int, Field(ge=1, le=1024)] = 32
    retry_initial: Duration = timedelta(milliseconds=500)
    retry_max: Duration = timedelta(seconds=60)
    # Used when a connection sets no uplinkTimeValidity: nothing waits in the spool forever.
    default_time_validity: Duration = timedelta(days=1)
    # Deliveries a connection keeps in memory; the rest wait in the spool and are read back.
    memory_queue: Annotated[int, Field(ge=16)] = 10_000
    # SIGTERM: how long in-flight sends may take to finish before the daemon exits.
    drain_timeout: Duration = timedelta(seconds=10)
    # Consecutive failures after which a connection is CLOSED (probe deliveries only).
    circuit_failures: Annotated[int, Field(ge=1)] = 5


class EventSettings(Section):
    # The event log keeps this many events per connection, the newest; older ones are
    # deleted as new ones are written (both registry stores).
    max_per_connection: Annotated[int, Field(ge=1, le=1_000_000)] = 1000


class AlarmSettings(Section):
    notify_topic: str = ""


class DownlinkSettings(Section):
    # Where ThingPark's network server takes downlinks on the source broker (its MQTT
    # connection subscribes where its operator tells it to); `{DevEUI}`, `{FPort}` templates.
    actility_topic: Annotated[str, Field(min_length=1)] = "tpx/things/{DevEUI}/downlink"
    # HTTP downlinks: how far the request's signed `Time` may be from our clock, as
    # ThingPark's "Max Time Deviation"; a captured request is worthless after it.
    max_time_deviation: PositiveDuration = timedelta(minutes=5)
    # How long the source broker may take to acknowledge a downlink (QoS 1).
    publish_timeout: PositiveDuration = timedelta(seconds=10)

    @field_validator("actility_topic")
    @classmethod
    def _publishable(cls, value: str) -> str:
        Template(value)  # raises ValueError with the position of the mistake
        if any(c in value for c in "+#"):
            raise ValueError("a topic to publish on may not contain '+' or '#'")
        return value


INGEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class IngestEndpoint(Section):
    """One `[[ingest]]` entry: POST /iot-flow/v1/ingest/{id} (see docs/ingest.md)."""

    id: Annotated[str, Field(pattern=INGEST_ID_PATTERN)]
    format: FormatName
    auth: Literal["thingpark", "header", "bearer"]
    as_id: str | None = None
    as_key: Secret | None = None
    # How far ThingPark's signed `Time` may be from our clock; replays are refused within it.
    max_clock_skew: PositiveDuration = timedelta(minutes=2)
    header: str | None = None
    token: Secret | None = None
    # Real uplinks are a few KiB; the decoder refuses more than MAX_UPLINK_BYTES anyway.
    max_body_bytes: Annotated[int, Field(ge=1024, le=MAX_UPLINK_BYTES)] = MAX_UPLINK_BYTES

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        # An HTTP token (RFC 9110 5.6.2): what a header name may be.
        if value is not None and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
            raise ValueError("not a valid HTTP header name")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> IngestEndpoint:
        # Each auth kind needs its own keys, and only those: a stray key is a mistake.
        needs = {
            "thingpark": ("as_id", "as_key"),
            "header": ("header", "token"),
            "bearer": ("token",),
        }
        missing = [k for k in needs[self.auth] if not _present(getattr(self, k))]
        if missing:
            raise ValueError(f"auth = {self.auth!r} needs {', '.join(missing)}")
        stray = [
            k
            for k in ("as_id", "as_key", "header", "token")
            if k not in needs[self.auth] and getattr(self, k) is not None
        ]
        if stray:
            raise ValueError(f"auth = {self.auth!r} does not use {', '.join(stray)}")
        if self.auth == "thingpark" and self.format != "actility":
            raise ValueError(
                "auth = 'thingpark' signs ThingPark uplinks: format must be 'actility'"
            )
        return self


def _present(value: object) -> bool:
    if isinstance(value, SecretStr):
        return bool(value.get_secret_value())
    return bool(value)


class Config(Section):
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    alarms: AlarmSettings = Field(default_factory=AlarmSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    downlinks: DownlinkSettings = Field(default_factory=DownlinkSettings)
    drivers: DriverSettings = Field(default_factory=DriverSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    deadletters: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    ingest: list[IngestEndpoint] = Field(default_factory=list)
    # Validated one by one against the connector catalog by the loader, so that each
    # problem is reported with its connector's own key paths.
    connections: list[dict[str, Any]] = Field(default_factory=list)
    flows: list[dict[str, Any]] = Field(default_factory=list)  # checked by config.load

    @field_validator("ingest")
    @classmethod
    def _unique_ingest_ids(cls, value: list[IngestEndpoint]) -> list[IngestEndpoint]:
        ids = [entry.id for entry in value]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate ingest id {', '.join(duplicates)}")
        return value
