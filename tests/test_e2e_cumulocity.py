"""End to end: `iotflow run` as a process, a real Mosquitto, Cumulocity as a local tenant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest
import pytest_asyncio

from support.cumulocity import FakeCumulocity
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}


@pytest_asyncio.fixture
async def c8y(request: pytest.FixtureRequest) -> AsyncIterator[FakeCumulocity]:
    async with FakeCumulocity() as fake:
        yield fake
        # Shown only when the test fails.
        request.node.add_report_section("teardown", "cumulocity requests", fake.describe())


def cumulocity_connection(
    cid: str, c8y: FakeCumulocity, devices: list[str], **config: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "name": f"test {cid}",
        "connectorId": "actility-cumulocity-iot",
        "devices": devices,
        "configuration": {
            # A scheme and a port in hostName: how a local double is reached (DESIGN).
            "hostName": c8y.base_url,
            "tenantId": c8y.tenant,
            "username": c8y.username,
            "password": c8y.password,
            **config,
        },
    }


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def connection_state(daemon: DaemonProcess, cid: str) -> str:
    url = f"{daemon.api}/iot-flow/v1/connections/{cid}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=AUTH) as response:
        assert response.status == 200
        document = await response.json()
    state = document["state"]
    assert isinstance(state, str)
    return state


async def test_uplinks_become_a_device_events_and_measurements(
    tmp_path: Path, mosquitto: Mosquitto, c8y: FakeCumulocity
) -> None:
    devices = {"actility": "0018B20000000E01", "chirpstack": "A840414FC182F6E2"}
    # The directory names the MQTT client id: one of its own, for a session of its own.
    daemon = DaemonProcess(
        tmp_path / "c8y-uplinks",
        broker_url=mosquitto.url,
        connections=[cumulocity_connection("c8y", c8y, list(devices.values()))],
    )
    try:
        await daemon.start()
        await publish(
            mosquitto,
            [uplink(fmt, dev, n) for n in (1, 2) for fmt, dev in devices.items()],
        )
        await c8y.wait_until(lambda: len(c8y.measurements) == 4, what="4 measurements")
        for dev in devices.values():
            device = c8y.device_of(dev)
            assert device is not None, dev
            assert device["c8y_IsDevice"] == {}
            events = [e for e in c8y.events if e["source"]["id"] == device["id"]]
            assert [e["c8y_LoRaUplink"]["fCnt"] for e in events] == [1, 2]
            measurements = [m for m in c8y.measurements if m["source"]["id"] == device["id"]]
            assert all(m["c8y_SignalStrength"]["rssi"]["unit"] == "dBm" for m in measurements)
        # Each device was looked up and created once; the second uplink used the cache.
        assert c8y.count("GET", "/identity/externalIds/") == 2
        assert c8y.count("POST", "/inventory/managedObjects") == 2
        assert await connection_state(daemon, "c8y") == "OPENED"
        assert (
            await daemon.metric("iotflow_deliveries_total", connection="c8y", outcome="delivered")
            == 4
        )
        assert c8y.password not in "\n".join(daemon.output)
        assert await daemon.stop() == 0
    finally:
        await daemon.close()


async def test_wrong_password_sets_authentication_failed(
    tmp_path: Path, mosquitto: Mosquitto, c8y: FakeCumulocity
) -> None:
    dev = "0018B20000000E03"
    daemon = DaemonProcess(
        tmp_path / "c8y-refused",
        broker_url=mosquitto.url,
        connections=[cumulocity_connection("refused", c8y, [dev], password="not-the-password")],
    )
    try:
        await daemon.start()
        await publish(mosquitto, [uplink("actility", dev, 1)])
        await daemon.wait_log(
            lambda e: (
                e.get("event") == "Connection state changed"
                and e.get("connection") == "refused"
                and e.get("state") == "AUTHENTICATION_FAILED"
            )
        )
        assert await connection_state(daemon, "refused") == "AUTHENTICATION_FAILED"
        assert c8y.count("GET", "/identity/", status=401) >= 1
        assert not c8y.managed_objects
        assert "not-the-password" not in "\n".join(daemon.output)
        assert await daemon.stop() == 0
    finally:
        await daemon.close()


async def test_an_operation_becomes_a_downlink_on_the_network_server(
    tmp_path: Path, mosquitto: Mosquitto, c8y: FakeCumulocity
) -> None:
    dev = "A840414FC182F6E3"
    topic, payload = uplink("chirpstack", dev, 1)
    application_id = orjson.loads(payload)["deviceInfo"]["applicationId"]
    command_topic = f"application/{application_id}/device/{dev.lower()}/command/down"
    daemon = DaemonProcess(
        tmp_path / "c8y-downlink",
        broker_url=mosquitto.url,
        connections=[cumulocity_connection("c8y-dl", c8y, [dev], downlinkEnabled=True)],
    )
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as network_server:
            await network_server.subscribe(command_topic, qos=1)
            await daemon.start()
            # The uplink registers the device in Cumulocity and tells the daemon which
            # network server the device belongs to.
            await publish(mosquitto, [(topic, payload)])
            await c8y.wait_until(lambda: len(c8y.measurements) == 1, what="the uplink")
            device = c8y.device_of(dev)
            assert device is not None
            operation = c8y.add_operation(
                str(device["id"]), "Open valve", c8y_LoRaDownlink={"fPort": 7, "payloadHex": "0a0b"}
            )
            async with asyncio.timeout(60):  # the connection polls every 10 s
                message = await anext(aiter(network_server.messages))
        assert message.topic.value == command_topic
        assert isinstance(message.payload, bytes)
        command = orjson.loads(message.payload)
        assert (command["fPort"], command["data"]) == (7, "Cgs=")  # 0a 0b
        await c8y.wait_until(
            lambda: c8y.operation_history[operation][-1] == "SUCCESSFUL", what="SUCCESSFUL"
        )
        assert c8y.operation_history[operation] == ["PENDING", "EXECUTING", "SUCCESSFUL"]
        assert await daemon.stop() == 0
    finally:
        await daemon.close()
