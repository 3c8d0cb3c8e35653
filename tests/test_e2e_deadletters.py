"""Dead letters and replays end to end (issue #14): `iotflow run` processes, a real broker,
a fake cloud; SIGTERM and kill -9 in the middle."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from support.clouds import Behaviour, FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import uplink

pytestmark = pytest.mark.slow

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}
A = "0018B2000000DE01"
B = "0018B2000000DE02"
C = "0018B2000000DE03"
D = "0018B2000000DE04"
SECRET = "Token s3cr3t-abc"


class Api:
    def __init__(self, session: aiohttp.ClientSession, daemon: DaemonProcess) -> None:
        self.session = session
        self.daemon = daemon

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        kwargs: dict[str, Any] = {"headers": dict(AUTH)}
        if body is not None:
            kwargs["json"] = body
        if raw is not None:
            kwargs["data"] = io.BytesIO(raw)
            kwargs["headers"]["Content-Type"] = "application/json"
        url = f"{self.daemon.api}{BASE}{path}"
        async with self.session.request(method, url, **kwargs) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), dict(r.headers)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Poll the daemon's API until `check` holds: its state is only visible through it."""
    async with asyncio.timeout(timeout):
        # Another process: there is no event to await, only its API to ask.
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def fcnts(cloud: FakeCloud, path: str, dev_eui: str) -> list[int]:
    return [
        r.json["DevEUI_uplink"]["FCntUp"]
        for r in cloud.requests_to(path, accepted=True)
        if r.json["DevEUI_uplink"]["DevEUI"] == dev_eui
    ]


def connection(cid: str, url: str, devices: list[str], **configuration: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "name": cid,
        "connectorId": "actility-http-iot",
        "devices": devices,
        "configuration": {"destinationURL": url, **configuration},
    }


async def cli(daemon: DaemonProcess, *args: str) -> tuple[int, str, str]:
    """`iotflow ARGS -c CONFIG` against the running daemon: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotflow",
        *args,
        "-c",
        str(daemon.config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "IOTFLOW_API_TOKEN": "test-token"},
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def total(api: Api, cid: str, query: str = "") -> int:
    status, _, headers = await api.call("GET", f"/connections/{cid}/deadLetters?{query}")
    assert status == 200
    return int(headers["X-Total"])


async def test_refused_deliveries_are_kept_survive_restarts_and_are_resent_in_order(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    # A careless cloud that quotes the credentials back in its error answer.
    cloud.set_behaviour(Behaviour(status=400, echo=True), path="/dl")
    daemon = DaemonProcess(
        tmp_path / "dl",
        broker_url=mosquitto.url,
        connections=[connection("dl", cloud.url("/dl"), [A, B], headers={"Authorization": SECRET})],
    )
    daemons.append(daemon)
    await daemon.start()
    messages = [uplink("actility", dev, n) for n in range(1, 6) for dev in (A, B)]
    await publish(mosquitto, messages)
    async with aiohttp.ClientSession() as session:
        api = Api(session, daemon)

        async def ten() -> bool:
            return await total(api, "dl") == 10

        await until(ten)
        status, page, headers = await api.call("GET", "/connections/dl/deadLetters?perPage=3")
        assert status == 200
        assert headers["X-Total-Pages"] == "4"
        assert headers["X-Page"] == "1"
        times = [item["time"] for item in page]
        assert times == sorted(times, reverse=True)  # newest first
        letter = page[0]
        assert letter["outcome"] == "failed"
        assert letter["status"] == 400
        assert "*****" in letter["body"]
        assert "s3cr3t" not in json.dumps(page)
        assert letter["attempts"] == 1
        assert letter["firstAttemptTime"]
        assert letter["lastAttemptTime"]
        assert "document" not in letter
        status, one, _ = await api.call("GET", f"/connections/dl/deadLetters/{letter['id']}")
        assert status == 200
        assert one["document"]["DevEUI_uplink"]["DevEUI"] == letter["devEUI"]
        assert "s3cr3t" not in json.dumps(one)
        assert await total(api, "dl", f"devEUI={A.lower()}") == 5
        assert await total(api, "dl", "outcome=expired") == 0
        assert await daemon.metric("iotflow_dead_letters", connection="dl") == 10

        await _hostile(api, letter["id"])
        code, out, err = await cli(daemon, "deadletters", "list", "dl", "--per-page", "100")
        assert code == 0, err
        assert len(json.loads(out)) == 10
        assert "10 in all" in err
        code, out, err = await cli(daemon, "deadletters", "show", "dl", str(letter["id"]))
        assert code == 0, err
        assert json.loads(out)["document"]["DevEUI_uplink"]["DevEUI"] == letter["devEUI"]
        code, out, err = await cli(daemon, "deadletters", "show", "dl", "424242")
        assert code == 1
        assert "404" in err
        assert "test-token" not in out + err

        # SIGTERM, then kill -9: the letters stay, none twice.
        assert await daemon.stop() == 0
        await daemon.start()
        assert await total(api, "dl") == 10
        await daemon.kill()
        await daemon.start()
        assert await total(api, "dl") == 10

        cloud.respond(200, path="/dl")
        code, out, err = await cli(daemon, "deadletters", "resend", "dl")
        assert code == 0, err
        assert json.loads(out) == {"resent": 10}
        # A second request while they are queued re-sends nothing more.
        status, body, _ = await api.call(
            "POST", "/connections/dl/deadLetters/resend", {"all": True}
        )
        assert (status, body) == (202, {"resent": 0})
        await cloud.wait_for(10, path="/dl")

        async def none() -> bool:
            return await total(api, "dl") == 0

        await until(none)
        assert fcnts(cloud, "/dl", A) == [1, 2, 3, 4, 5]
        assert fcnts(cloud, "/dl", B) == [1, 2, 3, 4, 5]
        status, events, _ = await api.call("GET", "/connections/dl/events?perPage=100")
        assert any(e["type"] == "dead_letters_resent" for e in events)
    assert await daemon.stop() == 0


async def _hostile(api: Api, letter_id: int) -> None:
    """Hostile requests get a 4xx with the error body and change nothing."""
    cases: list[tuple[str, str, Any, int]] = [
        ("GET", "/connections/dl/deadLetters/abc", None, 404),
        ("GET", "/connections/dl/deadLetters/99999999999999999999999", None, 404),
        ("GET", "/connections/dl/deadLetters/-1", None, 404),
        ("GET", "/connections/nope/deadLetters", None, 404),
        ("GET", "/connections/dl/deadLetters?page=0", None, 400),
        ("GET", "/connections/dl/deadLetters?perPage=100000", None, 400),
        ("GET", "/connections/dl/deadLetters?page=99999999999", None, 400),
        ("GET", "/connections/dl/deadLetters?outcome=lost", None, 400),
        ("GET", "/connections/dl/deadLetters?devEUI=xyz", None, 400),
        ("DELETE", "/connections/dl/deadLetters?outcome=lost", None, 400),
        ("POST", "/connections/dl/deadLetters/resend", {}, 422),
        ("POST", "/connections/dl/deadLetters/resend", {"ids": ["x"]}, 422),
        ("POST", "/connections/dl/deadLetters/resend", {"ids": [1], "all": True}, 422),
        ("POST", "/connections/dl/deadLetters/resend", {"ids": [2**70]}, 422),
        ("POST", "/connections/dl/deadLetters/resend", {"all": True, "outcome": "x"}, 422),
        ("POST", "/connections/dl/deadLetters/resend", {"ids": list(range(1, 20000))}, 422),
        ("POST", "/connections/dl/replay", {"from": "yesterday", "to": "now"}, 422),
        (
            "POST",
            "/connections/dl/replay",
            {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
            422,
        ),
        ("POST", "/connections/dl/replay", {"from": "2026-01-01T00:00:00", "to": "x"}, 422),
        ("POST", "/connections/dl/replay", {"to": "2026-01-01T00:00:00Z"}, 422),
        (
            "POST",
            "/connections/dl/replay",
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T01:00:00Z", "devEUIs": ["zz"]},
            422,
        ),
        ("POST", "/connections/nope/replay", {"from": "x", "to": "y"}, 404),
        ("GET", "/replays/unknown-id", None, 404),
        ("GET", "/replays/0123abcd", None, 404),
        ("DELETE", "/replays/0123abcd", None, 404),
    ]
    for method, path, body, expected in cases:
        status, answer, _ = await api.call(method, path, body)
        assert status == expected, (method, path, body, status, answer)
        assert set(answer) == {"code", "message", "details"}, answer
    for raw in (b"{", b"[1]", b'"x"'):
        status, answer, _ = await api.call("POST", "/connections/dl/deadLetters/resend", raw=raw)
        assert status == 400, answer
    assert await total(api, "dl") == 10
    # Purge by filter: a device with no letters removes nothing.
    status, _, _ = await api.call("DELETE", f"/connections/dl/deadLetters?devEUI={C}")
    assert status == 204
    assert await total(api, "dl") == 10
    status, _, _ = await api.call("GET", f"/connections/dl/deadLetters/{letter_id}")
    assert status == 200


async def test_expired_deliveries_are_kept_and_resent_with_a_new_validity(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    cloud.respond(503, path="/ex")
    daemon = DaemonProcess(
        tmp_path / "ex",
        broker_url=mosquitto.url,
        connections=[connection("ex", cloud.url("/ex"), [A, B], uplinkTimeValidity="2s")],
    )
    daemons.append(daemon)
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, n) for n in range(1, 4) for dev in (A, B)])
    async with aiohttp.ClientSession() as session:
        api = Api(session, daemon)

        async def six() -> bool:
            return await total(api, "ex", "outcome=expired") == 6

        await until(six)
        status, page, _ = await api.call("GET", "/connections/ex/deadLetters")
        # Those that waited behind the circuit never reached the cloud: no status then.
        assert all(item["outcome"] == "expired" for item in page)
        assert any(item.get("status") == 503 for item in page)
        # Their uplinks are older than 2s by now: the validity counts from the re-send.
        cloud.respond(200, path="/ex")
        status, body, _ = await api.call(
            "POST", "/connections/ex/deadLetters/resend", {"all": True, "devEUI": A}
        )
        assert (status, body) == (202, {"resent": 3})
        ids = [item["id"] for item in page if item["devEUI"] == B]
        status, body, _ = await api.call(
            "POST", "/connections/ex/deadLetters/resend", {"ids": [*ids, 987654]}
        )
        assert (status, body) == (202, {"resent": 3})

        # The circuit opened by the 503s may hold a re-sent letter past its 2 s: it is then
        # the same letter again, and the operator re-sends it again, as done here.
        async def none() -> bool:
            if await total(api, "ex") == 0:
                return True
            await api.call("POST", "/connections/ex/deadLetters/resend", {"ids": ids})
            await api.call("POST", "/connections/ex/deadLetters/resend", {"all": True, "devEUI": A})
            return False

        await until(none)
        assert fcnts(cloud, "/ex", A) == [1, 2, 3]
        assert fcnts(cloud, "/ex", B) == [1, 2, 3]
    assert await daemon.stop() == 0


async def test_a_connection_made_after_an_hour_of_traffic_gets_that_hour_by_replay(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    # Accelerated: uplinks whose own times span the last hour, published at once.
    origin = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    messages = [
        uplink("actility", dev, minute, at=origin + timedelta(minutes=minute))
        for minute in range(60)
        for dev in (C, D)
    ]
    daemon = DaemonProcess(tmp_path / "rp", broker_url=mosquitto.url, delivery={"max_in_flight": 4})
    daemons.append(daemon)
    await daemon.start()
    await publish(mosquitto, messages)
    await daemon.wait_log(
        lambda e: e.get("event") == "Uplink of an unbound device", count=120, timeout=120
    )
    async with aiohttp.ClientSession() as session:
        api = Api(session, daemon)
        body = connection("late", cloud.url("/late"), [])
        del body["devices"]
        status, created, _ = await api.call("POST", "/connections", body)
        assert status == 201, created
        status, _, _ = await api.call("PUT", f"/devices/{C}", {"connections": ["late"]})
        assert status == 200
        window = {
            "from": (origin + timedelta(minutes=15)).isoformat(),
            "to": (origin + timedelta(minutes=45)).isoformat(),
        }
        # The journal is written by the spool's next group commit after the acknowledgement:
        # a deactivated connection (it sends nothing) counts it until all 120 are there.
        probe = connection("probe", cloud.url("/probe"), [])
        del probe["devices"]
        status, created, _ = await api.call("POST", "/connections", {**probe, "active": False})
        assert status == 201, created
        whole = {
            "from": origin.isoformat(),
            "to": (origin + timedelta(hours=1)).isoformat(),
            "devEUIs": [C, D],
        }

        probes: list[str] = []

        async def all_journaled() -> bool:
            status, answer, _ = await api.call("POST", "/connections/probe/replay", whole)
            assert status == 202, answer
            probes.append(answer["id"])
            return bool(answer["uplinks"] == 120)

        await until(all_journaled)
        # Deleting a connection cancels its replays (and drops what they queued).
        status, _, _ = await api.call("DELETE", "/connections/probe")
        assert status == 204

        async def cancelled() -> bool:  # the worker is removed after the answer
            _, replay, _ = await api.call("GET", f"/replays/{probes[-1]}")
            return bool(replay["state"] == "cancelled")

        await until(cancelled)
        code, out, err = await cli(
            daemon, "replay", "late", "--from", window["from"], "--to", window["to"]
        )
        assert code == 0, err
        started = json.loads(out)
        assert started["uplinks"] == 31, started
        rid = started["id"]

        async def done() -> bool:
            status, replay, _ = await api.call("GET", f"/replays/{rid}")
            assert status == 200
            return bool(replay["state"] == "done")

        await until(done, timeout=120)
        status, replay, _ = await api.call("GET", f"/replays/{rid}")
        assert replay == {
            "id": rid,
            "connectionId": "late",
            "state": "done",
            "total": 31,
            "delivered": 31,
            "expired": 0,
            "failed": 0,
            "pending": 0,
        }
        # Nothing outside the window, nothing of the unbound device, nothing twice, in order.
        assert fcnts(cloud, "/late", C) == list(range(15, 46))
        assert fcnts(cloud, "/late", D) == []
        assert len(cloud.requests_to("/late", accepted=True)) == 31
        assert (
            await daemon.metric("iotflow_replayed_total", connection="late", outcome="delivered")
            == 31
        )
        status, events, _ = await api.call("GET", "/connections/late/events?perPage=100")
        kinds = {e["type"] for e in events}
        assert {"replay_started", "replay_ended"} <= kinds
    assert await daemon.stop() == 0


async def test_a_running_replay_survives_sigterm_and_kill_9(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    origin = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    count = 40
    daemon = DaemonProcess(
        tmp_path / "rk",
        broker_url=mosquitto.url,
        delivery={"max_in_flight": 2, "drain_timeout": "1s"},
        connections=[connection("rk", cloud.url("/rk"), [A])],
    )
    daemons.append(daemon)
    cloud.respond(200, path="/rk")
    await daemon.start()
    await publish(
        mosquitto,
        [uplink("actility", A, n, at=origin + timedelta(seconds=n)) for n in range(count)],
    )
    await cloud.wait_for(count, path="/rk")
    live = len(cloud.requests_to("/rk", accepted=True))
    async with aiohttp.ClientSession() as session:
        api = Api(session, daemon)
        cloud.hang(path="/rk")
        window = {"from": origin.isoformat(), "to": (origin + timedelta(hours=1)).isoformat()}
        status, started, _ = await api.call("POST", "/connections/rk/replay", window)
        assert (status, started["uplinks"]) == (202, count), started
        rid = started["id"]
        await cloud.wait_for_requests(live + 1, path="/rk")
        assert await daemon.stop() == 0  # the hung send is given up after the drain
        cloud.release(path="/rk")
        cloud.hang(path="/rk")  # standing: after the next 5 (a standing one drops one-shots)
        cloud.respond(200, path="/rk", times=5)
        await daemon.start()
        status, replay, _ = await api.call("GET", f"/replays/{rid}")
        assert replay["state"] == "running"
        await cloud.wait_for(live + 5, path="/rk")
        await cloud.wait_for_requests(live + 6 + 1, path="/rk")
        await daemon.kill()
        cloud.release(path="/rk")
        cloud.respond(200, path="/rk")
        await daemon.start()

        async def done() -> bool:
            _, replay, _ = await api.call("GET", f"/replays/{rid}")
            return bool(replay["state"] == "done")

        await until(done, timeout=120)
        status, replay, _ = await api.call("GET", f"/replays/{rid}")
        assert (replay["total"], replay["delivered"], replay["pending"]) == (count, count, 0)
        replayed = fcnts(cloud, "/rk", A)[live:]
        # Every one of the window once at least; again only what was in flight at a crash.
        assert set(replayed) == set(range(count))
        assert len(replayed) - count <= 4
    assert await daemon.stop() == 0
