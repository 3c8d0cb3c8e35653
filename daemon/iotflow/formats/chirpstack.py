"""ChirpStack v4 `up` events (JSON marshaler).

ChirpStack writes the event's own fields even when they are zero, so `fCnt` is always
there: its absence means another event (join, status, ack, log) published on a topic the
subscription matched. The gateway entries (`rxInfo[]`) come from another protobuf package
that leaves zero values out, so an entry without `snr` had an SNR of 0 dB.
"""

from __future__ import annotations

from typing import Any

from iotflow.formats.fields import MAX_BYTE, MAX_FREQUENCY_HZ, Fields, gateway_id, radio
from iotflow.formats.uplink import Gateway, Radio, Uplink


def decode(document: dict[str, Any]) -> Uplink:
    root = Fields(document)
    info = root.obj("deviceInfo", " (not a ChirpStack event)")
    if not root.has("fCnt"):
        raise root.missing("fCnt", " (not an up event)")
    dev_eui = info.dev_eui("devEui")
    rx_info = root.objects("rxInfo")
    # The gateway's reception time when a gateway gave one, else ChirpStack's.
    time = next((t for t in (rx.opt_time("time") for rx in rx_info) if t is not None), None)
    if time is None:
        time = root.opt_time("time")
    if time is None:
        raise root.missing("time", " (and no rxInfo[].time)")
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
        f_cnt=root.opt_int("fCnt"),
        payload=root.opt_base64("data") or b"",
        decoded=decoded.data if decoded is not None else None,
        radio=_radio(root, rx_info),
        device_name=info.opt_str("deviceName"),
        source={k: v for k, v in source.items() if v is not None},
        document=document,
    )


def _radio(root: Fields, rx_info: list[Fields]) -> Radio:
    gateways = []
    for rx in rx_info:
        gw_id = rx.opt_str("gatewayId")
        if gw_id is None:  # an entry without an id says nothing usable
            continue
        location = rx.opt_obj("location")
        snr = rx.opt_float("snr")
        gateways.append(
            Gateway(
                id=gateway_id(gw_id),
                rssi=rx.opt_float("rssi"),
                snr=snr if snr is not None else 0.0,
                latitude=location.opt_float("latitude") if location is not None else None,
                longitude=location.opt_float("longitude") if location is not None else None,
            )
        )
    tx_info = root.opt_obj("txInfo")
    frequency_hz = spreading_factor = None
    if tx_info is not None:
        frequency_hz = tx_info.opt_int("frequency", high=MAX_FREQUENCY_HZ)
        modulation = tx_info.opt_obj("modulation")
        lora = modulation.opt_obj("lora") if modulation is not None else None
        if lora is not None:  # FSK and LR-FHSS have no spreading factor
            spreading_factor = lora.opt_int("spreadingFactor", high=MAX_BYTE)
    dev_addr = root.opt_str("devAddr")
    return radio(
        gateways,
        frequency_hz=frequency_hz,
        spreading_factor=spreading_factor,
        dev_addr=dev_addr,
    )
