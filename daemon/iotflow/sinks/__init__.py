"""Sinks: one module per connector, made from a connection by `create_sink`."""

from __future__ import annotations

from iotflow.connectors.connection import Connection
from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.connectors.http import HttpConfig
from iotflow.connectors.mqtt import AwsConfig, MqttConfig
from iotflow.sinks.aws import AwsSink
from iotflow.sinks.base import Sink, SinkContext
from iotflow.sinks.cumulocity import CumulocitySink
from iotflow.sinks.http import HttpSink
from iotflow.sinks.mqtt import MqttSink


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
    # Every connector of the catalog has a sink: reaching this is a bug, not bad input.
    raise TypeError(f"no sink for connector {connection.connectorId}")


__all__ = ["Sink", "SinkContext", "create_sink"]
