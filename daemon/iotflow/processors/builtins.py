"""The product's built-in processors (`{"type": "callProcessor", "id": ...}`)."""

from __future__ import annotations

from typing import Any

# What MESSAGE_SIMPLIFIER keeps of `DevEUI_uplink`, in this order: the device, the time,
# the frame, the payload raw and decoded, the battery (in the product's since its 1.7.16,
# TXIF-2600), and the radio of the best gateway (ThingPark's top-level Lrr* fields are
# those of the gateway that received the frame best).
SIMPLIFIED = (
    "DevEUI",
    "Time",
    "FPort",
    "FCntUp",
    "payload_hex",
    "payload",
    "BatteryLevel",
    "BatteryTime",
    "Lrrid",
    "LrrRSSI",
    "LrrSNR",
    "SpFact",
    "LrrLAT",
    "LrrLON",
)


def flatten(document: Any) -> dict[str, Any]:
    """MESSAGE_FLATTENER: nested objects become one level, their keys joined with `.`.

    `{"DevEUI_uplink": {"DevEUI": "..", "Lrrs": {"Lrr": [..]}}}` gives
    `{"DevEUI_uplink.DevEUI": "..", "DevEUI_uplink.Lrrs.Lrr": [..]}`: arrays are values
    (kept whole), and an empty object stays as a value so that no key disappears.
    """
    if not isinstance(document, dict):
        raise TypeError("the document is not a JSON object")
    flat: dict[str, Any] = {}
    _flatten_into(flat, "", document)
    return flat


def _flatten_into(flat: dict[str, Any], prefix: str, value: dict[str, Any]) -> None:
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            _flatten_into(flat, name, item)
        else:
            flat[name] = item


def simplify(document: Any) -> dict[str, Any]:
    """MESSAGE_SIMPLIFIER: only the fields of `SIMPLIFIED`, still under `DevEUI_uplink`
    (so that later operations and the sinks' `{DevEUI}` templates still find them)."""
    uplink = document.get("DevEUI_uplink") if isinstance(document, dict) else None
    if not isinstance(uplink, dict):
        raise TypeError("the document has no DevEUI_uplink object")
    return {"DevEUI_uplink": {key: uplink[key] for key in SIMPLIFIED if key in uplink}}
