"""A downlink in the network server's own format: the topic and body it takes on its broker.

The network server is the one that published the device's latest uplink (its input format),
and the identifiers are those its uplinks carried (`Uplink.source`):

- ChirpStack v4: `application/{applicationId}/device/{devEui}/command/down`,
  `{"devEui", "confirmed", "fPort", "data": base64}` (its MQTT integration's command).
- The Things Stack v3: `v3/{application_id}@{tenant_id}/devices/{device_id}/down/push`,
  `{"downlinks": [{"f_port", "frm_payload": base64, "priority": "NORMAL"}]}`.
- ThingPark: `{"DevEUI_downlink": {...}}` on a topic of the operator's choosing (its MQTT
  connection subscribes where it is told to), `[downlinks] actility_topic`.

Pure code, no I/O.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from iotflow.downlinks.model import DownlinkRejected, DownlinkRequest
from iotflow.formats import render_template

__all__ = ["DEFAULT_ACTILITY_TOPIC", "NetworkDownlink", "render_downlink"]

DEFAULT_ACTILITY_TOPIC = "tpx/things/{DevEUI}/downlink"


@dataclass(frozen=True, slots=True)
class NetworkDownlink:
    """What to publish on the source broker for one downlink."""

    topic: str
    body: dict[str, Any]

    def payload(self) -> bytes:
        return orjson.dumps(self.body)


def render_downlink(
    fmt: str,
    source: Mapping[str, str],
    request: DownlinkRequest,
    *,
    actility_topic: str = DEFAULT_ACTILITY_TOPIC,
    now: datetime | None = None,
) -> NetworkDownlink:
    """The downlink for a device whose uplinks come in format `fmt` with identifiers `source`.

    Raises DownlinkRejected (`unknown_device`) when the identifiers its network server
    needs are missing or cannot be a topic level, or the format is not one iotflow knows.
    """
    if fmt == "chirpstack":
        return _chirpstack(source, request)
    if fmt == "tts":
        return _tts(source, request)
    if fmt == "actility":
        return _actility(request, actility_topic, now or datetime.now(UTC))
    raise DownlinkRejected(
        "unknown_device", f"device {request.dev_eui} uses network server format {fmt!r}, unknown"
    )


def _chirpstack(source: Mapping[str, str], request: DownlinkRequest) -> NetworkDownlink:
    application = _level(source, "applicationId", request, "ChirpStack")
    # ChirpStack writes EUIs in lower case, in its topics and its JSON alike.
    dev_eui = request.dev_eui.lower()
    return NetworkDownlink(
        topic=f"application/{application}/device/{dev_eui}/command/down",
        body={
            "devEui": dev_eui,
            "confirmed": request.confirmed,
            "fPort": request.f_port,
            "data": base64.b64encode(request.payload).decode("ascii"),
        },
    )


def _tts(source: Mapping[str, str], request: DownlinkRequest) -> NetworkDownlink:
    application = _level(source, "application_id", request, "The Things Stack")
    tenant = _level(source, "tenant_id", request, "The Things Stack")
    device = _level(source, "device_id", request, "The Things Stack")
    downlink: dict[str, Any] = {
        "f_port": request.f_port,
        "frm_payload": base64.b64encode(request.payload).decode("ascii"),
        "priority": "NORMAL",
    }
    # TTS leaves false and empty values out of its own JSON; so do we.
    if request.confirmed:
        downlink["confirmed"] = True
    if request.correlation_id:
        # TTS carries these through its events, so the cloud's reference can be followed.
        downlink["correlation_ids"] = [f"iotflow:{request.correlation_id}"]
    return NetworkDownlink(
        topic=f"v3/{application}@{tenant}/devices/{device}/down/push",
        body={"downlinks": [downlink]},
    )


def _actility(request: DownlinkRequest, topic: str, now: datetime) -> NetworkDownlink:
    inner: dict[str, Any] = {
        "Time": now.isoformat(timespec="milliseconds"),
        "DevEUI": request.dev_eui,
        "FPort": request.f_port,
        "payload_hex": request.payload.hex(),
        "Confirmed": int(request.confirmed),
    }
    if request.correlation_id:
        inner["CorrelationID"] = request.correlation_id
    rendered = render_template(topic, inner)
    if not rendered or any(c in rendered for c in "+#\0"):
        raise DownlinkRejected(
            "unknown_device", f"the ThingPark downlink topic of {request.dev_eui} is {rendered!r}"
        )
    return NetworkDownlink(topic=rendered, body={"DevEUI_downlink": inner})


def _level(source: Mapping[str, str], key: str, request: DownlinkRequest, server: str) -> str:
    """An identifier that goes into a topic: present, and one level without wildcards.

    The identifiers come from uplink documents, i.e. from outside: a `/` or a wildcard in
    one would send the downlink somewhere else.
    """
    value = source.get(key)
    if not value:
        raise DownlinkRejected(
            "unknown_device",
            f"the uplinks of {request.dev_eui} did not say its {server} {key}",
        )
    if any(c in value for c in "/+#\0"):
        raise DownlinkRejected(
            "unknown_device", f"the {server} {key} of {request.dev_eui} is not a topic level"
        )
    return value
