"""The names an operator sees for a connection's state and a delivery's outcome.

`StrEnum`s, so that a typo is a type error rather than a metric series nobody reads,
while the values on the wire (API documents, events, metric labels, logs) are the plain
strings of the contract (docs/architecture.md).
"""

from __future__ import annotations

from enum import StrEnum, unique

__all__ = ["ConnectionState", "Outcome"]


@unique
class ConnectionState(StrEnum):
    """A connection's state, as in the product this follows (`iotflow_connection_state`)."""

    DEACTIVATED = "DEACTIVATED"  # active=false
    OPENING = "OPENING"  # started, the cloud has not answered yet
    OPENED = "OPENED"
    AUTHENTICATION_FAILED = "AUTHENTICATION_FAILED"  # the cloud refuses the credentials
    CLOSED = "CLOSED"  # unreachable or failing: the circuit is open, only probes go out


@unique
class Outcome(StrEnum):
    """How a delivery ended (`iotflow_deliveries_total{outcome}`, events `delivery_<outcome>`)."""

    DELIVERED = "delivered"
    EXPIRED = "expired"  # its uplinkTimeValidity ran out
    FAILED = "failed"  # refused for good, or an error nothing could send
    DROPPED = "dropped"  # its connection was deleted
    FILTERED = "filtered"  # a filter processor said not to send it
