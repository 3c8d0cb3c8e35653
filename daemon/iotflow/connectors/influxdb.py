"""`actility-influxdb-iot`: one line-protocol point per uplink to InfluxDB's v2 write API
(docs/influxdb.md)."""

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

_TEXT = r"^[^\x00-\x1f\x7f]+$"


class InfluxDbConfig(CommonConfig):
    hostName: HostName = Field(
        description="The InfluxDB server: `http://influx.example.com:8086`,"
        " `https://eu-central-1-1.aws.cloud2.influxdata.com`. The default scheme is https.",
    )
    org: Annotated[str, Field(min_length=1, max_length=256, pattern=_TEXT)] = Field(
        description="The organization's name or id (InfluxDB 1.8+: any text, it is ignored)."
    )
    bucket: Annotated[str, Field(min_length=1, max_length=256, pattern=_TEXT)] = Field(
        description="The bucket (InfluxDB 1.8+: `database/retention-policy`)."
    )
    token: Secret = Field(
        description="An API token allowed to write the bucket, sent as `Authorization:"
        " Token …` (InfluxDB 1.8+: `username:password`)."
    )
    # Names that start with `_` are InfluxDB's own (`_measurement`, `_field`).
    measurement: Annotated[
        str, Field(max_length=256, pattern=r"^[^_\x00-\x1f\x7f][^\x00-\x1f\x7f]*$")
    ] = "uplink"
    trustedCaCertficate: CaCertificate = None

    @property
    def base_url(self) -> str:
        return base_url(self.hostName)


def _create_sink(connection: Connection, context: SinkContext) -> Sink:
    # Imported here: the sink module imports this one for its configuration.
    from iotflow.sinks.influxdb import InfluxDbSink

    config = connection.configuration
    assert isinstance(config, InfluxDbConfig)  # validated with this connector's model
    return InfluxDbSink(config, context)


CONNECTOR = Connector(
    id="actility-influxdb-iot",
    description="InfluxDB connector (line protocol, v2 write API)",
    version="1.0.0",
    configuration=InfluxDbConfig,
    create_sink=_create_sink,
)
