"""The connector catalog: what kinds of connection exist and how each is configured."""

from iotflow.connectors.catalog import CATALOG, Connector, connector_document
from iotflow.connectors.connection import Connection, parse_connection

__all__ = ["CATALOG", "Connection", "Connector", "connector_document", "parse_connection"]
