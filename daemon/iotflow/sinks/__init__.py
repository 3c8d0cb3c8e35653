"""Sinks: one module per connector, made from a connection by `create_sink`."""

from __future__ import annotations

from iotflow.connectors.connection import Connection
from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.connectors.http import HttpConfig
from iotflow.connectors.mqtt import AwsConfig, MqttConfig
from iotflow.errors import PermanentSinkError
from iotflow.sinks.aws import AwsSink
from iotflow.sinks.base import Sink, SinkContext
from iotflow.sinks.cumulocity import CumulocitySink
from iotflow.sinks.http import HttpSink
from iotflow.sinks.mqtt import MqttSink
from iotflow.spool import Delivery


class UnavailableSink:
    """A connector of the catalog whose transport this build does not have yet.

    Its connections can be created and listed; each delivery fails visibly (an event and
    `failed`), rather than waiting silently until it expires.
    """

    def __init__(self, connector_id: str) -> None:
        self._reason = f"the {connector_id} transport is not available in this version"

    async def start(self) -> None:
        pass

    async def send(self, delivery: Delivery) -> None:
        raise PermanentSinkError(self._reason)

    async def healthcheck(self) -> bool:
        return False

    async def close(self) -> None:
        pass


def create_sink(connection: Connection, context: SinkContext) -> Sink:
    """The sink of a connection's connector: one module per connector, one line here."""
    config = connection.configuration
    if isinstance(config, HttpConfig):
        return HttpSink(config, timeout=context.timeout, max_in_flight=context.max_in_flight)
    if isinstance(config, CumulocityConfig):
        return CumulocitySink(connection.id, config, context)
    if isinstance(config, MqttConfig):
        return MqttSink(connection.id, config, context)
    if isinstance(config, AwsConfig):
        return AwsSink(connection.id, config, context)
    return UnavailableSink(connection.connectorId)


__all__ = ["Sink", "SinkContext", "create_sink"]
