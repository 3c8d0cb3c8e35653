"""One connection's bad state never stops the daemon: issue #10, defect 2, end to end.

1. An alarm at the edge of the calendar is refused with a field error (it used to be stored,
   then break every write and every later start with an OverflowError in the schedule).
2. A connection that is broken in the registry anyway (an older version stored it) is taken
   out of service alone: the daemon starts, delivers to the others, and the API shows the
   broken one as CLOSED with the reason in `statistics.lastError` and an event.
"""

from __future__ import annotations

import sqlite3
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

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}
DEV = "0018B2000000A001"

EDGE_ALARMS = [
    # The window's local times in its own offset are fine; in UTC they are past 9999.
    {"startTime": "9999-12-31T22:00:00-12:00", "endTime": "9999-12-31T23:00:00-12:00"},
    # Year 1 in +14:00 is before 0001-01-01 in UTC.
    {"startTime": "0001-01-01T00:00:00+14:00", "endTime": "0001-01-01T01:00:00+14:00"},
]


async def call(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{daemon.api}{BASE}{path}", json=body, headers=AUTH) as r,
    ):
        text = await r.text()
        return r.status, (orjson.loads(text) if text else None)


def http_body(cloud: FakeCloud, cid: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "name": cid,
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": cloud.url(f"/{cid}")},
        **extra,
    }


@pytest.mark.parametrize("edge", EDGE_ALARMS, ids=["9999-minus-12h", "year-1-plus-14h"])
async def test_an_alarm_at_the_calendar_edge_is_refused_and_the_daemon_restarts(
    tmp_path: Path,
    mosquitto: Mosquitto,
    cloud: FakeCloud,
    daemons: list[DaemonProcess],
    edge: dict[str, str],
) -> None:
    daemon = DaemonProcess(tmp_path / "edge", broker_url=mosquitto.url)
    daemons.append(daemon)
    await daemon.start()
    alarm = {**edge, "uplinkRateMinPerHour": 1}
    status, answer = await call(
        daemon, "POST", "/connections", http_body(cloud, "edge", alarms=[alarm])
    )
    assert status == 422, answer
    paths = [d["path"] for d in answer["details"]]
    assert "alarms.0.startTime" in paths, answer
    # Nothing was stored, and writes still work.
    assert (await call(daemon, "GET", "/connections/edge"))[0] == 404
    status, answer = await call(daemon, "POST", "/connections", http_body(cloud, "after"))
    assert status == 201, answer
    assert await daemon.stop() == 0
    await daemon.start()
    status, listed = await call(daemon, "GET", "/connections")
    assert status == 200
    assert [c["id"] for c in listed] == ["after"]
    assert not [e for e in daemon.logs if e.get("event") == "API request failed"]


async def test_a_connection_broken_in_the_registry_is_out_of_service_alone(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, daemons: list[DaemonProcess]
) -> None:
    workdir = tmp_path / "poisoned"
    daemon = DaemonProcess(workdir, broker_url=mosquitto.url)
    daemons.append(daemon)
    await daemon.start()
    for cid in ("healthy", "poisoned"):
        status, answer = await call(daemon, "POST", "/connections", http_body(cloud, cid))
        assert status == 201, answer
    status, answer = await call(
        daemon, "PUT", f"/devices/{DEV}", {"connections": ["healthy", "poisoned"]}
    )
    assert status == 200, answer
    assert await daemon.stop() == 0

    # What an older version could store: an alarm at the edge of the calendar.
    db = sqlite3.connect(workdir / "registry.db")
    (raw,) = db.execute("SELECT document FROM connections WHERE id = 'poisoned'").fetchone()
    document = orjson.loads(raw)
    document["alarms"] = [{**EDGE_ALARMS[0], "uplinkRateMinPerHour": 1}]
    db.execute(
        "UPDATE connections SET document = ? WHERE id = 'poisoned'",
        (orjson.dumps(document).decode(),),
    )
    db.commit()
    db.close()

    await daemon.start()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.publish(*uplink("actility", DEV, 1), qos=1)
    (delivered,) = await cloud.wait_for(1, path="/healthy")
    assert orjson.loads(delivered.body)["DevEUI_uplink"]["DevEUI"] == DEV

    status, shown = await call(daemon, "GET", "/connections/poisoned")
    assert status == 200, shown
    assert shown["state"] == "CLOSED"
    assert "alarms.0.startTime" in shown["statistics"]["lastError"]
    status, listed = await call(daemon, "GET", "/connections")
    assert status == 200
    by_id = {c["id"]: c for c in listed}
    assert by_id["poisoned"]["state"] == "CLOSED"
    assert by_id["healthy"]["state"] in ("OPENING", "OPENED")
    status, events = await call(daemon, "GET", "/connections/poisoned/events")
    assert status == 200
    (event,) = [e for e in events if e["type"] == "out_of_service"]
    assert "alarms.0.startTime" in event["details"]["reason"]
    lines = [e for e in daemon.logs if e.get("event") == "Connection out of service"]
    assert [line["connection"] for line in lines] == ["poisoned"]

    # The operator repairs it through the API: back in service, its spooled uplink delivered.
    repaired = http_body(cloud, "poisoned")
    status, answer = await call(daemon, "PUT", "/connections/poisoned", repaired)
    assert status == 200, answer
    (late,) = await cloud.wait_for(1, path="/poisoned")
    assert orjson.loads(late.body)["DevEUI_uplink"]["DevEUI"] == DEV
    status, shown = await call(daemon, "GET", "/connections/poisoned")
    assert shown["state"] in ("OPENING", "OPENED")
    assert shown["statistics"]["lastError"] is None
    assert not [e for e in daemon.logs if e.get("event") == "API request failed"]
