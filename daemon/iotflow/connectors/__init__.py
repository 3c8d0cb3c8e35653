"""The connector catalog: what kinds of connection exist and how each is configured."""

from iotflow.connectors.catalog import CATALOG, Connector, connector_document
from iotflow.connectors.connection import Connection, parse_connection
from iotflow.connectors.inputs import connection_input_model

__all__ = [
    "CATALOG",
    "Connection",
    "Connector",
    "connection_input_model",
    "connector_document",
    "parse_connection",
]
