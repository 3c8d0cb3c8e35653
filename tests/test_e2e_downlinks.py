"""End to end: downlinks posted to `iotflow run` arrive on the source broker (a real
Mosquitto) on each network server's topic, in its format.

The signature is computed here from its documentation (docs/downlinks.md), not with
iotflow's own code, so that the two cannot agree on a mistake.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import aiomqtt
import orjson
import pytest
from yarl import URL

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink

pytestmark = pytest.mark.slow

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}
# As in the product's own example connection (tests/seeds/connections-api.md).
AS_ID, AS_KEY = "TWA_199983788.1972.AS", "9311e33d7d44fc52215b0dc789aa1d22"

DEVICES = {
    "actility": "0018B20000000B20",
    "chirpstack": "A840414FC182F6C2",
    "tts": "70B3D57ED005A1B2",
}
OTHERS_DEVICE = "0018B20000000F01"  # bound to another connection only
SILENT_DEVICE = "0018B20000000F02"  # bound, but no uplink of it ever seen
TOPICS = {
    "actility": "tpx/things/0018B20000000B20/downlink",
    "chirpstack": (
        "application/17c82e96-be03-4f38-aef3-f83d48582d97/device/a840414fc182f6c2/command/down"
    ),
    "tts": "v3/demo-app@ttn/devices/eui-70b3d57ed005a1b2/down/push",
}


def connections(cloud: FakeCloud) -> list[dict[str, Any]]:
    def http(cid: str, devices: list[str], **config: Any) -> dict[str, Any]:
        return {
            "id": cid,
            "name": cid,
            "connectorId": "actility-http-iot",
            "devices": devices,
            "configuration": {"destinationURL": cloud.url(f"/{cid}"), **config},
        }

    return [
        http(
            "cloud",
            [*DEVICES.values(), SILENT_DEVICE],
            downlinkAsId=AS_ID,
            downlinkAsKey=AS_KEY,
            downlinkPort=15,
        ),
        http("another", [OTHERS_DEVICE], downlinkAsId="AS2", downlinkAsKey="other-key"),
        http("no-credentials", [OTHERS_DEVICE]),
        http(
            "muted",
            [DEVICES["actility"]],
            downlinkAsId=AS_ID,
            downlinkAsKey=AS_KEY,
            downlinkEnabled=False,
        ),
    ]


class Cloud:
    """A cloud that posts downlinks to iotflow, signing them as docs/downlinks.md says."""

    def __init__(self, session: aiohttp.ClientSession, api: str) -> None:
        self.session = session
        self.api = api

    def url(
        self,
        cid: str,
        body: bytes,
        *,
        as_id: str = AS_ID,
        key: str = AS_KEY,
        at: datetime | None = None,
    ) -> URL:
        time = (at or datetime.now(UTC)).isoformat(timespec="milliseconds")
        # Signed decoded; sent encoded (the '+' of the offset as %2B).
        signed = f"AS_ID={as_id}&Time={time}"
        token = hashlib.sha256(signed.encode() + body + key.encode()).hexdigest()
        query = f"AS_ID={quote(as_id)}&Time={quote(time, safe='')}&Token={token}"
        return URL(f"{self.api}{BASE}/downlinkMessages/{cid}?{query}", encoded=True)

    async def post(
        self, url: URL | str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.post(url, data=body, headers=headers) as r:
            return r.status, await r.json()

    async def send(self, cid: str, document: Any, **kw: Any) -> tuple[int, Any]:
        body = orjson.dumps(document)
        return await self.post(self.url(cid, body, **kw), body)

    async def events(self, cid: str) -> list[dict[str, Any]]:
        url = f"{self.api}{BASE}/connections/{cid}/events?perPage=100"
        async with self.session.get(url, headers=AUTH) as r:
            assert r.status == 200
            events: list[dict[str, Any]] = await r.json()
            return events


@pytest.fixture
async def started(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> AsyncIterator[tuple[DaemonProcess, Cloud]]:
    daemon = DaemonProcess(
        tmp_path / "downlinks", broker_url=mosquitto.url, connections=connections(cloud)
    )
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield daemon, Cloud(session, daemon.api)
    finally:
        await daemon.close()


async def heard(
    mosquitto: Mosquitto, cloud: FakeCloud, fmt: str, dev_eui: str, *, path: str = "/cloud"
) -> None:
    """Publish an uplink of the device and wait until the cloud at `path` has it: the daemon
    has then seen it, and knows the device's network server."""
    before = len(cloud.requests_to(path))
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.publish(*uplink(fmt, dev_eui, 100), qos=1)
    await cloud.wait_for(before + 1, path=path)


async def receive(
    mosquitto: Mosquitto, topic: str, act: Callable[[], Any], timeout: float = 15
) -> tuple[str, Any, Any]:
    """Subscribe to `topic`, run `act`, and return (topic, body) of the first message and
    what `act` returned."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe(topic, qos=1)
        answer = await act()
        async with asyncio.timeout(timeout):
            message = await anext(aiter(client.messages))
    assert isinstance(message.payload, bytes)
    return message.topic.value, orjson.loads(message.payload), answer


# What each cloud sends, in the shapes clouds write: ThingPark's with numbers as strings,
# flat, and ThingPark's without FPort (the connection's downlinkPort fills it).
REQUESTS: dict[str, dict[str, Any]] = {
    "actility": {
        "DevEUI_downlink": {
            "Time": "2026-11-22T10:00:00.000+01:00",
            "DevEUI": "0018b20000000b20",
            "FPort": "2",
            "payload_hex": "9E1C4852",
            "Confirmed": "1",
            "CorrelationID": "4434704901C7450B",
        }
    },
    "chirpstack": {"DevEUI": "a8-40-41-4f-c1-82-f6-c2", "FPort": 10, "payload_hex": "010203"},
    "tts": {"DevEUI_downlink": {"DevEUI": "70B3D57ED005A1B2", "payload_hex": "cafe"}},
}
PORTS = {"actility": 2, "chirpstack": 10, "tts": 15}
PAYLOADS = {"actility": "9e1c4852", "chirpstack": "010203", "tts": "cafe"}
EXPECTED: dict[str, Any] = {
    "actility": {
        "DevEUI_downlink": {
            "DevEUI": "0018B20000000B20",
            "FPort": 2,
            "payload_hex": "9e1c4852",
            "Confirmed": 1,
            "CorrelationID": "4434704901C7450B",
        }
    },
    "chirpstack": {"devEui": "a840414fc182f6c2", "confirmed": False, "fPort": 10, "data": "AQID"},
    "tts": {"downlinks": [{"f_port": 15, "frm_payload": "yv4=", "priority": "NORMAL"}]},
}


@pytest.mark.parametrize("fmt", ["actility", "chirpstack", "tts"])
async def test_a_downlink_reaches_the_network_server_in_its_format(
    started: tuple[DaemonProcess, Cloud], mosquitto: Mosquitto, cloud: FakeCloud, fmt: str
) -> None:
    daemon, client = started
    dev_eui = DEVICES[fmt]
    await heard(mosquitto, cloud, fmt, dev_eui)

    topic, body, (status, answer) = await receive(
        mosquitto, TOPICS[fmt], lambda: client.send("cloud", REQUESTS[fmt])
    )

    assert status == 202, answer
    assert answer == {"devEUI": dev_eui, "fPort": PORTS[fmt], "topic": TOPICS[fmt]}
    assert topic == TOPICS[fmt]
    if fmt == "actility":
        # ThingPark's Time is when iotflow sent it, not when the cloud asked.
        sent_at = datetime.fromisoformat(body["DevEUI_downlink"].pop("Time"))
        assert abs(datetime.now(UTC) - sent_at) < timedelta(minutes=1)
    assert body == EXPECTED[fmt]
    if fmt == "chirpstack":
        assert base64.b64decode(body["data"]) == bytes.fromhex(PAYLOADS[fmt])

    (event,) = [e for e in await client.events("cloud") if e["type"] == "downlink_sent"]
    assert event["details"]["devEUI"] == dev_eui
    assert event["details"]["topic"] == TOPICS[fmt]
    assert event["details"]["size"] == len(bytes.fromhex(PAYLOADS[fmt]))
    await daemon.wait_log(
        lambda e: e.get("event") == "Downlink sent" and e.get("devEUI") == dev_eui
    )
    assert await daemon.metric("iotflow_downlinks_total", connection="cloud", outcome="sent") == 1
    assert AS_KEY not in "\n".join(daemon.output)


async def test_refused_downlinks_say_why(
    started: tuple[DaemonProcess, Cloud], mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    daemon, client = started
    await heard(mosquitto, cloud, "actility", DEVICES["actility"])
    await heard(mosquitto, cloud, "actility", OTHERS_DEVICE, path="/another")
    flat = {"DevEUI": DEVICES["actility"], "FPort": 1, "payload_hex": "01"}

    # A device of the connection that never sent an uplink: where would it go?
    status, error = await client.send("cloud", {**flat, "DevEUI": SILENT_DEVICE})
    assert (status, error["code"]) == (422, "unknown_device"), error
    assert "no uplink" in error["message"]
    # Another connection's device: a cloud commands its own devices only.
    status, error = await client.send("cloud", {**flat, "DevEUI": OTHERS_DEVICE})
    assert (status, error["code"]) == (422, "unknown_device"), error
    # A bad shape, with the field named.
    status, error = await client.send("cloud", {"DevEUI_downlink": {**flat, "FPort": 300}})
    assert (status, error["code"]) == (422, "bad_port"), error
    assert [d["path"] for d in error["details"]] == ["DevEUI_downlink.FPort"]
    status, error = await client.send("cloud", {**flat, "payload_hex": "abc"})
    assert (status, error["code"]) == (422, "bad_payload"), error
    status, error = await client.send("cloud", {"FPort": 1, "payload_hex": "01"})
    assert (status, error["code"]) == (422, "bad_dev_eui"), error  # required in the body here
    # downlinkEnabled = false.
    status, error = await client.send("muted", flat)
    assert (status, error["code"]) == (422, "disabled"), error

    events = await client.events("cloud")
    reasons = [e["details"]["reason"] for e in events if e["type"] == "downlink_rejected"]
    assert sorted(reasons) == sorted(
        ["unknown_device", "unknown_device", "bad_port", "bad_payload", "bad_dev_eui"]
    )
    assert not [e for e in events if e["type"] == "downlink_sent"]
    assert [e["type"] for e in await client.events("muted")].count("downlink_rejected") == 1
    assert (
        await daemon.metric("iotflow_downlinks_total", connection="cloud", outcome="unknown_device")
        == 2
    )


async def test_only_the_connections_signature_is_accepted(
    started: tuple[DaemonProcess, Cloud], mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    _, client = started
    await heard(mosquitto, cloud, "actility", DEVICES["actility"])
    document = {"DevEUI": DEVICES["actility"], "FPort": 1, "payload_hex": "01"}
    body = orjson.dumps(document)

    async def refused(url: URL | str, headers: dict[str, str] | None = None) -> str:
        status, error = await client.post(url, body, headers)
        assert status == 401, error
        assert set(error) == {"code", "message", "details"}
        return str(error["message"])

    assert "does not match" in await refused(client.url("cloud", body, key="not-the-key"))
    assert "does not match" in await refused(client.url("cloud", body, as_id="TWA_other.AS"))
    # Signed for another body.
    assert "does not match" in await refused(client.url("cloud", b"{}"))
    stale = datetime.now(UTC) - timedelta(minutes=10)
    assert "clock" in await refused(client.url("cloud", body, at=stale))
    # The operators' bearer token is not a cloud's credential.
    plain = f"{client.api}{BASE}/downlinkMessages/cloud"
    assert "missing" in await refused(plain, AUTH)
    # A connection without downlinkAsId/downlinkAsKey takes no HTTP downlink at all; it is
    # said as for wrong credentials, so that the answer does not tell what it has.
    mismatch = await refused(client.url("cloud", body, key="not-the-key"))
    assert await refused(client.url("no-credentials", body, key="")) == mismatch
    # Another connection's credentials do not open this one.
    assert "does not match" in await refused(
        client.url("cloud", body, as_id="AS2", key="other-key")
    )

    # Signed right: accepted once; the same request again is a replay.
    url = client.url("cloud", body)
    status, answer = await client.post(url, body)
    assert status == 202, answer
    assert "used already" in await refused(url)

    # An unknown connection gets the very same answer as a known one (the route is not
    # bearer-authenticated: it must not tell which connection ids exist).
    for ghost in ("ghost", "_not-an-id", "no-credentials"):
        async with client.session.post(
            client.url(ghost, body, key="not-the-key"),
            data=body,
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'ThingPark-Token realm="iotflow downlinks"'
            assert await r.json() == {"code": "unauthorized", "message": mismatch, "details": []}
    assert "clock" in await refused(client.url("ghost", body, at=stale))
    assert "missing" in await refused(f"{client.api}{BASE}/downlinkMessages/ghost", AUTH)
    async with client.session.post(
        client.url("cloud", body), data=body, headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415


async def test_a_restarted_daemon_still_knows_where_devices_are(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    daemon = DaemonProcess(
        tmp_path / "restart", broker_url=mosquitto.url, connections=connections(cloud)
    )
    try:
        await daemon.start()
        await heard(mosquitto, cloud, "chirpstack", DEVICES["chirpstack"])
        assert await daemon.stop() == 0
        await daemon.start()
        async with aiohttp.ClientSession() as session:
            client = Cloud(session, daemon.api)
            # No uplink since the restart: the registry remembers the network server.
            topic, body, (status, answer) = await receive(
                mosquitto,
                TOPICS["chirpstack"],
                lambda: client.send("cloud", REQUESTS["chirpstack"]),
            )
        assert status == 202, answer
        assert (topic, body) == (TOPICS["chirpstack"], EXPECTED["chirpstack"])
    finally:
        await daemon.close()


async def test_without_the_broker_a_downlink_is_503(
    tmp_path: Path, fresh_mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    daemon = DaemonProcess(
        tmp_path / "nobroker", broker_url=fresh_mosquitto.url, connections=connections(cloud)
    )
    try:
        await daemon.start()
        await heard(fresh_mosquitto, cloud, "actility", DEVICES["actility"])
        fresh_mosquitto.stop()
        await daemon.wait_log(lambda e: e.get("event") == "Broker connection lost")
        async with aiohttp.ClientSession() as session:
            status, error = await Cloud(session, daemon.api).send(
                "cloud", {"DevEUI": DEVICES["actility"], "FPort": 1, "payload_hex": "01"}
            )
        assert (status, error["code"]) == (503, "not_connected"), error
    finally:
        await daemon.close()
