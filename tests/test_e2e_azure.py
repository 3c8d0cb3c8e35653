"""End to end: `iotflow run` as a process routing uplinks from the suite's Mosquitto to the
local Azure IoT Hub (support/azure.py: registry over HTTP, device MQTT over TLS), and a
cloud-to-device message back to the device's network server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest

from support.azure import POLICY, FakeIotHub
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.tls import make_pki
from support.uplinks import uplink

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture
async def hub() -> AsyncIterator[FakeIotHub]:
    made = FakeIotHub(make_pki())
    await made.start()
    yield made
    await made.stop()


def azure_connection(
    cid: str, hub: FakeIotHub, devices: list[str], **config: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "name": f"test {cid}",
        "connectorId": "actility-azure-iot",
        "devices": devices,
        "configuration": {
            "hostName": hub.hub,
            "sharedAccessKeyName": POLICY,
            "sharedAccessKey": hub.policy_key,
            "mqttEndpoint": hub.mqtt_endpoint,
            "registryURL": hub.registry_url,
            "trustedCaCertficate": hub.pki.ca,
            **config,
        },
    }


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def connection(daemon: DaemonProcess, cid: str) -> dict[str, Any]:
    url = f"{daemon.api}/iot-flow/v1/connections/{cid}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=AUTH) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
    return document


async def test_uplinks_reach_the_hub_as_their_devices(
    tmp_path: Path, mosquitto: Mosquitto, hub: FakeIotHub, daemons: list[DaemonProcess]
) -> None:
    devices = {"actility": "0018B20000003A01", "tts": "70B3D57ED0053A02"}
    daemon = DaemonProcess(
        tmp_path / "azure",
        broker_url=mosquitto.url,
        connections=[azure_connection("hub", hub, list(devices.values()), downlinkEnabled=False)],
    )
    daemons.append(daemon)
    await daemon.start()
    await publish(mosquitto, [uplink(fmt, dev, 4) for fmt, dev in devices.items()])
    received = await hub.wait_received(2, timeout=60)
    by_device = {orjson.loads(body)["DevEUI_uplink"]["DevEUI"]: topic for topic, body in received}
    assert set(by_device) == set(devices.values())
    for dev, topic in by_device.items():
        assert topic.startswith(f"devices/{dev}/messages/events/")
    assert set(hub.devices) == set(devices.values())  # identities created by the connection
    deadline = time.monotonic() + 30
    while (document := await connection(daemon, "hub"))["statistics"]["delivered"] < 2:
        assert time.monotonic() < deadline, daemon.tail()
        await asyncio.sleep(0.1)  # a bounded poll of another process's API
    assert document["state"] == "OPENED"
    assert document["configuration"]["sharedAccessKey"] == "*****"
    assert hub.policy_key not in "\n".join(daemon.output)
    assert await daemon.stop() == 0


async def test_a_cloud_to_device_message_reaches_the_network_server(
    tmp_path: Path, mosquitto: Mosquitto, hub: FakeIotHub, daemons: list[DaemonProcess]
) -> None:
    dev = "0018B20000003D01"
    daemon = DaemonProcess(
        tmp_path / "azure-c2d",
        broker_url=mosquitto.url,
        connections=[azure_connection("hub", hub, [dev], downlinkPort=10)],
    )
    daemons.append(daemon)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as network_server:
        await network_server.subscribe(f"tpx/things/{dev}/downlink", qos=1)
        await daemon.start()
        # The first uplink makes the device's identity and session (and its subscription).
        await publish(mosquitto, [uplink("actility", dev, 1)])
        await hub.wait_received(1, timeout=60)
        await daemon.wait_log(lambda e: e.get("event") == "Downlinks subscribed", timeout=30)
        await hub.send_c2d(dev, {"DevEUI_downlink": {"payload_hex": "0a0b0c"}})
        async with asyncio.timeout(30):
            message = await anext(aiter(network_server.messages))
    assert isinstance(message.payload, bytes)
    command = orjson.loads(message.payload)["DevEUI_downlink"]
    assert (int(command["FPort"]), command["payload_hex"]) == (10, "0a0b0c")
