"""`actility-azure-iot`: Azure IoT Hub over MQTT, an identity per DevEUI (docs/azure-iot.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from iotflow.config.types import Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

_HOST = r"^[A-Za-z0-9][A-Za-z0-9.\-]*$"
_HOST_PORT = r"^[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?$"
_URL = r"^https?://[^\s/?#]+/?$"


class AzureConfig(CommonConfig):
    # The product's keys (its POST /connections example): the hub and a shared access policy.
    hostName: Annotated[str, Field(pattern=_HOST, max_length=255)]
    sharedAccessKeyName: Annotated[str, Field(min_length=1, max_length=64)]
    sharedAccessKey: Secret
    # The hub's pricing tier and units: informative (the hub enforces its own quotas).
    iotHubTier: Annotated[str, Field(max_length=16)] | None = None
    iotHubUnits: Annotated[int, Field(ge=1, le=200)] | None = None
    trustedCaCertficate: str | None = None  # the product's spelling
    # iotflow's own: where MQTT and the registry are reached when not at `hostName` (a
    # private endpoint, a local double); the SAS tokens still name `hostName`.
    mqttEndpoint: Annotated[str, Field(pattern=_HOST_PORT, max_length=255)] | None = None
    registryURL: Annotated[str, Field(pattern=_URL, max_length=255)] | None = None
    # Device sessions kept open at once (one MQTT connection per device, as Azure wants).
    maxDeviceSessions: Annotated[int, Field(ge=1, le=10_000)] = 100


def _azure_sink(connection: Connection, context: SinkContext) -> Sink:
    from iotflow.sinks.azure import AzureSink

    config = connection.configuration
    assert isinstance(config, AzureConfig)  # validated with this connector's model
    return AzureSink(connection.id, config, context)


CONNECTOR = Connector(
    id="actility-azure-iot",
    description="Actility Azure IoT Hub Connector",
    version="1.0.0",
    configuration=AzureConfig,
    create_sink=_azure_sink,
)
