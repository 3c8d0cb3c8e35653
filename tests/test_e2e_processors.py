"""End to end: `iotflow run` with a provisioned connection whose `upOperations` reshape the
uplink before it reaches a local cloud; the API validating and showing `upOperations`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}
DEV = "0018B20000000B20"

OPERATIONS: list[dict[str, Any]] = [
    # Port 9 is the device's heartbeat: not worth sending.
    {"type": "filter", "expression": "DevEUI_uplink.FPort != `9`"},
    {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
    {
        "type": "jmespath",
        "template": {
            "device": '{{ "DevEUI_uplink.DevEUI" }}',
            "counter": '{{ "DevEUI_uplink.FCntUp" }}',
            "port": '{{ "DevEUI_uplink.FPort" }}',
            "site": '{{ "DevEUI_uplink.CustomerData.tags"[0] }}',
        },
    },
]


@pytest.fixture
async def daemon_factory(
    tmp_path: Path, mosquitto: Mosquitto
) -> AsyncIterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(**kw: Any) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / "d", broker_url=mosquitto.url, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.close()


async def test_a_provisioned_connection_delivers_the_reshaped_body(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    daemon = daemon_factory(
        connections=[
            {
                "id": "shaped",
                "name": "reshaped uplinks",
                "connectorId": "actility-http-iot",
                "devices": [DEV],
                "upOperations": OPERATIONS,
                "configuration": {"destinationURL": cloud.url("/shaped")},
            }
        ]
    )
    await daemon.start()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        for fcnt in (1, 2):
            topic, payload = uplink("actility", DEV, fcnt)
            await client.publish(topic, payload, qos=1)
        heartbeat = payload.replace(b'"FPort":1', b'"FPort":9')
        assert heartbeat != payload
        await client.publish(topic, heartbeat, qos=1)
        topic, payload = uplink("actility", DEV, 4)
        await client.publish(topic, payload, qos=1)
    received = await cloud.wait_for(3)
    bodies = sorted((r.json for r in received), key=lambda body: body["counter"])
    assert bodies == [
        {"device": DEV, "counter": 1, "port": 1, "site": "site=Paris"},
        {"device": DEV, "counter": 2, "port": 1, "site": "site=Paris"},
        {"device": DEV, "counter": 4, "port": 1, "site": "site=Paris"},
    ]
    filtered = await daemon.metric(
        "iotflow_deliveries_total", connection="shaped", outcome="filtered"
    )
    delivered = await daemon.metric(
        "iotflow_deliveries_total", connection="shaped", outcome="delivered"
    )
    assert (filtered, delivered) == (1, 3)
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.get(f"{daemon.api}/iot-flow/v1/connections/shaped") as response,
    ):
        assert response.status == 200
        shown = await response.json()
    assert shown["upOperations"] == OPERATIONS
    assert shown["statistics"]["filtered"] == 1
    assert await daemon.stop() == 0


async def test_the_api_refuses_an_expression_that_does_not_compile(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud
) -> None:
    daemon = daemon_factory()
    await daemon.start()
    body: dict[str, Any] = {
        "id": "api-shaped",
        "name": "through the API",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": cloud.url("/api")},
        "upOperations": [
            {"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"},
            {"type": "jsonata", "expression": '{"t": DevEUI_uplink.payload.temperature'},
        ],
    }
    url = f"{daemon.api}/iot-flow/v1/connections"
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(url, json=body) as response:
            assert response.status == 422
            error = await response.json()
        assert [d["path"] for d in error["details"]] == ["upOperations.1.expression"]
        async with session.get(f"{url}/api-shaped") as response:
            assert response.status == 404  # nothing was stored
        body["upOperations"][1]["expression"] = '{"t": DevEUI_uplink.payload.temperature}'
        async with session.post(url, json=body) as response:
            assert response.status == 201, await response.text()
        async with session.get(f"{url}/api-shaped") as response:
            shown = await response.json()
        assert shown["upOperations"] == body["upOperations"]
        async with session.get(f"{daemon.api}/iot-flow/v1/openapi.json") as response:
            openapi = await response.json()
    schemas = openapi["components"]["schemas"]
    text = str(schemas)
    assert "upOperations" in text
    assert "MESSAGE_FLATTENER" in text
    assert "jsonata" in text
    assert await daemon.stop() == 0
