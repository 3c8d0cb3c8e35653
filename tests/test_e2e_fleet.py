"""A fleet end to end: three `iotflow run` processes sharing one PostgreSQL registry and one
Mosquitto shared subscription (docs/scale-out.md).

- a stream of uplinks with one instance killed (-9) and restarted mid-stream: none lost,
  duplicates counted, and the killed instance's spool resumes when it comes back;
- changes through one instance's API followed by every instance within a second (the worst
  case is printed), also after their LISTEN connections were killed by the server;
- the fleet seen from any instance: GET /instances, statistics summed with a breakdown;
- an alarm raised once and cleared once, with the instance that raised it killed between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import asyncpg
import orjson
import pytest

from iotflow.registry.postgres import LISTENER_NAME
from support.clouds import FakeCloud
from support.daemon import DaemonProcess, LogEvent
from support.mosquitto import Mosquitto
from support.postgres import Postgres
from support.uplinks import uplink

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}
BASE = "/iot-flow/v1"
GROUP = "fleet"
SPEED = 600  # the alarm clock: one virtual hour in six real seconds
NOTIFY = "iotflow-test/fleet-alarms"


@pytest.fixture
async def registry_url(postgres: Postgres) -> AsyncIterator[str]:
    """A database of the test's own on the suite's server, dropped afterwards."""
    name = f"fleet_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres.dsn_for(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class Fleet:
    """Instances made alike: same registry, same broker group, same connections."""

    def __init__(
        self,
        tmp_path: Path,
        broker: Mosquitto,
        registry_url: str,
        daemons: list[DaemonProcess],
        connections: list[dict[str, Any]],
        env: dict[str, str] | None = None,
        extra: str = "",
    ) -> None:
        self.instances = [
            DaemonProcess(
                tmp_path / f"instance-{n}",
                broker_url=broker.url,
                connections=connections,
                registry_url=registry_url,
                registry={"heartbeat": "300ms"},
                mqtt={"shared_group": GROUP},
                env=env,
                extra=extra,
            )
            for n in range(3)
        ]
        daemons.extend(self.instances)

    async def start(self) -> None:
        # One after the other: the first migrates, the others find the schema ready.
        for instance in self.instances:
            await instance.start()


async def api(
    daemon: DaemonProcess, method: str, path: str, body: Any = None, status: int = 200
) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{daemon.api}{BASE}{path}", json=body, headers=AUTH) as r,
    ):
        text = await r.text()
        assert r.status == status, text
        return orjson.loads(text) if text else None


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Poll what only a request can tell (another process's state) until it holds."""
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110 - the state is in another process
            await asyncio.sleep(0.05)
    assert await condition(), what


def http_connection(
    cid: str, url: str, devices: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """A connection of the config file (with its devices) or of the API (without)."""
    connection = {
        "id": cid,
        "name": f"fleet {cid}",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": url, "uplinkTimeValidity": "1h"},
        **extra,
    }
    if devices is not None:
        connection["devices"] = devices
    return connection


def key(request: Any) -> tuple[str, int]:
    inner = request.json["DevEUI_uplink"]
    return inner["DevEUI"], int(inner["FCntUp"])


def logged_at(event: LogEvent) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


# -- uplinks ----------------------------------------------------------------------------------


async def test_a_killed_instance_loses_nothing_and_its_spool_resumes(
    tmp_path: Path,
    fresh_mosquitto: Mosquitto,
    registry_url: str,
    cloud: FakeCloud,
    daemons: list[DaemonProcess],
) -> None:
    devices = [f"0018B2000000F{n:03X}" for n in range(20)]
    total = 600
    messages = [uplink("actility", dev, n) for n in range(total // 20) for dev in devices]
    fleet = Fleet(
        tmp_path,
        fresh_mosquitto,
        registry_url,
        daemons,
        [http_connection("s", cloud.url(), devices)],
    )
    await fleet.start()
    first, victim, third = fleet.instances
    cloud.hang()  # the cloud holds every request: the spools fill up

    published = 0

    async def publish(upto: int) -> None:
        nonlocal published
        async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
            while published < upto:
                await client.publish(*messages[published], qos=1)
                published += 1

    await publish(total // 3)

    async def victim_holds_some() -> bool:
        return await victim.metric("iotflow_spool_pending", connection="s") > 0

    await until(victim_holds_some, "the victim committed uplinks to its spool")
    stream = asyncio.create_task(publish(total))  # the stream goes on during the kill
    await victim.kill()
    await stream
    cloud.release()
    # The survivors deliver their own; the victim's spool waits for it.
    await victim.start()

    async def delivered_after_restart() -> bool:
        return (
            await victim.metric("iotflow_deliveries_total", connection="s", outcome="delivered") > 0
        )

    await until(delivered_after_restart, "the victim's spool resumed")

    async def everything_arrived() -> bool:
        return len({key(r) for r in cloud.accepted}) >= total

    await until(everything_arrived, "every uplink delivered", timeout=120)
    unique = {key(r) for r in cloud.accepted}
    duplicates = len(cloud.accepted) - len(unique)
    print(
        f"\nfleet stream: {total} uplinks, 3 instances, one killed -9 and restarted:"
        f" {len(unique)} delivered, {duplicates} duplicates"
    )
    assert unique == {key_of(m) for m in messages}
    per_instance = [
        await d.metric("iotflow_deliveries_total", connection="s", outcome="delivered")
        for d in (first, third)
    ]
    assert all(n > 0 for n in per_instance), "the group spread the stream"


def key_of(message: tuple[str, bytes]) -> tuple[str, int]:
    inner = orjson.loads(message[1])["DevEUI_uplink"]
    return inner["DevEUI"], int(inner["FCntUp"])


# -- changes and the fleet view ----------------------------------------------------------------


async def followed(fleet: Fleet, connection_id: str, before: datetime) -> float:
    """Seconds from `before` until the last instance started a worker for the connection."""
    latest = 0.0
    for instance in fleet.instances:
        (*_, event) = await instance.wait_log(
            lambda e: (
                e.get("event") == "Connection state changed"
                and e.get("connection") == connection_id
                and e.get("state") == "OPENED"
            ),
        )
        latest = max(latest, (logged_at(event) - before).total_seconds())
    return latest


async def test_changes_reach_every_instance_within_a_second_and_any_answers_for_the_fleet(
    tmp_path: Path,
    fresh_mosquitto: Mosquitto,
    registry_url: str,
    cloud: FakeCloud,
    postgres: Postgres,
    daemons: list[DaemonProcess],
) -> None:
    devices = [f"0018B2000000E{n:03X}" for n in range(6)]
    fleet = Fleet(
        tmp_path,
        fresh_mosquitto,
        registry_url,
        daemons,
        [http_connection("s", cloud.url(), devices)],
    )
    await fleet.start()
    first, second, third = fleet.instances
    worst = 0.0
    for n, origin in enumerate(fleet.instances):
        before = datetime.now(UTC)
        await api(origin, "POST", "/connections", http_connection(f"c{n}", cloud.url()), 201)
        worst = max(worst, await followed(fleet, f"c{n}", before))

    # The server kills every LISTEN connection: each instance reconnects, reloads, and
    # follows the next change as fast as before.
    admin = await asyncpg.connect(registry_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            LISTENER_NAME,
        )
    finally:
        await admin.close()
    assert killed == 3
    for instance in fleet.instances:
        await instance.wait_log(
            lambda e: e.get("event") == "Registry change feed listening", count=2
        )
    after_loss = 0.0
    for n, origin in enumerate(fleet.instances):
        before = datetime.now(UTC)
        await api(origin, "POST", "/connections", http_connection(f"d{n}", cloud.url()), 201)
        after_loss = max(after_loss, await followed(fleet, f"d{n}", before))
    print(
        f"\nchange followed by all 3 instances: worst {worst * 1000:.0f} ms;"
        f" after their LISTEN connections were killed: worst {after_loss * 1000:.0f} ms"
    )
    assert worst < 1.0
    assert after_loss < 1.0

    # Any instance lists the fleet, itself marked.
    for instance in fleet.instances:
        listed = await api(instance, "GET", "/instances")
        assert [i["id"] for i in listed] == sorted(d.client_id for d in fleet.instances)
        assert all(i["alive"] for i in listed)
        assert [i["id"] for i in listed if i["answering"]] == [instance.client_id]
        assert {i["apiUrl"] for i in listed} == {d.api for d in fleet.instances}
        assert {i["schemaVersion"] for i in listed} == {5}

    # Statistics: the fleet's sum, instance by instance.
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
        for n in range(60):
            await client.publish(*uplink("actility", devices[n % 6], n), qos=1)
    await cloud.wait_for(60)

    async def summed() -> bool:
        stats = (await api(third, "GET", "/connections/s"))["statistics"]
        return stats["delivered"] == 60 and len(stats["instances"]) == 3

    await until(summed, "the fleet's statistics add up")
    stats = (await api(third, "GET", "/connections/s"))["statistics"]
    shares = {i["instance"]: i["delivered"] for i in stats["instances"]}
    for instance in fleet.instances:
        delivered = await instance.metric(
            "iotflow_deliveries_total", connection="s", outcome="delivered"
        )
        assert shares[instance.client_id] == delivered
    assert sum(shares.values()) == 60
    (listed,) = [c for c in await api(first, "GET", "/connections") if c["id"] == "s"]
    assert listed["statistics"]["instances"]

    # A stopped instance leaves the fleet (and its share with it).
    assert await second.stop() == 0
    listed = await api(first, "GET", "/instances")
    assert second.client_id not in [i["id"] for i in listed]


async def test_a_single_sqlite_instance_shows_no_fleet(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, daemons: list[DaemonProcess]
) -> None:
    daemon = DaemonProcess(
        tmp_path / "alone",
        broker_url=mosquitto.url,
        connections=[http_connection("s", cloud.url(), ["0018B2000000D001"])],
    )
    daemons.append(daemon)
    await daemon.start()
    (me,) = await api(daemon, "GET", "/instances")
    assert me["id"] == daemon.client_id
    assert me["answering"]
    assert me["alive"]
    assert "instances" not in (await api(daemon, "GET", "/connections/s"))["statistics"]
    # Dead letters: this instance's; `?instance=` may name it, and nothing else.
    assert await api(daemon, "GET", f"/connections/s/deadLetters?instance={me['id']}") == []
    await api(daemon, "GET", "/connections/s/deadLetters?instance=other", status=404)
    assert not [e for e in daemon.logs if e.get("event") == "Joined the fleet"]


# -- alarms -------------------------------------------------------------------------------


@pytest.fixture
async def notifications(
    fresh_mosquitto: Mosquitto,
) -> AsyncIterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
        await client.subscribe(NOTIFY, qos=1)

        async def pump() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append(orjson.loads(message.payload))

        task = asyncio.create_task(pump())
        yield received
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_alarm_is_raised_once_and_cleared_once_across_a_killed_instance(
    tmp_path: Path,
    fresh_mosquitto: Mosquitto,
    registry_url: str,
    cloud: FakeCloud,
    daemons: list[DaemonProcess],
    notifications: list[dict[str, Any]],
) -> None:
    dev = "0018B2000000C001"
    now = datetime.now(UTC)
    watched = http_connection(
        "watched",
        cloud.url(),
        [dev],
        alarms=[
            {
                "startTime": (now - timedelta(minutes=1)).isoformat(),
                "endTime": (now + timedelta(hours=20)).isoformat(),
                "timezone": "Europe/Paris",
                "uplinkRateMinPerHour": 30,
                "message": "Fleet devices went quiet",
            }
        ],
    )
    # One virtual clock for the fleet: the instances agree on the minute.
    env = {"IOTFLOW_TEST_CLOCK_SPEED": str(SPEED), "IOTFLOW_TEST_CLOCK_ORIGIN": str(time.time())}
    fleet = Fleet(
        tmp_path,
        fresh_mosquitto,
        registry_url,
        daemons,
        [watched],
        env=env,
        extra=f'[alarms]\nnotify_topic = "{NOTIFY}"\n',
    )
    await fleet.start()

    def raised(e: LogEvent) -> bool:
        return e.get("event") == "Alarm raised"

    def cleared(e: LogEvent) -> bool:
        return e.get("event") == "Alarm cleared"

    # Nothing is published: after an observed hour, one instance raises it.
    raiser = await first_to_log(fleet.instances, raised)
    # Killed once its notification is out (published after the raise is stored: a kill
    # between the two loses the notification, never the raise or its event).
    await until(lambda: _have(notifications, 1), "the raise notified")
    await raiser.kill()
    survivors = [d for d in fleet.instances if d is not raiser]

    # The devices come back (120 an hour): a survivor clears it.
    async def publish() -> None:
        async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
            n = 0
            while True:
                n += 1
                await client.publish(*uplink("actility", dev, n), qos=1)
                await asyncio.sleep(30 / SPEED)  # pacing the device, not synchronising

    devices = asyncio.create_task(publish())
    try:
        clearer = await first_to_log(survivors, cleared)
        # Evaluated again by every survivor after the clear: nobody announces it twice.
        for instance in survivors:
            count = len([e for e in instance.logs if e.get("event") == "Alarm evaluated"])
            await instance.wait_log(lambda e: e.get("event") == "Alarm evaluated", count=count + 2)
    finally:
        devices.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await devices
    everyone = [e for d in fleet.instances for e in d.logs]
    assert len([e for e in everyone if raised(e)]) == 1
    assert len([e for e in everyone if cleared(e)]) == 1
    assert clearer is not raiser
    events = await api(survivors[0], "GET", "/connections/watched/events?perPage=100")
    kinds = [e["type"] for e in events]
    assert (kinds.count("alarm_raised"), kinds.count("alarm_cleared")) == (1, 1)
    assert [n["type"] for n in notifications] == ["alarm_raised", "alarm_cleared"]
    for instance in survivors:
        assert await api(instance, "GET", "/alarms") == []
    print(
        f"\nalarm: raised by {raiser.client_id} (then killed -9),"
        f" cleared by {clearer.client_id}; 1 raise, 1 clear across 3 instances"
    )


async def _have(notes: list[dict[str, Any]], count: int) -> bool:
    return len(notes) >= count


async def first_to_log(
    instances: list[DaemonProcess], predicate: Callable[[LogEvent], bool]
) -> DaemonProcess:
    """The instance that logs a matching event first (the others are left waiting)."""
    waits = {asyncio.ensure_future(d.wait_log(predicate, timeout=90)): d for d in instances}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    winner = next(iter(done))
    winner.result()
    return waits[winner]


# -- dead letters and replays, held by each instance -----------------------------------------


async def test_dead_letters_and_replays_of_the_whole_fleet_from_any_instance(
    tmp_path: Path,
    fresh_mosquitto: Mosquitto,
    registry_url: str,
    cloud: FakeCloud,
    daemons: list[DaemonProcess],
) -> None:
    devices = [f"0018B2000000B{n:03X}" for n in range(6)]
    cloud.respond(400, path="/dl", body={"error": "unknown device"})
    fleet = Fleet(
        tmp_path,
        fresh_mosquitto,
        registry_url,
        daemons,
        [http_connection("dl", cloud.url("/dl"), devices)],
    )
    await fleet.start()
    first, second, third = fleet.instances
    started = datetime.now(UTC) - timedelta(minutes=1)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
        for n in range(30):
            await client.publish(*uplink("actility", devices[n % 6], n), qos=1)

    async def thirty() -> bool:
        return len(await api(third, "GET", "/connections/dl/deadLetters?perPage=100")) == 30

    await until(thirty, "every refused delivery is a dead letter somewhere in the fleet")
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{first.api}{BASE}/connections/dl/deadLetters?perPage=7&page=2", headers=AUTH
        ) as r,
    ):
        page = await r.json()
        assert r.headers["X-Total"] == "30"
        assert r.headers["X-Total-Pages"] == "5"
        assert "X-Iotflow-Unreachable" not in r.headers
    assert len(page) == 7
    letters = await api(first, "GET", "/connections/dl/deadLetters?perPage=100")
    owners = {letter["instance"] for letter in letters}
    assert owners <= {d.client_id for d in fleet.instances}
    assert len(owners) > 1, "the group spread the uplinks"
    assert len({(x["instance"], x["id"]) for x in letters}) == 30
    times = [x["time"] for x in letters]
    assert times == sorted(times, reverse=True)
    # One letter, from its owner, asked through another instance.
    held = next(x for x in letters if x["instance"] != first.client_id)
    one = await api(
        first, "GET", f"/connections/dl/deadLetters/{held['id']}?instance={held['instance']}"
    )
    assert one["devEUI"] == held["devEUI"]
    assert one["document"]["DevEUI_uplink"]["DevEUI"] == held["devEUI"]
    await api(first, "GET", "/connections/dl/deadLetters?instance=nobody", status=404)
    # Re-sent by every owner at one call; delivered, they leave the dead letters.
    cloud.respond(200, path="/dl")
    assert await api(first, "POST", "/connections/dl/deadLetters/resend", {"all": True}, 202) == {
        "resent": 30
    }
    await cloud.wait_for(30, path="/dl")

    async def none_left() -> bool:
        return len(await api(second, "GET", "/connections/dl/deadLetters")) == 0

    await until(none_left, "the re-sent letters left")
    # A replay of the window: each instance replays what it journaled.
    window = {"from": started.isoformat(), "to": (datetime.now(UTC)).isoformat()}
    replay = await api(second, "POST", "/connections/dl/replay", window, 202)
    assert replay["uplinks"] == 30
    assert {i["instance"] for i in replay["instances"]} == owners
    await cloud.wait_for(60, path="/dl")
    elsewhere = next(i for i in replay["instances"] if i["instance"] != third.client_id)
    seen = await api(third, "GET", f"/replays/{elsewhere['id']}")
    assert seen["instance"] == elsewhere["instance"]
    assert seen["total"] == elsewhere["uplinks"]
    # Purged everywhere at one call.
    cloud.respond(400, path="/dl")
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
        for n in range(30, 36):
            await client.publish(*uplink("actility", devices[n % 6], n), qos=1)

    async def six() -> bool:
        return len(await api(first, "GET", "/connections/dl/deadLetters")) == 6

    await until(six, "new dead letters")
    await api(third, "DELETE", "/connections/dl/deadLetters", status=204)
    assert await api(first, "GET", "/connections/dl/deadLetters") == []
