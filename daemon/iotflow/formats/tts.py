"""The Things Stack v3 uplink messages (`.../up`).

TTS leaves zero values out of its JSON, so a missing `f_cnt` is frame counter 0; a
missing `f_port` stays unknown (a frame without application payload has no port). A
message without `uplink_message` (join accept, downlink event) is not an uplink.
Times have nanosecond precision; they are truncated to microseconds.
"""

from __future__ import annotations

from typing import Any

from iotflow.formats.fields import MAX_BYTE, MAX_FREQUENCY_HZ, Fields, gateway_id, radio
from iotflow.formats.uplink import Gateway, Radio, Uplink

# TTS Cloud names the tenant in `network_ids`; The Things Network (community) often does not.
DEFAULT_TENANT = "ttn"


def decode(document: dict[str, Any]) -> Uplink:
    root = Fields(document)
    ids = root.obj("end_device_ids", " (not a The Things Stack message)")
    up = root.obj("uplink_message", " (not an uplink message)")
    dev_eui = ids.dev_eui("dev_eui")
    rx_metadata = up.objects("rx_metadata")
    # The gateway's reception time when a gateway gave one, else the network's.
    time = next((t for t in (rx.opt_time("time") for rx in rx_metadata) if t is not None), None)
    if time is None:
        time = up.opt_time("received_at") or root.opt_time("received_at")
    if time is None:
        raise root.missing("received_at", " (and no rx_metadata[].time)")
    decoded = up.opt_obj("decoded_payload")
    device_id = ids.opt_str("device_id")
    application = ids.opt_obj("application_ids")
    network = up.opt_obj("network_ids")
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
    )


def _radio(ids: Fields, up: Fields, rx_metadata: list[Fields]) -> Radio:
    gateways = []
    for rx in rx_metadata:
        gw_ids = rx.opt_obj("gateway_ids")
        if gw_ids is None:
            continue
        gw_id = gw_ids.opt_str("eui") or gw_ids.opt_str("gateway_id")
        if not gw_id:  # an entry without an id says nothing usable
            continue
        location = rx.opt_obj("location")
        rssi = rx.opt_float("rssi")
        gateways.append(
            Gateway(
                id=gateway_id(gw_id),
                rssi=rssi if rssi is not None else rx.opt_float("channel_rssi"),
                snr=rx.opt_float("snr"),
                latitude=location.opt_float("latitude") if location is not None else None,
                longitude=location.opt_float("longitude") if location is not None else None,
            )
        )
    settings = up.opt_obj("settings")
    frequency_hz = spreading_factor = None
    if settings is not None:
        frequency_hz = settings.opt_int("frequency", high=MAX_FREQUENCY_HZ)
        data_rate = settings.opt_obj("data_rate")
        lora = data_rate.opt_obj("lora") if data_rate is not None else None
        if lora is not None:  # FSK and LR-FHSS have no spreading factor
            spreading_factor = lora.opt_int("spreading_factor", high=MAX_BYTE)
    dev_addr = ids.opt_str("dev_addr")
    return radio(
        gateways,
        frequency_hz=frequency_hz,
        spreading_factor=spreading_factor,
        dev_addr=dev_addr,
    )
