"""Sinks: one module per connector, made from a connection by `create_sink`."""

from __future__ import annotations

from iotflow.connectors.catalog import CATALOG
from iotflow.connectors.connection import Connection
from iotflow.errors import IotflowError
from iotflow.sinks.base import Sink, SinkContext


class ConnectorNotInstalledError(IotflowError):
    """A connection names a connector that no installed plugin provides."""


def create_sink(connection: Connection, context: SinkContext) -> Sink:
    """The sink of a connection, made by its connector (see connectors/catalog.py)."""
    connector = CATALOG.get(connection.connectorId)
    if connector is None:
        # Validation refuses such a connection; one stored before its plugin was removed is
        # quarantined. The worker's set-up takes it out of service with this reason.
        raise ConnectorNotInstalledError(f"connector {connection.connectorId!r} is not installed")
    return connector.create_sink(connection, context)


__all__ = ["ConnectorNotInstalledError", "Sink", "SinkContext", "create_sink"]
