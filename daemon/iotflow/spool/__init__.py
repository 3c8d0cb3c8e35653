"""The durable local queue of deliveries between ingest and the connection workers.

See `iotflow.spool.store` for the design and the durability decision (WAL, synchronous=FULL).
"""

from iotflow.spool.store import (
    SCHEMA_VERSION,
    DeadLetter,
    Delivery,
    Spool,
    SpoolClosedError,
    SpoolError,
    SpoolFullError,
    SpoolStats,
    SpoolUnavailableError,
    SpoolWriteError,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeadLetter",
    "Delivery",
    "Spool",
    "SpoolClosedError",
    "SpoolError",
    "SpoolFullError",
    "SpoolStats",
    "SpoolUnavailableError",
    "SpoolWriteError",
]
