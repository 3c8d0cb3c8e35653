"""`actility-mqtt-iot` and `actility-aws-iot`: MQTT clouds (their sinks come with issue #5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator

from iotflow.config.types import Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig, template_option

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

_HOST_PORT = r"^[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?$"


class MqttConfig(CommonConfig):
    hostName: Annotated[str, Field(pattern=_HOST_PORT, max_length=255)]
    protocol: Literal["TCP", "SSL", "WSS"] = "TCP"
    username: str | None = None
    password: Secret | None = None
    trustedCaCertficate: str | None = None  # the product's spelling
    certificate: str | None = None
    privateKey: Secret | None = None
    clientId: Annotated[str, Field(max_length=128)] | None = None
    uplinkTopicPattern: Annotated[str, Field(min_length=1)] = "tpx/things/{DevEUI}/uplink"
    downlinkTopicPattern: str | None = "tpx/things/{DevEUI}/downlink"
    qos: Literal[0, 1] = 1

    _templates = field_validator("uplinkTopicPattern", "downlinkTopicPattern")(template_option)


class AwsConfig(CommonConfig):
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")]
    accountPrefix: Annotated[str, Field(pattern=r"^[a-z0-9-]+$")] | None = None
    hostName: str | None = None
    protocol: Literal["SSL", "WSS"] = "SSL"
    certificate: Secret | None = None
    privateKey: Secret | None = None
    certificateId: str | None = None
    trustedCaCertficate: str | None = None
    uplinkTopicPattern: Annotated[str, Field(min_length=1)] = "tpx/things/{DevEUI}/uplink"
    downlinkTopicPattern: str | None = "tpx/things/{DevEUI}/downlink"
    deviceType: str | None = None
    accessKeyId: Secret | None = None
    secretAccessKey: Secret | None = None

    _templates = field_validator("uplinkTopicPattern", "downlinkTopicPattern")(template_option)


# The sink modules are imported when a sink is made: they import this one for its
# configuration, and the catalog need not load the MQTT client to list the connectors.


def _mqtt_sink(connection: Connection, context: SinkContext) -> Sink:
    from iotflow.sinks.mqtt import MqttSink

    config = connection.configuration
    assert isinstance(config, MqttConfig)  # validated with this connector's model
    return MqttSink(connection.id, config, context)


def _aws_sink(connection: Connection, context: SinkContext) -> Sink:
    from iotflow.sinks.aws import AwsSink

    config = connection.configuration
    assert isinstance(config, AwsConfig)
    return AwsSink(connection.id, config, context)


MQTT = Connector(
    id="actility-mqtt-iot",
    description="Generic MQTT broker connector",
    version="1.0.0",
    configuration=MqttConfig,
    create_sink=_mqtt_sink,
)

AWS = Connector(
    id="actility-aws-iot",
    description="Actility AWS Connector",
    version="2.0.0",
    configuration=AwsConfig,
    create_sink=_aws_sink,
)
