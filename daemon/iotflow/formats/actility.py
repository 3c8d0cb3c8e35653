"""ThingPark `{"DevEUI_uplink": {...}}` uplinks.

Older ThingPark releases write every number as a string (`"FPort": "1"`,
`"LrrRSSI": "-80.000000"`): both spellings are read. `FPort` and `FCntUp` may be absent
(a frame without application payload has no port). The document itself is what the
sinks send, unchanged; decoding it only extracts what routing, expiry and downlinks need.
The other messages ThingPark sends an application server (`DevEUI_notification`,
`DevEUI_location`, `DevEUI_downlink_Sent`, ...: one `DevEUI_*` root each) are rejected as
`not_uplink`. `CustomerData` was a JSON string in some releases; it is then not read.
"""

from __future__ import annotations

from typing import Any

from iotflow.errors import NOT_UPLINK, Rejection
from iotflow.formats.fields import MAX_BYTE, Fields
from iotflow.formats.uplink import Gateway, Radio, Uplink, fold

ROOT = "DevEUI_uplink"
_MESSAGE_PREFIX = "DevEUI_"  # DevEUI_notification, DevEUI_location, DevEUI_downlink_Sent...


def decode(document: dict[str, Any]) -> Uplink:
    root = Fields(document)
    if not root.has(ROOT):
        other = next((key for key in document if key.startswith(_MESSAGE_PREFIX)), None)
        if other is not None:
            raise Rejection(NOT_UPLINK, f"a ThingPark {other} message, not an uplink")
    up = root.obj(ROOT, " (not a ThingPark uplink)")
    dev_eui = up.dev_eui("DevEUI")
    time = up.opt_time("Time")
    if time is None:
        raise up.missing("Time", " (or unset)")
    decoded = up.opt_obj("payload")
    customer = None if isinstance(up.data.get("CustomerData"), str) else up.opt_obj("CustomerData")
    return Uplink(
        format="actility",
        dev_eui=dev_eui,
        time=time,
        f_port=up.opt_int("FPort", high=MAX_BYTE),
        f_cnt=up.opt_int("FCntUp"),
        payload=up.opt_hex("payload_hex") or b"",
        decoded=decoded.data if decoded is not None else None,
        radio=_radio(up),
        device_name=customer.opt_str("name") if customer is not None else None,
        source={},
        document=document,
        tags=_tags(customer),
    )


def _tags(customer: Fields | None) -> frozenset[str]:
    # A list of strings; anything else in it is ignored rather than rejecting the uplink.
    raw = customer.data.get("tags") if customer is not None else None
    if not isinstance(raw, list):
        return frozenset()
    return frozenset([fold(t) for t in raw if isinstance(t, str) and t.strip()])


def _radio(up: Fields) -> Radio:
    rssi = up.opt_float("LrrRSSI")
    snr = up.opt_float("LrrSNR")
    lrrs = up.opt_obj("Lrrs")
    # ThingPark names the best Lrr and gives its position at the top level only: that
    # gateway goes first, with its position, as in the other formats.
    best_id = up.opt_str("Lrrid")
    listed: tuple[float | None, float | None] | None = None  # the best one's, in `Lrrs`
    gateways = []
    for lrr in lrrs.objects("Lrr") if lrrs is not None else ():
        lrr_id = lrr.opt_str("Lrrid")
        if lrr_id is None:
            continue  # an entry without an id says nothing usable
        lrr_rssi, lrr_snr = lrr.opt_float("LrrRSSI"), lrr.opt_float("LrrSNR")
        if lrr_id != best_id:
            gateways.append(Gateway(id=lrr_id, rssi=lrr_rssi, snr=lrr_snr))
        elif listed is None:
            listed = (lrr_rssi, lrr_snr)
    if best_id is not None:
        best = Gateway(
            id=best_id,
            rssi=listed[0] if listed is not None and listed[0] is not None else rssi,
            snr=listed[1] if listed is not None and listed[1] is not None else snr,
            latitude=up.opt_float("LrrLAT"),
            longitude=up.opt_float("LrrLON"),
        )
        gateways.insert(0, best)
    dev_addr = up.opt_str("DevAddr")
    return Radio(
        rssi=rssi,
        snr=snr,
        spreading_factor=up.opt_int("SpFact", high=MAX_BYTE),
        frequency_mhz=up.opt_float("Frequency"),
        dev_addr=dev_addr.upper() if dev_addr is not None else None,
        gateways=tuple(gateways),
    )
