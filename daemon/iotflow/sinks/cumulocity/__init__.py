"""The Cumulocity sink (`actility-cumulocity-iot`).

- client.py: HTTP to the tenant, and what its answers mean;
- registration.py: the managed object of each device (found or created);
- operations.py: Cumulocity operations polled and handed over as downlinks;
- documents.py: the device, event and measurement documents of an uplink (pure);
- sink.py: `CumulocitySink`, which composes them.
"""

from iotflow.sinks.cumulocity.client import basic_authorization, cumulocity_error
from iotflow.sinks.cumulocity.documents import (
    device_document,
    event_document,
    measurement_document,
)
from iotflow.sinks.cumulocity.operations import downlink_request
from iotflow.sinks.cumulocity.sink import CumulocitySink

__all__ = [
    "CumulocitySink",
    "basic_authorization",
    "cumulocity_error",
    "device_document",
    "downlink_request",
    "event_document",
    "measurement_document",
]
