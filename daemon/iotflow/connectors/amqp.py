"""`actility-amqp-0.9.1-iot`: uplinks published to an AMQP 0.9.1 exchange (RabbitMQ and
compatibles), downlinks consumed from a queue bound to it (docs/amqp.md)."""

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
# AMQP names (exchange, virtual host, routing key) are short strings: at most 255 bytes.
_SHORT = 255


class AmqpConfig(CommonConfig):
    hostName: Annotated[str, Field(pattern=_HOST_PORT, max_length=255)]
    protocol: Literal["TCP", "SSL"] = "TCP"
    username: Annotated[str, Field(max_length=_SHORT)] | None = None
    password: Secret | None = None
    virtualHost: Annotated[str, Field(min_length=1, max_length=_SHORT)] = "/"
    # RabbitMQ's predeclared topic exchange; any other is declared (durable, topic) if missing.
    exchangeName: Annotated[str, Field(min_length=1, max_length=_SHORT)] = "amq.topic"
    uplinkTopicPattern: Annotated[str, Field(min_length=1)] = "tpx.things.{DevEUI}.uplink"
    downlinkTopicPattern: str | None = "tpx.things.{DevEUI}.downlink"
    certificate: str | None = None
    privateKey: Secret | None = None
    trustedCaCertficate: str | None = None  # the product's spelling

    _templates = field_validator("uplinkTopicPattern", "downlinkTopicPattern")(template_option)


def _amqp_sink(connection: Connection, context: SinkContext) -> Sink:
    # Imported here: listing the catalog need not load the AMQP client.
    from iotflow.sinks.amqp import AmqpSink

    config = connection.configuration
    assert isinstance(config, AmqpConfig)  # validated with this connector's model
    return AmqpSink(connection.id, config, context)


CONNECTOR = Connector(
    id="actility-amqp-0.9.1-iot",
    description="AMQP 0.9.1 broker connector (RabbitMQ and compatibles)",
    version="1.0.0",
    configuration=AmqpConfig,
    create_sink=_amqp_sink,
)
