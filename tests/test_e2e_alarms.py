"""Alarms end to end, on an accelerated clock: healthy, quiet, recovered; and a restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink

pytestmark = pytest.mark.slow

SPEED = 600  # one virtual hour in six real seconds
NOTIFY = "iotflow-test/alarms"
DEV = "0018B20000007001"
AUTH = {"Authorization": "Bearer test-token"}


def alarm_connection(cloud: FakeCloud) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": "watched",
        "name": "watched connection",
        "connectorId": "actility-http-iot",
        "devices": [DEV],
        "configuration": {"destinationURL": cloud.url("/alarm")},
        "alarms": [
            {
                "startTime": (now - timedelta(minutes=1)).isoformat(),
                "endTime": (now + timedelta(hours=20)).isoformat(),
                "timezone": "Europe/Paris",
                "uplinkRateMinPerHour": 30,
                "message": "Watched devices went quiet",
            }
        ],
    }


class Publisher:
    """Publishes one uplink every 30 virtual seconds (120 an hour) while switched on."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.on = asyncio.Event()
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port) as client:
            while True:
                await self.on.wait()
                self.count += 1
                await client.publish(*uplink("actility", DEV, self.count), qos=1)
                await asyncio.sleep(30 / SPEED)  # pacing the device, not synchronising


@pytest.fixture
async def notifications(mosquitto: Mosquitto) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe(NOTIFY, qos=1)

        async def pump() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                queue.put_nowait(orjson.loads(message.payload))

        task = asyncio.create_task(pump())
        yield queue
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def get(daemon: DaemonProcess, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.api}{path}", headers=AUTH) as r:
        assert r.status == 200
        return await r.json()


def alarm_daemon(workdir: Path, mosquitto: Mosquitto, cloud: FakeCloud) -> DaemonProcess:
    """A daemon watching one connection, notifying on NOTIFY, its alarm clock accelerated."""
    return DaemonProcess(
        workdir,
        broker_url=mosquitto.url,
        connections=[alarm_connection(cloud)],
        extra=f'[alarms]\nnotify_topic = "{NOTIFY}"\n',
        env={"IOTFLOW_TEST_CLOCK_SPEED": str(SPEED)},
    )


def evaluated(raised: bool) -> Any:
    return lambda e: e.get("event") == "Alarm evaluated" and e.get("raised") is raised


async def test_raise_and_clear_on_an_accelerated_clock(
    tmp_path: Path,
    mosquitto: Mosquitto,
    cloud: FakeCloud,
    notifications: asyncio.Queue[dict[str, Any]],
) -> None:
    daemon = alarm_daemon(tmp_path / "alarms", mosquitto, cloud)
    try:
        await daemon.start()
        async with Publisher(mosquitto) as publisher:
            publisher.on.set()
            # An hour of the window observed at a healthy rate: evaluated, not raised.
            await daemon.wait_log(evaluated(False))
            (state,) = (await get(daemon, "/iot-flow/v1/connections/watched"))["alarmStates"]
            assert state["state"] == "CLEAR"
            assert state["rate"] >= 30

            publisher.on.clear()  # the devices go quiet
            (raised,) = await daemon.wait_log(lambda e: e.get("event") == "Alarm raised")
            assert raised["rate"] < 30
            note = await asyncio.wait_for(notifications.get(), 30)
            assert note["type"] == "alarm_raised"
            assert note["connection"] == "watched"
            assert note["message"] == "Watched devices went quiet"
            assert note["threshold"] == 30
            assert await daemon.metric("iotflow_alarm_active", connection="watched", alarm="0") == 1
            (active,) = await get(daemon, "/iot-flow/v1/alarms")
            assert (active["connectionId"], active["alarm"]) == ("watched", 0)
            (state,) = (await get(daemon, "/iot-flow/v1/connections/watched"))["alarmStates"]
            assert state["state"] == "RAISED"

            publisher.on.set()  # they are back
            await daemon.wait_log(lambda e: e.get("event") == "Alarm cleared")
            note = await asyncio.wait_for(notifications.get(), 30)
            assert note["type"] == "alarm_cleared"
            assert note["rate"] >= 30
            assert await daemon.metric("iotflow_alarm_active", connection="watched", alarm="0") == 0
            assert await get(daemon, "/iot-flow/v1/alarms") == []
            events = await get(daemon, "/iot-flow/v1/connections/watched/events?perPage=100")
            kinds = [e["type"] for e in events]
            assert kinds.count("alarm_raised") == 1
            assert kinds.count("alarm_cleared") == 1
        assert await daemon.stop() == 0
    finally:
        await daemon.close()


async def test_a_raised_alarm_survives_a_restart_without_a_second_raise(
    tmp_path: Path,
    mosquitto: Mosquitto,
    cloud: FakeCloud,
    notifications: asyncio.Queue[dict[str, Any]],
) -> None:
    daemon = alarm_daemon(tmp_path / "restart", mosquitto, cloud)
    try:
        await daemon.start()
        # Nothing at all is published: once an hour is observed, it is raised.
        await daemon.wait_log(lambda e: e.get("event") == "Alarm raised")
        assert await daemon.stop() == 0
        before = len([e for e in daemon.logs if evaluated(True)(e)])
        await daemon.start()
        # Raised again at once from the registry, before any evaluation.
        assert await daemon.metric("iotflow_alarm_active", connection="watched", alarm="0") == 1
        assert len(await get(daemon, "/iot-flow/v1/alarms")) == 1
        # Re-evaluated after an hour of observation, still quiet: not raised a second time.
        await daemon.wait_log(evaluated(True), count=before + 1)
        events = await get(daemon, "/iot-flow/v1/connections/watched/events?perPage=100")
        assert [e["type"] for e in events].count("alarm_raised") == 1
        raised_logs = [e for e in daemon.logs if e.get("event") == "Alarm raised"]
        assert len(raised_logs) == 1
        assert (await asyncio.wait_for(notifications.get(), 30))["type"] == "alarm_raised"
        assert notifications.empty()
    finally:
        await daemon.close()
