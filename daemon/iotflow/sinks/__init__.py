"""Sinks: one module per connector, made from a connection by `create_sink`."""

from __future__ import annotations

from iotflow.connectors.connection import Connection
from iotflow.connectors.http import HttpConfig
from iotflow.errors import ConfigError, Problem
from iotflow.sinks.base import Sink
from iotflow.sinks.http import HttpSink


def create_sink(connection: Connection, *, timeout: float, max_in_flight: int) -> Sink:
    config = connection.configuration
    if isinstance(config, HttpConfig):
        return HttpSink(config, timeout=timeout, max_in_flight=max_in_flight)
    raise ConfigError([Problem("connectorId", f"{connection.connectorId} has no sink here")])


__all__ = ["Sink", "create_sink"]
