"""Decode an MQTT message body into an `Uplink`, by the subscription's format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from iotflow.errors import Rejection
from iotflow.formats import actility, chirpstack, tts
from iotflow.formats.fields import describe
from iotflow.formats.uplink import Uplink

_DECODERS: dict[str, Callable[[dict[str, Any]], Uplink]] = {
    "actility": actility.decode,
    "chirpstack": chirpstack.decode,
    "tts": tts.decode,
}

FORMATS: frozenset[str] = frozenset(_DECODERS)
# Real uplinks are a few KiB; the cap keeps a stray message from costing a large parse.
MAX_UPLINK_BYTES = 64 * 1024


def decode(fmt: str, payload: bytes) -> Uplink:
    """Decode one message of format `fmt` (one of FORMATS).

    Raises `Rejection` for a message that cannot be routed: `too_large`, `not_json` (also
    invalid UTF-8 and JSON that is not an object), `wrong_shape` (not this format, or a
    field of the wrong type, named by its key path), `bad_dev_eui`. An unknown `fmt` is a
    programming or configuration error: ValueError.
    """
    decoder = _DECODERS.get(fmt)
    if decoder is None:
        raise ValueError(f"unknown uplink format {fmt!r}; expected one of {sorted(FORMATS)}")
    if len(payload) > MAX_UPLINK_BYTES:
        raise Rejection(
            "too_large", f"{len(payload)} bytes, more than the {MAX_UPLINK_BYTES} allowed"
        )
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:  # also raised for invalid UTF-8
        raise Rejection("not_json", str(exc)) from None
    if not isinstance(document, dict):
        raise Rejection("not_json", f"expected a JSON object, got {describe(document)}")
    return decoder(document)
