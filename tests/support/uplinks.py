"""Uplinks of each network server's format, made from the suite's fixtures with fresh values."""

from __future__ import annotations

import base64
import copy
from datetime import UTC, datetime
from typing import Any

import orjson

from fixtures_path import FIXTURES


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURES / name).read_bytes())
    return data


_ACTILITY = _fixture("actility_uplink.json")
_CHIRPSTACK = _fixture("chirpstack_up.json")
_TTS = _fixture("tts_up.json")


def _now(at: datetime | None) -> str:
    return (at or datetime.now(UTC)).isoformat(timespec="milliseconds")


def actility(dev_eui: str, fcnt: int, *, at: datetime | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(_ACTILITY)
    inner = doc["DevEUI_uplink"]
    inner.update(DevEUI=dev_eui, FCntUp=fcnt, Time=_now(at))
    return doc


def chirpstack(dev_eui: str, fcnt: int, *, at: datetime | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(_CHIRPSTACK)
    doc["deviceInfo"]["devEui"] = dev_eui.lower()
    doc["fCnt"] = fcnt
    doc["time"] = doc["rxInfo"][0]["time"] = _now(at)
    return doc


def tts(dev_eui: str, fcnt: int, *, at: datetime | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(_TTS)
    doc["end_device_ids"]["dev_eui"] = dev_eui
    doc["end_device_ids"]["device_id"] = f"eui-{dev_eui.lower()}"
    doc["uplink_message"]["f_cnt"] = fcnt
    doc["uplink_message"]["rx_metadata"][0]["time"] = _now(at)
    doc["received_at"] = _now(at)
    return doc


TOPICS = {
    "actility": "tpx/things/{dev}/uplink",
    "chirpstack": "application/17c82e96-be03-4f38-aef3-f83d48582d97/device/{dev}/event/up",
    "tts": "v3/demo-app@ttn/devices/eui-{dev}/up",
}

MAKERS = {"actility": actility, "chirpstack": chirpstack, "tts": tts}


def uplink(fmt: str, dev_eui: str, fcnt: int, **kw: Any) -> tuple[str, bytes]:
    """(topic, payload) of an uplink of format `fmt`."""
    topic = TOPICS[fmt].format(dev=dev_eui.lower())
    return topic, orjson.dumps(MAKERS[fmt](dev_eui, fcnt, **kw))


def payload_hex(fmt: str) -> str:
    """The payload of the fixture of `fmt`, as the Actility document carries it."""
    if fmt == "actility":
        return str(_ACTILITY["DevEUI_uplink"]["payload_hex"])
    raw = _CHIRPSTACK["data"] if fmt == "chirpstack" else _TTS["uplink_message"]["frm_payload"]
    return base64.b64decode(raw).hex()
