"""`actility-cumulocity-iot`: a Cumulocity tenant through its REST API (sinks/cumulocity/)."""

from __future__ import annotations

import base64
import ipaddress
import re
import ssl
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field, field_validator

from iotflow.config.types import Duration, Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

# `c8y.example.com`, `c8y.example.com:8443`, `https://c8y.example.com`, `http://127.0.0.1:8443`,
# `[::1]:8443`: a scheme and a port are optional (DESIGN "Connectors"); a path is not, since
# Cumulocity's resources live at the root of the tenant's host.
HOST_NAME_PATTERN = (
    r"^(?:[Hh][Tt][Tt][Pp][Ss]?://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?/?$"
)
_HOST_NAME = re.compile(
    r"^(?:(?P<scheme>https?)://)?(?P<host>[^/:\[\]]+|\[[^\]]+\])(?::(?P<port>[0-9]+))?/?$",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}

# How often the pending operations of the connection's devices are read (docs/cumulocity.md):
# a downlink waits up to this long in Cumulocity; each round is one GET per device seen.
DEFAULT_POLL_INTERVAL = timedelta(seconds=10)
MIN_POLL_INTERVAL = timedelta(seconds=1)
MAX_POLL_INTERVAL = timedelta(hours=1)


def _poll_interval(value: timedelta) -> timedelta:
    if not MIN_POLL_INTERVAL <= value <= MAX_POLL_INTERVAL:
        raise ValueError("must be from 1s to 1h")
    return value


PollInterval = Annotated[Duration, AfterValidator(_poll_interval)]


def base_url(host_name: str) -> str:
    """`hostName` as the URL the REST paths are appended to: `https://host[:port]`.

    The default scheme is https and its port 443, which the URL then leaves out.
    """
    match = _HOST_NAME.match(host_name.strip())
    if match is None:
        raise ValueError(f"{host_name!r} is not a host name with an optional scheme and port")
    scheme = (match["scheme"] or "https").lower()
    host = match["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    suffix = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{suffix}"


class CumulocityConfig(CommonConfig):
    hostName: Annotated[str, Field(min_length=1, max_length=255, pattern=HOST_NAME_PATTERN)]
    tenantId: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^/:\s]+$")]
    # Sent as `{tenantId}/{username}` in HTTP Basic: a colon would end the user name early.
    username: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^:]+$")]
    password: Secret
    # PEM of the CA that signed the tenant's certificate (the product's spelling): private
    # installations (Cumulocity Edge) and local doubles. Absent: the system trust store.
    trustedCaCertficate: str | None = None
    # Seconds between two rounds of operation polling, as a duration ("10s", "1m").
    operationsPollInterval: PollInterval = DEFAULT_POLL_INTERVAL

    @field_validator("hostName")
    @classmethod
    def _host_name(cls, value: str) -> str:
        base_url(value)  # raises ValueError for a port out of range
        return value

    @field_validator("trustedCaCertficate")
    @classmethod
    def _certificate(cls, value: str | None) -> str | None:
        if value is not None:
            # Checked here so that a bad certificate is a 422 naming the field, not a
            # connection that fails at every delivery.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            try:
                context.load_verify_locations(cadata=value)
            except (ssl.SSLError, ValueError, TypeError):  # TypeError: not ASCII
                raise ValueError("not a PEM certificate") from None
        return value

    @property
    def base_url(self) -> str:
        return base_url(self.hostName)

    def secret_values(self) -> set[str]:
        # The Basic credential the sink sends, in case a tenant's error quotes it back.
        login = f"{self.tenantId}/{self.username}:{self.password.get_secret_value()}"
        return super().secret_values() | {base64.b64encode(login.encode()).decode("ascii")}


def _create_sink(connection: Connection, context: SinkContext) -> Sink:
    # Imported here: the sink module imports this one for its configuration.
    from iotflow.sinks.cumulocity import CumulocitySink

    config = connection.configuration
    assert isinstance(config, CumulocityConfig)  # validated with this connector's model
    return CumulocitySink(connection.id, config, context)


CONNECTOR = Connector(
    id="actility-cumulocity-iot",
    description="Cumulocity IoT connector",
    version="1.0.0",
    configuration=CumulocityConfig,
    create_sink=_create_sink,
)
