"""End to end: `iotflow run` as a process, a real Mosquitto, and the local doubles of
ThingsBoard, Splunk HEC and InfluxDB (support/webdoubles.py), one test per connector."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest

from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink
from support.webdoubles import FakeInfluxDb, FakeSplunkHec, FakeThingsBoard, parse_line

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}
BASE = "/iot-flow/v1"
# One uplink time for the whole file, so that what the clouds record can be compared to it.
AT = datetime(2026, 12, 6, 3, 0, 0, 125000, tzinfo=UTC)
AT_MS = 1_796_526_000_125  # 2026-12-06T03:00:00.125Z


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def get(daemon: DaemonProcess, path: str) -> Any:
    url = f"{daemon.api}{BASE}{path}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=AUTH) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def connection(cid: str, connector: str, devices: list[str], **config: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "name": f"test {cid}",
        "connectorId": connector,
        "devices": devices,
        "configuration": {"uplinkTimeValidity": "3650d", **config},
    }


def state_is(cid: str, state: str) -> Any:
    return lambda e: (
        e.get("event") == "Connection state changed"
        and e.get("connection") == cid
        and e.get("state") == state
    )


async def test_thingsboard_telemetry_per_device_token(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Two devices' uplinks (ThingPark and ChirpStack) become telemetry of their ThingsBoard
    devices, one token from `accessTokens`, one from `accessTokenPattern`; a device whose
    token ThingsBoard does not know fails alone, saying why."""
    mapped, patterned, unknown = "0018B20000000E11", "A840414FC182F611", "0018B20000000E12"
    token = "tb-s3cret-token-e2e-77aa"
    async with FakeThingsBoard() as board:
        board.add_device(mapped, token)
        board.add_device(patterned, f"lora-{patterned}")
        daemon = DaemonProcess(
            tmp_path / "tb",
            broker_url=mosquitto.url,
            connections=[
                connection(
                    "tb",
                    "actility-thingsboard-iot",
                    [mapped, patterned, unknown],
                    hostName=board.base_url,
                    accessTokens={mapped: token},
                    accessTokenPattern="lora-{DevEUI}",
                )
            ],
        )
        try:
            await daemon.start()
            await publish(
                mosquitto,
                [
                    uplink("actility", mapped, 1, at=AT),
                    uplink("actility", unknown, 1, at=AT),
                    uplink("chirpstack", patterned, 1, at=AT),
                    uplink("actility", mapped, 2, at=AT),
                ],
            )
            await board.wait_until(
                lambda: len(board.records(mapped)) == 2 and len(board.records(patterned)) == 1,
                what="3 telemetry records",
            )
            await daemon.wait_log(
                lambda e: e.get("event") == "Delivery failed" and e.get("connection") == "tb"
            )
            first = board.records(mapped)[0]
            assert first["ts"] == AT_MS
            assert first["values"]["fCnt"] == 1
            assert first["values"]["rssi"] == -80.0
            assert [r["values"]["fCnt"] for r in board.records(mapped)] == [1, 2]
            assert board.records(patterned)[0]["values"]["fPort"] == 5  # ChirpStack fixture's
            assert board.count(401) == 1

            document = await get(daemon, "/connections/tb")
            assert document["state"] == "OPENED"
            assert document["configuration"]["accessTokens"] == {mapped: "*****"}
            stats = document["statistics"]
            assert (stats["delivered"], stats["failed"]) == (3, 1)
            assert stats["lastError"].startswith(
                f"HTTP 401: ThingsBoard refused the access token of device {unknown}"
            )
            assert token not in "\n".join(daemon.output)
            assert await daemon.stop() == 0
        finally:
            await daemon.close()


async def test_splunk_events_and_a_disabled_token(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Uplinks become HEC events stamped with the uplink's time, the DevEUI as host; a token
    disabled in Splunk (403, code 1) sets AUTHENTICATION_FAILED, and the uplink waiting is
    delivered once the token is enabled again."""
    dev = "0018B20000000E21"
    token = "hec-s3cret-token-e2e-19bd"
    async with FakeSplunkHec(token, indexes=("main", "lora")) as hec:
        daemon = DaemonProcess(
            tmp_path / "splunk",
            broker_url=mosquitto.url,
            delivery={"retry_max": "300ms"},
            connections=[
                connection(
                    "hec",
                    "actility-splunk-iot",
                    [dev],
                    hostName=hec.base_url,
                    hecToken=token,
                    index="lora",
                    sourcetype="lorawan:uplink",
                )
            ],
        )
        try:
            await daemon.start()
            await publish(mosquitto, [uplink("actility", dev, n, at=AT) for n in (1, 2)])
            await hec.wait_until(lambda: len(hec.events) == 2, what="2 events")
            event = hec.events[0]
            assert event["time"] == pytest.approx(AT_MS / 1000)
            assert (event["host"], event["source"], event["sourcetype"], event["index"]) == (
                dev,
                "iotflow",
                "lorawan:uplink",
                "lora",
            )
            assert [e["event"]["DevEUI_uplink"]["FCntUp"] for e in hec.events] == [1, 2]

            hec.disabled = True
            await publish(mosquitto, [uplink("actility", dev, 3, at=AT)])
            await daemon.wait_log(state_is("hec", "AUTHENTICATION_FAILED"))
            document = await get(daemon, "/connections/hec")
            assert document["statistics"]["lastError"] == "HTTP 403: Token disabled (code 1)"
            assert document["configuration"]["hecToken"] == "*****"
            hec.disabled = False
            await hec.wait_until(lambda: len(hec.events) == 3, what="the third event")
            await daemon.wait_log(state_is("hec", "OPENED"))
            assert token not in "\n".join(daemon.output)
            assert await daemon.stop() == 0
        finally:
            await daemon.close()


async def test_influxdb_points_and_a_busy_server(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Uplinks become points (tags devEUI and fPort, the uplink's time in ms), read back
    strictly as line protocol; a 503 with Retry-After is waited for and retried."""
    devices = {"actility": "0018B20000000E31", "tts": "70B3D57ED0000E31"}
    token = "influx-s3cret-token-e2e-c0de"
    async with FakeInfluxDb(token) as influx:
        influx.fail(503, retry_after=1)
        daemon = DaemonProcess(
            tmp_path / "influx",
            broker_url=mosquitto.url,
            connections=[
                connection(
                    "influx",
                    "actility-influxdb-iot",
                    list(devices.values()),
                    hostName=influx.base_url,
                    org="acme",
                    bucket="lora",
                    token=token,
                    measurement="lora uplink",
                )
            ],
        )
        try:
            await daemon.start()
            await publish(mosquitto, [uplink(fmt, dev, 5, at=AT) for fmt, dev in devices.items()])
            await influx.wait_until(lambda: len(influx.written()) == 2, what="2 points")
            assert influx.count(503) == 1
            by_device = {p.tags["devEUI"]: p for p in influx.written()}
            assert set(by_device) == set(devices.values())
            written = by_device[devices["actility"]]
            assert written.measurement == "lora uplink"
            assert written.tags == {"devEUI": devices["actility"], "fPort": "1"}
            assert written.timestamp == AT_MS * 1_000_000
            assert written.fields["fCnt"] == 5
            assert written.fields["rssi"] == -80.0
            assert written.fields["payloadHex"] == "9e1c0100"
            # The body was line protocol a strict reader accepts, line by line.
            for call in influx.requests:
                assert call.query == {"org": "acme", "bucket": "lora", "precision": "ms"}
                for text in call.body.decode().splitlines():
                    parse_line(text)
            document = await get(daemon, "/connections/influx")
            assert document["configuration"]["token"] == "*****"
            stats = document["statistics"]
            assert (stats["delivered"], stats["retried"]) == (2, 1)
            assert token not in "\n".join(daemon.output)
            assert token not in orjson.dumps(document).decode()
            assert await daemon.stop() == 0
        finally:
            await daemon.close()
