"""Downlink requests as clouds write them, read into a DownlinkRequest.

Two shapes are accepted:

- ThingPark's own, which every cloud connector of ThingPark X IoT Flow sends:
  `{"DevEUI_downlink": {"DevEUI": "...", "FPort": 1, "payload_hex": "...", "Confirmed": 0}}`.
  Numbers may be strings (`"FPort": "1"`, `"Confirmed": "1"`), as ThingPark writes them.
  Its other fields (`Time`, `AS_ID`, `AS_KEY`, `ValidityTime`, `FlushDownlinkQueue`, ...)
  are accepted and ignored: they steer ThingPark's own network server, not the others.
- A flat object: `{"payload_hex": "...", "FPort": 1, "DevEUI": "...", "confirmed": false}`.

The DevEUI comes from the body or from the caller (a topic level); when both give one they
must agree. A missing FPort is the connection's `downlinkPort`. Anything else wrong is a
DownlinkRejected whose reason is one of `model.REASONS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from iotflow.downlinks.model import DownlinkRejected, DownlinkRequest
from iotflow.formats.fields import describe, normalize_dev_eui

__all__ = ["MAX_DOWNLINK_BYTES", "MAX_PAYLOAD_BYTES", "ROOT", "parse_downlink"]

ROOT = "DevEUI_downlink"
# The largest application payload LoRaWAN carries (MACPayload 250 bytes at the fastest data
# rates, less the frame header); slower data rates allow less, which the network server
# checks against the device's current data rate.
MAX_PAYLOAD_BYTES = 242
# Application ports; 0 carries MAC commands and 224 is LoRaWAN's test protocol.
MIN_PORT, MAX_PORT = 1, 223
# A real downlink request is a few hundred bytes; the cap keeps a stray message cheap.
MAX_DOWNLINK_BYTES = 16 * 1024
MAX_CORRELATION_ID = 128  # characters; echoed in events and logs

# The patterns and spellings below are also what the API's document shows (api/models.py).
PAYLOAD_HEX_PATTERN = r"(?:[0-9A-Fa-f]{2})*"
PORT_TEXT_PATTERN = r"[0-9]{1,3}"
CONFIRMED_TEXTS = ("0", "1", "true", "false")  # in any case
_HEX = re.compile(PAYLOAD_HEX_PATTERN)
_PORT_TEXT = re.compile(PORT_TEXT_PATTERN)

# Field names by shape: ThingPark's spelling first; the flat shape also takes the
# camelCase spelling that the rest of iotflow's API uses (`devEUI`, `fPort`).
_THINGPARK: dict[str, tuple[str, ...]] = {
    "dev_eui": ("DevEUI",),
    "port": ("FPort",),
    "confirmed": ("Confirmed",),
    "correlation": ("CorrelationID",),
}
_FLAT: dict[str, tuple[str, ...]] = {
    "dev_eui": ("DevEUI", "devEUI"),
    "port": ("FPort", "fPort"),
    "confirmed": ("confirmed", "Confirmed"),
    "correlation": ("correlationId", "CorrelationID"),
}
SPELLINGS: dict[str, dict[str, tuple[str, ...]]] = {"thingpark": _THINGPARK, "flat": _FLAT}


def parse_downlink(
    body: bytes, *, dev_eui: str | None = None, default_port: int | None = None
) -> DownlinkRequest:
    """Read one downlink request; raise DownlinkRejected saying what is wrong and where.

    `dev_eui` is the device the message is addressed to outside its body (a topic level),
    `default_port` the connection's `downlinkPort`.
    """
    if len(body) > MAX_DOWNLINK_BYTES:
        raise DownlinkRejected(
            "wrong_shape", f"{len(body)} bytes, more than the {MAX_DOWNLINK_BYTES} allowed"
        )
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also raised for invalid UTF-8
        raise DownlinkRejected("not_json", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise DownlinkRejected("not_json", f"expected a JSON object, got {describe(document)}")
    if ROOT in document:
        inner = document[ROOT]
        if not isinstance(inner, dict):
            raise DownlinkRejected(
                "wrong_shape", f"{ROOT}: expected an object, got {describe(inner)}", path=ROOT
            )
        return _read(inner, _THINGPARK, f"{ROOT}.", dev_eui, default_port)
    if "payload_hex" not in document and "payload" not in document:
        raise DownlinkRejected(
            "wrong_shape",
            f'expected {{"{ROOT}": {{...}}}} or {{"payload_hex": "...", "FPort": n}}',
        )
    return _read(document, _FLAT, "", dev_eui, default_port)


def _read(
    fields: Mapping[str, Any],
    names: Mapping[str, tuple[str, ...]],
    prefix: str,
    topic_eui: str | None,
    default_port: int | None,
) -> DownlinkRequest:
    def field(what: str) -> tuple[str, Any]:
        """(path, value) of the first spelling present, else of the first spelling and None."""
        for name in names[what]:
            if fields.get(name) is not None:
                return prefix + name, fields[name]
        return prefix + names[what][0], None

    data = fields.get("payload") if fields.get("payload_hex") is None else None
    return DownlinkRequest(
        dev_eui=_dev_eui(*field("dev_eui"), topic_eui),
        f_port=_port(*field("port"), default_port),
        payload=b"" if data is not None else _payload(fields, prefix),
        confirmed=_confirmed(*field("confirmed")),
        correlation_id=_correlation(*field("correlation")),
        data=data,
    )


def _dev_eui(path: str, value: Any, topic_eui: str | None) -> str:
    given: str | None = None
    if value is not None:
        if not isinstance(value, str):
            raise DownlinkRejected(
                "bad_dev_eui", f"{path}: expected a string, got {describe(value)}", path=path
            )
        try:
            given = normalize_dev_eui(value)
        except ValueError as exc:
            raise DownlinkRejected("bad_dev_eui", f"{path}: {exc}", path=path) from None
    if topic_eui is not None:
        try:
            addressed = normalize_dev_eui(topic_eui)
        except ValueError as exc:
            raise DownlinkRejected("bad_dev_eui", f"the topic's DevEUI: {exc}") from None
        if given is not None and given != addressed:
            # One of the two is a mistake, and a command to the wrong device is worse
            # than none.
            raise DownlinkRejected(
                "bad_dev_eui",
                f"{path} {given} is not {addressed}, the device of the topic",
                path=path,
            )
        return addressed
    if given is None:
        raise DownlinkRejected("bad_dev_eui", f"{path} is missing", path=path)
    return given


def _port(path: str, value: Any, default_port: int | None) -> int:
    if value is None:
        if default_port is None:
            raise DownlinkRejected(
                "bad_port", f"{path} is missing and the connection sets no downlinkPort", path=path
            )
        value = default_port
    port: int | None = None
    # bool is an int to Python, not a port to anyone.
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and _PORT_TEXT.fullmatch(value):
        port = int(value)
    if port is None:
        raise DownlinkRejected(
            "bad_port", f"{path}: expected an integer, got {describe(value)}", path=path
        )
    if not MIN_PORT <= port <= MAX_PORT:
        raise DownlinkRejected(
            "bad_port",
            f"{path}: {port} is not an application port ({MIN_PORT}..{MAX_PORT})",
            path=path,
        )
    return port


def _payload(fields: Mapping[str, Any], prefix: str) -> bytes:
    path = f"{prefix}payload_hex"
    value = fields.get("payload_hex")
    if value is None:
        raise DownlinkRejected("bad_payload", f"{path} is missing", path=path)
    if fields.get("FCntDn") is not None:
        # A payload the application server encrypted itself, for ThingPark's frame counter:
        # no other network server takes it, and re-encrypted it would be garbage.
        raise DownlinkRejected(
            "bad_payload",
            f"{prefix}FCntDn: payloads encrypted by the application server are not supported",
            path=f"{prefix}FCntDn",
        )
    if not isinstance(value, str):
        raise DownlinkRejected(
            "bad_payload", f"{path}: expected a hex string, got {describe(value)}", path=path
        )
    if len(value) > 2 * MAX_PAYLOAD_BYTES:
        raise DownlinkRejected(
            "bad_payload",
            f"{path}: {len(value) // 2} bytes, more than LoRaWAN's {MAX_PAYLOAD_BYTES}",
            path=path,
        )
    # A regex, not bytes.fromhex alone: that also accepts spaces between the bytes.
    if not _HEX.fullmatch(value):
        raise DownlinkRejected(
            "bad_payload", f"{path}: expected an even number of hex digits", path=path
        )
    return bytes.fromhex(value)


def _confirmed(path: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in CONFIRMED_TEXTS:
        return value.lower() in ("1", "true")
    raise DownlinkRejected(
        "wrong_shape", f"{path}: expected true, false, 0 or 1, got {describe(value)}", path=path
    )


def _correlation(path: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CORRELATION_ID:
        raise DownlinkRejected(
            "wrong_shape",
            f"{path}: expected a string of 1 to {MAX_CORRELATION_ID} characters",
            path=path,
        )
    return value
