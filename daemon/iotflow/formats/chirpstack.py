"""ChirpStack v4 `up` events (JSON marshaler, protobuf JSON mapping).

ChirpStack marshals with the protobuf JSON mapping, which leaves out every field at its
default value (v4.0 at least): an uplink with frame counter 0 has no `fCnt`, one on port 0
or without payload has no `fPort`/`data`, a gateway with an SNR of 0 dB has no `snr`. So
an `up` event is told from the other events (join, status, ack, txack, log, location,
integration) by the fields each of those carries, not by `fCnt`; those are rejected as
`not_uplink`.

Times: v4.6 renamed `rxInfo[].time` to `gwTime` and added `nsTime`; the gateway's time is
used when a gateway gave one (either spelling), then the event's `time`, then `nsTime`.
An absent `fPort` means the frame had no application payload: no FPort is sent on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from iotflow.errors import NOT_UPLINK, Rejection
from iotflow.formats.fields import MAX_BYTE, MAX_FREQUENCY_HZ, Fields, gateway_id, radio
from iotflow.formats.uplink import Gateway, Radio, Uplink, fold

# Fields that only the other event types carry (integration.proto): StatusEvent `margin`,
# `batteryLevel`...; AckEvent and TxAckEvent `queueItemId`, `fCntDown`; LogEvent `level`,
# `code`; LocationEvent `location`; IntegrationEvent `integrationName`, `eventType`.
_OTHER_EVENT_FIELDS = (
    "margin",
    "batteryLevel",
    "batteryLevelUnavailable",
    "externalPowerSource",
    "queueItemId",
    "downlinkId",
    "acknowledged",
    "fCntDown",
    "level",
    "code",
    "location",
    "integrationName",
    "eventType",
)
# Fields of an UplinkEvent that a JoinEvent (`devAddr` and the device only) never has.
_UP_FIELDS = ("fCnt", "fPort", "data", "object", "rxInfo", "txInfo", "dr", "adr", "confirmed")


def decode(document: dict[str, Any]) -> Uplink:
    root = Fields(document)
    if not root.has("deviceInfo") and root.has("devEui") and not root.has("rxInfo"):
        # A downlink command (`.../command/down`, iotflow's own among them) seen on a
        # subscription to `application/#`: it names the device at the top level.
        raise Rejection(NOT_UPLINK, "a ChirpStack downlink command, not an event")
    info = root.obj("deviceInfo", " (not a ChirpStack event)")
    # Every event names a valid device: one that does not is garbage, not another event.
    dev_eui = info.dev_eui("devEui")
    other = next((key for key in _OTHER_EVENT_FIELDS if root.has(key)), None)
    if other is not None or not any(root.has(key) for key in _UP_FIELDS):
        why = f"has {other!r}" if other is not None else "has no uplink field"
        raise Rejection(NOT_UPLINK, f"a ChirpStack event that is not an up event ({why})")
    rx_info = root.objects("rxInfo")
    time = _time(root, rx_info)
    decoded = root.opt_obj("object")
    source = {
        "applicationId": info.opt_str("applicationId"),
        "devEui": info.opt_str("devEui"),
        "tenantId": info.opt_str("tenantId"),
    }
    return Uplink(
        format="chirpstack",
        dev_eui=dev_eui,
        time=time,
        f_port=root.opt_int("fPort", high=MAX_BYTE),
        f_cnt=root.opt_int("fCnt") or 0,  # left out when 0
        payload=root.opt_base64("data") or b"",
        decoded=decoded.data if decoded is not None else None,
        radio=_radio(root, rx_info),
        device_name=info.opt_str("deviceName"),
        source={k: v for k, v in source.items() if v is not None},
        document=document,
        tags=_tags(info),
        application=fold(app) if (app := info.opt_str("applicationId")) else None,
        application_name=fold(name) if (name := info.opt_str("applicationName")) else None,
    )


def _tags(info: Fields) -> frozenset[str]:
    # `{"key": "value"}`: matched as `key=value` and as the bare `key`; non-strings ignored.
    raw = info.data.get("tags")
    if not isinstance(raw, dict):
        return frozenset()
    tags: set[str] = set()
    for key, value in raw.items():
        if not isinstance(key, str) or not key.strip():
            continue
        tags.add(fold(key))
        if isinstance(value, str):
            tags.add(fold(f"{key}={value}"))
    return frozenset(tags)


def _time(root: Fields, rx_info: list[Fields]) -> datetime:
    for rx in rx_info:
        gateway_time = rx.first_time("gwTime", "time")
        if gateway_time is not None:
            return gateway_time
    found = root.opt_time("time")
    if found is None:
        found = next((t for t in (rx.opt_time("nsTime") for rx in rx_info) if t), None)
    if found is None:
        raise root.missing("time", " (and no rxInfo[].gwTime, time or nsTime)")
    return found


def _radio(root: Fields, rx_info: list[Fields]) -> Radio:
    tx_info = root.opt_obj("txInfo")
    frequency_hz = spreading_factor = None
    modulation = tx_info.opt_obj("modulation") if tx_info is not None else None
    if tx_info is not None:
        frequency_hz = tx_info.opt_int("frequency", high=MAX_FREQUENCY_HZ)
    lora = modulation.opt_obj("lora") if modulation is not None else None
    if lora is not None:  # FSK and LR-FHSS have no spreading factor
        spreading_factor = lora.opt_int("spreadingFactor", high=MAX_BYTE)
    # A gateway entry without `snr` had an SNR of 0 dB (a default left out) for LoRa and
    # LR-FHSS; FSK reports none, and without modulation info it is unknown.
    chirp = modulation is not None and (lora is not None or modulation.has("lrFhss"))
    gateways = []
    for rx in rx_info:
        gw_id = rx.opt_str("gatewayId")
        if not gw_id:  # an entry without an id says nothing usable
            continue
        location = rx.opt_obj("location")
        snr = rx.opt_float("snr")
        gateways.append(
            Gateway(
                id=gateway_id(gw_id),
                rssi=rx.opt_float("rssi"),
                snr=snr if snr is not None or not chirp else 0.0,
                latitude=location.opt_float("latitude") if location is not None else None,
                longitude=location.opt_float("longitude") if location is not None else None,
            )
        )
    dev_addr = root.opt_str("devAddr")
    return radio(
        gateways,
        frequency_hz=frequency_hz,
        spreading_factor=spreading_factor,
        dev_addr=dev_addr,
    )
