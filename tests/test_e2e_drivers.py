"""Drivers in the running daemon: the API, and uplinks flowing while a codec loops."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
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

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}
CODECS = Path(__file__).parent / "drivers"
DEV = "0018B20000003001"


@pytest.fixture
async def running(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> AsyncIterator[tuple[DaemonProcess, aiohttp.ClientSession]]:
    daemon = DaemonProcess(
        tmp_path / "drivers",
        broker_url=mosquitto.url,
        connections=[
            {
                "id": "c1",
                "name": "c1",
                "connectorId": "actility-http-iot",
                "devices": [DEV],
                "configuration": {"destinationURL": cloud.url("/c1")},
            }
        ],
        extra=f'[drivers]\npath = "{CODECS}"\ntimeout = "300ms"\nmemory_limit = "16MiB"\n',
    )
    await daemon.start()
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield daemon, session
    await daemon.close()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json()


async def _decode(
    session: aiohttp.ClientSession, url: str, driver: str, body: dict[str, Any]
) -> tuple[int, Any]:
    async with session.post(f"{url}{BASE}/drivers/{driver}/decode", json=body) as r:
        return r.status, await r.json()


async def test_drivers_api(running: tuple[DaemonProcess, aiohttp.ClientSession]) -> None:
    daemon, session = running
    status, listed = await _get(session, f"{daemon.api}{BASE}/drivers")
    assert status == 200
    by_id = {d["id"]: d for d in listed}
    assert by_id["test:good:1"] == {
        "id": "test:good:1",
        "producer": "test",
        "module": "good",
        "version": "1",
        "status": "ready",
        "error": None,
        "encodeDownlink": True,
    }
    assert by_id["test:broken:1"]["status"] == "failed"
    assert by_id["test:broken:1"]["error"] == "SyntaxError: Unexpected end of input"
    status, one = await _get(session, f"{daemon.api}{BASE}/drivers/test:good:1")
    assert (status, one) == (200, by_id["test:good:1"])
    status, missing = await _get(session, f"{daemon.api}{BASE}/drivers/no:such:1")
    assert status == 404
    assert missing["code"] == "not_found"

    status, decoded = await _decode(
        session, daemon.api, "test:good:1", {"payload_hex": "0a32", "fPort": 5}
    )
    assert status == 200
    assert decoded["payload"]["temperature"] == 10
    assert decoded["payload"]["port"] == 5
    status, failed = await _decode(session, daemon.api, "test:throws:1", {"payload_hex": "00"})
    assert status == 200
    assert failed == {
        "payloadDecodedError": {"code": "exception", "message": "Error: cannot read byte 1"}
    }
    status, bad = await _decode(session, daemon.api, "test:good:1", {"payload_hex": "xyz"})
    assert status == 422
    assert bad["code"] == "validation_failed"
    assert [d["path"] for d in bad["details"]] == ["payload_hex"]
    assert "xyz" not in str(bad)  # the offending value is not echoed, as on every route
    # The same words as every other route's body (`problems_of`): a misspelt key is named.
    status, bad = await _decode(session, daemon.api, "test:good:1", {"payload_hex": "", "fport": 1})
    assert (status, bad["details"]) == (422, [{"path": "fport", "message": "unknown field"}])
    async with aiohttp.ClientSession() as anonymous:
        status, _ = await _get(anonymous, f"{daemon.api}{BASE}/drivers")
    assert status == 401


async def test_uplinks_keep_flowing_while_codecs_loop_and_allocate(
    running: tuple[DaemonProcess, aiohttp.ClientSession], mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """Looping and allocating codecs run in the daemon (through the try-out route) while
    uplinks are published one by one: each is delivered about as fast as without them."""
    daemon, session = running

    async def deliveries(count: int, first: int, pace: float = 0.0) -> list[float]:
        delays = []
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for n in range(first, first + count):
                started = time.perf_counter()
                await client.publish(*uplink("actility", DEV, n), qos=1)
                await cloud.wait_for(n, path="/c1")
                delays.append(time.perf_counter() - started)
                await asyncio.sleep(pace)  # pacing, not synchronisation: spread over loops
        return delays

    quiet = await deliveries(10, 1)
    stop = asyncio.Event()
    faults: list[str] = []

    async def misbehave(driver: str) -> None:
        while not stop.is_set():
            status, out = await _decode(session, daemon.api, driver, {"payload_hex": "00"})
            assert status == 200
            faults.append(out["payloadDecodedError"]["code"])

    bad = [asyncio.create_task(misbehave(d)) for d in ("test:loops:1", "test:hungry:1")]
    try:
        busy = await deliveries(30, 11, pace=0.05)  # ~1.5 s: through several loops
    finally:
        stop.set()
        await asyncio.gather(*bad)
    assert faults.count("timeout") >= 3
    assert "memory_limit" in faults
    median_quiet = sorted(quiet)[5]
    median_busy = sorted(busy)[15]
    print(
        f"\ndelivery delay, median/max: quiet {median_quiet * 1000:.0f}/{max(quiet) * 1000:.0f}"
        f" ms; while codecs loop and allocate {median_busy * 1000:.0f}/{max(busy) * 1000:.0f} ms"
        f" ({faults.count('timeout')} loops, {faults.count('memory_limit')} out of memory)"
    )
    # A delivery never waited for a looping codec (300 ms a call).
    assert max(busy) < 1.0
    assert median_busy < median_quiet + 0.25


EXAMPLES = Path(__file__).parents[1] / "examples" / "drivers"
SENSOR = "0018B20000003002"


async def test_a_flows_driver_decodes_a_real_frame_and_processors_reshape_it(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    """Milesight EM300-TH's documented frame (User Guide 5.2), routed by a flow whose driver is
    the shipped example codec: the binding's connection gets the document undecoded, the flow's
    gets `payload`, and a connection with processors gets the decoded values reshaped."""
    flows = f"""
[[flows]]
id = "em300"
name = "EM300-TH sensors"
driver = {{ id = "milesight:em300-th:1" }}
matchers = [{{ type = "key", key = "lora:{SENSOR.lower()}" }}]
connectors = [{{ connectionId = "decoded" }}, {{ connectionId = "shaped" }}]
"""
    daemon = DaemonProcess(
        tmp_path / "flow-driver",
        broker_url=mosquitto.url,
        connections=[
            {
                "id": "raw",
                "name": "raw",
                "connectorId": "actility-http-iot",
                "devices": [SENSOR],
                "configuration": {"destinationURL": cloud.url("/raw")},
            },
            {
                "id": "decoded",
                "name": "decoded",
                "connectorId": "actility-http-iot",
                "configuration": {"destinationURL": cloud.url("/decoded")},
            },
            {
                "id": "shaped",
                "name": "shaped",
                "connectorId": "actility-http-iot",
                "upOperations": [
                    {
                        "type": "jmespath",
                        "template": {
                            "device": "{{ DevEUI_uplink.DevEUI }}",
                            "celsius": "{{ DevEUI_uplink.payload.temperature }}",
                        },
                    }
                ],
                "configuration": {"destinationURL": cloud.url("/shaped")},
            },
        ],
        extra=f'[drivers]\npath = "{EXAMPLES}"\n' + flows,
    )
    await daemon.start()
    try:
        topic, body = uplink("actility", SENSOR, 1)
        document = json.loads(body)
        document["DevEUI_uplink"].update(FPort=85, payload_hex="01756403671001046871")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(topic, json.dumps(document), qos=1)
        (raw,) = await cloud.wait_for(1, path="/raw")
        assert "payload" not in raw.json["DevEUI_uplink"]
        (decoded,) = await cloud.wait_for(1, path="/decoded")
        assert decoded.json["DevEUI_uplink"]["payload"] == {
            "battery": 100,
            "temperature": 27.2,
            "humidity": 56.5,
        }
        (shaped,) = await cloud.wait_for(1, path="/shaped")
        assert shaped.json == {"device": SENSOR, "celsius": 27.2}
    finally:
        await daemon.close()
