"""TS013 payload drivers (JavaScript codecs) run in an embedded V8 (docs/drivers.md)."""

from iotflow.drivers.engine import CodecFault
from iotflow.drivers.service import AUTO, DriverInfo, Drivers

__all__ = ["AUTO", "CodecFault", "DriverInfo", "Drivers"]
