"""The values of an uplink as a time-series point (pure): its decoded payload fields first,
then its frame and radio metadata under the names that are still free.

Shared by the ThingsBoard telemetry and the InfluxDB line of an uplink (docs/thingsboard.md,
docs/influxdb.md): a decoded field keeps its name even when it is also a metadata name
(a decoder's own `rssi` is the device's, and the device's data is what the point is for).
"""

from __future__ import annotations

import math
from typing import Any

from iotflow.errors import PermanentSinkError, Rejection
from iotflow.formats import Uplink, decode
from iotflow.spool import Delivery


def uplink_of(delivery: Delivery) -> Uplink:
    """The uplink a delivery carries; a document that is not one is a permanent failure
    (processors may have reshaped it into something else)."""
    try:
        return decode("actility", delivery.document)
    except Rejection as exc:
        raise PermanentSinkError(f"uplink document unreadable: {exc}") from None


def metadata(uplink: Uplink) -> dict[str, Any]:
    """Frame and radio metadata, by name; what is unknown is left out."""
    radio = uplink.radio
    best = radio.gateways[0] if radio.gateways else None
    found: dict[str, Any] = {
        "fPort": uplink.f_port,
        "fCnt": uplink.f_cnt,
        "rssi": radio.rssi,
        "snr": radio.snr,
        "sf": radio.spreading_factor,
        "frequency": radio.frequency_mhz,
        "gateway": best.id if best is not None else None,
        "gatewayCount": len(radio.gateways) or None,
        "devAddr": radio.dev_addr,
        "payloadHex": uplink.payload.hex() or None,
    }
    return {k: v for k, v in found.items() if v is not None}


def values(uplink: Uplink) -> dict[str, Any]:
    """Decoded fields (a null one left out), then the metadata not named by one of them."""
    found = {k: v for k, v in (uplink.decoded or {}).items() if k and v is not None}
    for key, value in metadata(uplink).items():
        found.setdefault(key, value)
    return found


def time_ms(uplink: Uplink) -> int:
    """The uplink's own time, in epoch milliseconds."""
    return math.floor(uplink.time.timestamp() * 1000)
