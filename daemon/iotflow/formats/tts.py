"""The Things Stack v3 uplink messages (`.../up`).

TTS leaves zero values out of its JSON, so a missing `f_cnt` is frame counter 0; a
missing `f_port` stays unknown (a frame without application payload has no port). A
message of another type (`join_accept`, `downlink_queued`, ...) is rejected as
`not_uplink`. Times have nanosecond precision; they are truncated to microseconds. An
unset time is written `0001-01-01T00:00:00Z` and reads as absent.

A gateway of another network reached through Packet Broker appears as the gateway
`packetbroker` with a `packet_broker` object naming the real one
(`forwarder_gateway_eui`, else `forwarder_gateway_id`): that one is the gateway used.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from iotflow.errors import NOT_UPLINK, Rejection
from iotflow.formats.fields import MAX_BYTE, MAX_FREQUENCY_HZ, Fields, gateway_id, radio
from iotflow.formats.uplink import Gateway, Radio, Uplink, fold

# TTS Cloud names the tenant in `network_ids`; The Things Network (community) often does not.
DEFAULT_TENANT = "ttn"
# The other members of ApplicationUp's `up` oneof (messages.proto).
_OTHER_MESSAGES = (
    "join_accept",
    "downlink_ack",
    "downlink_nack",
    "downlink_sent",
    "downlink_failed",
    "downlink_queued",
    "downlink_queue_invalidated",
    "location_solved",
    "service_data",
    "uplink_normalized",  # sent beside the uplink_message of the same frame
)


def decode(document: dict[str, Any]) -> Uplink:
    root = Fields(document)
    if root.has("downlinks") and not root.has("uplink_message"):
        # A downlink push/replace (iotflow's own among them) seen on a `#` subscription.
        raise Rejection(NOT_UPLINK, "a The Things Stack downlink, not an uplink")
    ids = root.obj("end_device_ids", " (not a The Things Stack message)")
    if not root.has("uplink_message"):
        other = next((key for key in _OTHER_MESSAGES if root.has(key)), None)
        if other is not None:
            raise Rejection(NOT_UPLINK, f"a The Things Stack {other} message, not an uplink")
    up = root.obj("uplink_message", " (not an uplink message)")
    dev_eui = ids.dev_eui("dev_eui")
    rx_metadata = up.objects("rx_metadata")
    time = _time(root, up, rx_metadata)
    decoded = up.opt_obj("decoded_payload")
    device_id = ids.opt_str("device_id")
    application = ids.opt_obj("application_ids")
    network = up.opt_obj("network_ids")
    app_id = application.opt_str("application_id") if application is not None else None
    source = {
        "application_id": application.opt_str("application_id")
        if application is not None
        else None,
        "device_id": device_id,
        "tenant_id": (network.opt_str("tenant_id") if network is not None else None)
        or DEFAULT_TENANT,
        "dev_eui": ids.opt_str("dev_eui"),
    }
    return Uplink(
        format="tts",
        dev_eui=dev_eui,
        time=time,
        f_port=up.opt_int("f_port", high=MAX_BYTE),
        f_cnt=up.opt_int("f_cnt") or 0,
        payload=up.opt_base64("frm_payload") or b"",
        decoded=decoded.data if decoded is not None else None,
        radio=_radio(ids, up, rx_metadata),
        device_name=device_id,
        source={k: v for k, v in source.items() if v is not None},
        document=document,
        tags=frozenset({fold(f"application:{app_id}")}) if app_id else frozenset(),
        application=fold(app_id) if app_id else None,
    )


def _time(root: Fields, up: Fields, rx_metadata: list[Fields]) -> datetime:
    # The gateway's reception time when a gateway gave one, else the network's. Gateways
    # of other networks (Packet Broker) come last: their clocks are nobody's to check, and
    # real ones run seconds off.
    own = [rx for rx in rx_metadata if not rx.has("packet_broker")]
    others = [rx for rx in rx_metadata if rx.has("packet_broker")]
    found = next((t for t in (rx.opt_time("time") for rx in own + others) if t), None)
    if found is None:
        found = up.opt_time("received_at") or root.opt_time("received_at")
    if found is None:
        raise root.missing("received_at", " (and no rx_metadata[].time)")
    return found


def _gateway_id(rx: Fields) -> str | None:
    broker = rx.opt_obj("packet_broker")
    if broker is not None:
        forwarder = broker.opt_str("forwarder_gateway_eui") or broker.opt_str(
            "forwarder_gateway_id"
        )
        if forwarder:
            return forwarder
    gw_ids = rx.opt_obj("gateway_ids")
    if gw_ids is None:
        return None
    return gw_ids.opt_str("eui") or gw_ids.opt_str("gateway_id")


def _radio(ids: Fields, up: Fields, rx_metadata: list[Fields]) -> Radio:
    settings = up.opt_obj("settings")
    frequency_hz = spreading_factor = None
    data_rate = settings.opt_obj("data_rate") if settings is not None else None
    if settings is not None:
        frequency_hz = settings.opt_int("frequency", high=MAX_FREQUENCY_HZ)
    lora = data_rate.opt_obj("lora") if data_rate is not None else None
    if lora is not None:  # FSK and LR-FHSS have no spreading factor
        spreading_factor = lora.opt_int("spreading_factor", high=MAX_BYTE)
    # A gateway without `snr` had an SNR of 0 dB (a zero left out) for LoRa and LR-FHSS;
    # FSK reports none, and without data rate it is unknown.
    chirp = data_rate is not None and (lora is not None or data_rate.has("lrfhss"))
    gateways = []
    for rx in rx_metadata:
        gw_id = _gateway_id(rx)
        if not gw_id:  # an entry without an id says nothing usable
            continue
        location = rx.opt_obj("location")
        rssi = rx.opt_float("rssi")
        snr = rx.opt_float("snr")
        gateways.append(
            Gateway(
                id=gateway_id(gw_id),
                rssi=rssi if rssi is not None else rx.opt_float("channel_rssi"),
                snr=snr if snr is not None or not chirp else 0.0,
                latitude=location.opt_float("latitude") if location is not None else None,
                longitude=location.opt_float("longitude") if location is not None else None,
            )
        )
    dev_addr = ids.opt_str("dev_addr")
    return radio(
        gateways,
        frequency_hz=frequency_hz,
        spreading_factor=spreading_factor,
        dev_addr=dev_addr,
    )
