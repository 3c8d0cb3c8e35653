"""End to end: every collected sample through `iotflow run`, a real Mosquitto and a local cloud.

The uplinks reach the cloud as their expected Actility documents; the other messages a
wildcard subscription carries (join, status, downlink events...) are counted as
`not_uplink` and logged at debug level only, never as a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from fixtures_path import FIXTURES
from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto

pytestmark = pytest.mark.slow

FOLDERS = {"chirpstack": "chirpstack", "tts": "tts", "thingpark": "actility"}
# Topics the test daemon subscribes to (tests/support/daemon.py), one per format.
TOPICS = {
    "chirpstack": "application/17c82e96-be03-4f38-aef3-f83d48582d97/device/{dev}/event/up",
    "tts": "v3/app1@ttn/devices/{dev}/up",
    "actility": "tpx/things/{dev}/uplink",
}


def sample_files(*, uplinks: bool) -> list[tuple[str, Path]]:
    found = []
    for folder, fmt in FOLDERS.items():
        for path in sorted((FIXTURES / folder).glob("*.json")):
            if path.name.endswith(".expected.json"):
                continue
            if path.name.startswith("not-uplink-") != uplinks:
                found.append((fmt, path))
    return found


def expected(fmt: str, path: Path) -> dict[str, Any]:
    source = path if fmt == "actility" else path.with_name(path.stem + ".expected.json")
    document: dict[str, Any] = orjson.loads(source.read_bytes())
    return document


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def test_every_sample_arrives_and_other_messages_are_counted_quietly(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, daemons: list[DaemonProcess]
) -> None:
    uplinks = sample_files(uplinks=True)
    others = sample_files(uplinks=False)
    wanted = [expected(fmt, path) for fmt, path in uplinks]
    devices = sorted({doc["DevEUI_uplink"]["DevEUI"].upper() for doc in wanted})
    connection = {
        "id": "samples",
        "name": "every sample",
        "connectorId": "actility-http-iot",
        "devices": devices,
        # The samples are years old: they must not expire on the way.
        "configuration": {"destinationURL": cloud.url("/samples"), "uplinkTimeValidity": "36500d"},
    }
    # A name of its own: the client id (and its persistent session on the shared broker)
    # comes from it.
    daemon = DaemonProcess(
        tmp_path / "formats-samples", broker_url=mosquitto.url, connections=[connection]
    )
    daemons.append(daemon)
    await daemon.start()

    garbage = (TOPICS["tts"].format(dev="x"), b'{"end_device_ids": {}, "uplink_message": 7}')
    messages = [(TOPICS[fmt].format(dev=path.stem), path.read_bytes()) for fmt, path in others]
    messages.append(garbage)
    messages += [(TOPICS[fmt].format(dev=path.stem), path.read_bytes()) for fmt, path in uplinks]
    await publish(mosquitto, messages)

    received = await cloud.wait_for(len(uplinks), path="/samples")
    bodies = sorted(orjson.dumps(r.json, option=orjson.OPT_SORT_KEYS) for r in received)
    assert bodies == sorted(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS) for doc in wanted)

    quiet = await daemon.wait_log(
        lambda e: e.get("event") == "Message is not an uplink", count=len(others)
    )
    assert all(e["level"] == "debug" and e["topic"] for e in quiet)
    assert await daemon.metric("iotflow_uplinks_rejected_total", reason="not_uplink") == len(others)
    assert await daemon.metric("iotflow_uplinks_rejected_total", reason="wrong_shape") == 1
    # The one malformed message is the only warning: none for the other messages.
    warnings = [e for e in daemon.logs if e.get("level") in {"warning", "error", "critical"}]
    assert [(e["event"], e.get("reason")) for e in warnings] == [("Uplink rejected", "wrong_shape")]
