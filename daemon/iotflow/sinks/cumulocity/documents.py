"""The Cumulocity documents of an uplink (pure): its device, event and measurement.

The mapping and the decisions behind it are in docs/cumulocity.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from iotflow.formats import Uplink

SERIAL_TYPE = "c8y_Serial"  # the external id type that holds the DevEUI
DEVICE_TYPE = "c8y_LoRaDevice"
UPLINK_TYPE = "c8y_LoRaUplink"  # type of the event and of the measurement of an uplink
SIGNAL_FRAGMENT = "c8y_SignalStrength"  # Cumulocity's own fragment for radio quality
COMMAND_FRAGMENT = "c8y_Command"  # the device shell: text `<fport>:<hex>`
DOWNLINK_FRAGMENT = "c8y_LoRaDownlink"  # structured: {"fPort", "payloadHex", "confirmed"}
SUPPORTED_OPERATIONS = [COMMAND_FRAGMENT, DOWNLINK_FRAGMENT]

# Keys of a measurement that are not fragments: a decoded field of that name is left out.
_RESERVED = frozenset({"id", "self", "source", "type", "time", "creationTime", "lastUpdated"})
_FRAGMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def _time(uplink: Uplink) -> str:
    return uplink.time.isoformat(timespec="milliseconds")


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def device_document(uplink: Uplink) -> dict[str, Any]:
    """The managed object of a new device."""
    return {
        "name": uplink.device_name or uplink.dev_eui,
        "type": DEVICE_TYPE,
        "c8y_IsDevice": {},
        # Cumulocity only accepts operations for a device in an agent's hierarchy; iotflow
        # is the agent of the devices it creates, so each is its own agent.
        "com_cumulocity_model_Agent": {},
        "c8y_SupportedOperations": SUPPORTED_OPERATIONS,
        "c8y_Hardware": {"serialNumber": uplink.dev_eui},
        DEVICE_TYPE: {"devEUI": uplink.dev_eui},
    }


def event_document(uplink: Uplink, source: str) -> dict[str, Any]:
    """The event of an uplink: its frame and radio metadata in the `c8y_LoRaUplink` fragment."""
    radio = uplink.radio
    best = radio.gateways[0] if radio.gateways else None
    payload_hex = uplink.payload.hex()
    # Cumulocity requires a text; what an operator scans in the event list.
    text = " ".join(
        ["LoRa uplink"]
        + ([f"FPort {uplink.f_port}"] if uplink.f_port is not None else [])
        + ([f"FCnt {uplink.f_cnt}"] if uplink.f_cnt is not None else [])
    )
    if payload_hex:
        text += f": {payload_hex}"
    return {
        "source": {"id": source},
        "type": UPLINK_TYPE,
        "time": _time(uplink),
        "text": text,
        UPLINK_TYPE: _without_none(
            {
                "devEUI": uplink.dev_eui,
                "fPort": uplink.f_port,
                "fCnt": uplink.f_cnt,
                "payloadHex": payload_hex,
                "rssi": radio.rssi,
                "snr": radio.snr,
                "sf": radio.spreading_factor,
                "frequency": radio.frequency_mhz,
                "gateway": best.id if best is not None else None,
                "gatewayCount": len(radio.gateways) or None,
                "devAddr": radio.dev_addr,
            }
        ),
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fragment_name(key: str) -> str:
    # Cumulocity refuses dots, `$` and spaces in fragment and series names.
    return _FRAGMENT_UNSAFE.sub("_", key)


def measurement_document(uplink: Uplink, source: str) -> dict[str, Any] | None:
    """The measurement of an uplink, or None when it has no number to carry.

    - RSSI and SNR: Cumulocity's `c8y_SignalStrength` fragment, series `rssi` (dBm) and
      `snr` (dB).
    - Decoded payload: a number `x` becomes fragment `x`, series `x`; an object of numbers
      `x: {a, b}` becomes fragment `x`, series `a` and `b` (the mapping thin-edge.io uses).
      Decoders give no units, so none is sent. Strings, booleans, lists and deeper objects
      are left out (the event keeps the raw payload).
    """
    fragments: dict[str, dict[str, dict[str, Any]]] = {}
    signal: dict[str, dict[str, Any]] = {}
    if uplink.radio.rssi is not None:
        signal["rssi"] = {"value": uplink.radio.rssi, "unit": "dBm"}
    if uplink.radio.snr is not None:
        signal["snr"] = {"value": uplink.radio.snr, "unit": "dB"}
    if signal:
        fragments[SIGNAL_FRAGMENT] = signal
    for key, value in (uplink.decoded or {}).items():
        name = _fragment_name(key)
        if not name or name in _RESERVED:
            continue
        if _number(value):
            fragments.setdefault(name, {})[name] = {"value": value}
        elif isinstance(value, dict):
            for series, inner in value.items():
                series_name = _fragment_name(series)
                if series_name and _number(inner):
                    fragments.setdefault(name, {})[series_name] = {"value": inner}
    if not fragments:
        return None
    return {"source": {"id": source}, "type": UPLINK_TYPE, "time": _time(uplink), **fragments}
