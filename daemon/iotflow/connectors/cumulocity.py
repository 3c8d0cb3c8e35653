"""`actility-cumulocity-iot`: a Cumulocity tenant through its REST API (sinks/cumulocity/)."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from iotflow.config.types import Duration, Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.web import CaCertificate, HostName, base_url

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

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


class CumulocityConfig(CommonConfig):
    hostName: HostName
    tenantId: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^/:\s]+$")]
    # Sent as `{tenantId}/{username}` in HTTP Basic: a colon would end the user name early.
    username: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^:]+$")]
    password: Secret
    # PEM of the CA that signed the tenant's certificate (the product's spelling): private
    # installations (Cumulocity Edge) and local doubles. Absent: the system trust store.
    trustedCaCertficate: CaCertificate = None
    # Seconds between two rounds of operation polling, as a duration ("10s", "1m").
    operationsPollInterval: PollInterval = DEFAULT_POLL_INTERVAL

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
