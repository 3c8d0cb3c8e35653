"""`actility-splunk-iot`: one event per uplink to a Splunk HTTP Event Collector
(docs/splunk.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from iotflow.config.types import Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.web import CaCertificate, HostName, base_url

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

# Splunk's index names: lower-case letters, digits, `_` and `-`, not first.
_INDEX = r"^[a-z0-9][a-z0-9_-]{0,79}$"
_TEXT = r"^[^\x00-\x1f\x7f]+$"


class SplunkConfig(CommonConfig):
    hostName: HostName = Field(
        description="The HEC endpoint's host: `https://splunk.example.com:8088`,"
        " `https://http-inputs-acme.splunkcloud.com`. The default scheme is https.",
    )
    hecToken: Secret = Field(description="The HEC token, sent as `Authorization: Splunk …`.")
    index: Annotated[str, Field(pattern=_INDEX)] | None = Field(
        default=None, description="Absent: the token's default index."
    )
    source: Annotated[str, Field(min_length=1, max_length=256, pattern=_TEXT)] = "iotflow"
    sourcetype: Annotated[str, Field(min_length=1, max_length=256, pattern=_TEXT)] = "_json"
    host: Annotated[str, Field(min_length=1, max_length=256, pattern=_TEXT)] | None = Field(
        default=None, description="The events' host field. Absent: the device's DevEUI."
    )
    trustedCaCertficate: CaCertificate = None

    @property
    def base_url(self) -> str:
        return base_url(self.hostName)


def _create_sink(connection: Connection, context: SinkContext) -> Sink:
    # Imported here: the sink module imports this one for its configuration.
    from iotflow.sinks.splunk import SplunkSink

    config = connection.configuration
    assert isinstance(config, SplunkConfig)  # validated with this connector's model
    return SplunkSink(config, context)


CONNECTOR = Connector(
    id="actility-splunk-iot",
    description="Splunk HTTP Event Collector connector",
    version="1.0.0",
    configuration=SplunkConfig,
    create_sink=_create_sink,
)
