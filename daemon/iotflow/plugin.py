"""The public API of connector plugins: the only module of iotflow promised to stay stable.

A connector is one module naming a `Connector` in the `iotflow.connectors` entry-point group
(docs/connectors.md, docs/architecture.md "Connector plugins"):

    class EchoConfiguration(ConnectorConfiguration):   # the common keys come with it
        url: str

    CONNECTOR = Connector(id="acme-echo", description="Echo", version="1.0.0",
                          configuration=EchoConfiguration, create_sink=EchoSink)

`create_sink(connection, context)` makes the sink of one connection (a class whose
`__init__` takes those two is one); `connection.configuration` is the validated
configuration. The sink's `send` returns once the cloud acknowledged the delivery and
raises one of the three errors otherwise; retry, expiry, order, the circuit and statistics
stay in iotflow. A configuration field typed `Secret` is write-only: masked in the API,
kept in the registry, cleaned from error texts.
"""

from iotflow.config.types import Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig as ConnectorConfiguration
from iotflow.errors import AuthenticationSinkError, PermanentSinkError, RetryableSinkError
from iotflow.sinks.base import SinkContext
from iotflow.spool import Delivery

__all__ = [
    "AuthenticationSinkError",
    "Connector",
    "ConnectorConfiguration",
    "Delivery",
    "PermanentSinkError",
    "RetryableSinkError",
    "Secret",
    "SinkContext",
]
