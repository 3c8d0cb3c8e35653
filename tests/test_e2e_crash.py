"""At least once across crashes: kill -9 of the daemon, restart of the broker, a full disk."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.smalldisk import small_disk
from support.uplinks import uplink

pytestmark = pytest.mark.slow


def connection(url: str, devices: list[str]) -> dict[str, Any]:
    return {
        "id": "sink",
        "name": "crash test",
        "connectorId": "actility-http-iot",
        "devices": devices,
        "configuration": {"destinationURL": url, "uplinkTimeValidity": "1h"},
    }


def keys(cloud: FakeCloud) -> list[tuple[str, int]]:
    return [
        (r.json["DevEUI_uplink"]["DevEUI"], r.json["DevEUI_uplink"]["FCntUp"])
        for r in cloud.accepted
    ]


async def test_kill_9_in_the_middle_of_a_stream_loses_nothing(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    devices = [f"70B3D57ED00{n:05X}" for n in range(40)]
    total = 3000
    daemon = DaemonProcess(
        tmp_path / "crash",
        broker_url=mosquitto.url,
        connections=[connection(cloud.url("/all"), devices)],
    )
    daemons.append(daemon)
    await daemon.start()
    messages = [uplink("chirpstack", devices[n % len(devices)], n) for n in range(total)]

    async def publish_all() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1)

    publisher = asyncio.create_task(publish_all())
    await cloud.wait_for(300, timeout=120)
    await daemon.kill()  # SIGKILL: no drain, no commit, no goodbye
    delivered_before = len(cloud.accepted)
    await publisher  # the broker keeps them for our persistent session meanwhile
    await daemon.start()
    await cloud.wait_for(total, timeout=300)  # at least; duplicates are allowed
    expected = {(devices[n % len(devices)], n) for n in range(total)}
    await asyncio.wait_for(_all_seen(cloud, expected), 300)
    seen = keys(cloud)
    assert set(seen) == expected, f"missing {len(expected - set(seen))} uplinks"
    duplicates = len(seen) - len(set(seen))
    print(f"delivered before kill: {delivered_before}, duplicates after restart: {duplicates}")
    assert await daemon.stop() == 0


async def _all_seen(cloud: FakeCloud, expected: set[tuple[str, int]]) -> None:
    while not expected <= set(keys(cloud)):
        await cloud.wait_for(len(cloud.accepted) + 1, timeout=300)


async def test_broker_restart_reconnects_resubscribes_and_loses_nothing(
    tmp_path: Path,
    cloud: FakeCloud,
    fresh_mosquitto: Mosquitto,
    daemons: list[DaemonProcess],
) -> None:
    dev = "0018B20000000E01"
    daemon = DaemonProcess(
        tmp_path / "broker",
        broker_url=fresh_mosquitto.url,
        connections=[connection(cloud.url("/b"), [dev])],
    )
    daemons.append(daemon)
    await daemon.start()
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
        await client.publish(*uplink("actility", dev, 1), qos=1)
    await cloud.wait_for(1)
    fresh_mosquitto.restart()
    await daemon.wait_log(lambda e: e.get("event") == "Broker connection lost")
    await daemon.wait_log(lambda e: e.get("event") == "Consuming uplinks", count=2, timeout=60)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as client:
        for n in range(2, 12):
            await client.publish(*uplink("actility", dev, n), qos=1)
    received = await cloud.wait_for(11)
    assert sorted({k[1] for k in keys(cloud)}) == list(range(1, 12))
    assert len(received) >= 11
    assert await daemon.metric("iotflow_mqtt_connected") == 1


UPLINKS_WHILE_DOWN = 25


async def test_uplinks_published_while_the_daemon_is_down_are_delivered(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    dev = "0018B20000000E02"
    daemon = DaemonProcess(
        tmp_path / "down",
        broker_url=mosquitto.url,
        connections=[connection(cloud.url("/d"), [dev])],
    )
    daemons.append(daemon)
    await daemon.start()
    assert await daemon.stop() == 0
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        for n in range(UPLINKS_WHILE_DOWN):
            await client.publish(*uplink("tts", dev, n), qos=1)
    await daemon.start()
    await cloud.wait_for(UPLINKS_WHILE_DOWN)
    assert sorted(k[1] for k in keys(cloud)) == list(range(UPLINKS_WHILE_DOWN))


Factory = Callable[..., DaemonProcess]


def warnings_since(daemon: DaemonProcess, start: int) -> list[str]:
    return [
        str(e.get("event"))
        for e in daemon.logs[start:]
        if e.get("level") in ("warning", "error", "critical")
    ]


async def publish(mosquitto: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def test_full_disk_holds_uplinks_in_the_broker_and_resumes_when_space_returns(
    tmp_path: Path, cloud: FakeCloud, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    dev = "0018B20000000F01"
    with small_disk(tmp_path / "small", "2m") as disk:
        daemon = DaemonProcess(
            tmp_path / "full",
            broker_url=mosquitto.url,
            connections=[connection(cloud.url("/f"), [dev])],
            spool_path=disk.path / "spool.db",
        )
        daemons.append(daemon)
        await daemon.start()
        await publish(mosquitto, [uplink("chirpstack", dev, 0)])
        await cloud.wait_for(1)

        disk.fill()
        start = len(daemon.logs)
        await publish(mosquitto, [uplink("chirpstack", dev, n) for n in range(1, 21)])
        await daemon.wait_log(lambda e: e.get("event") == "Spool cannot commit")
        # The spool retries with backoff (debug lines), quietly: no flood, no reconnects.
        await daemon.wait_log(lambda e: e.get("event") == "Spool write failed", count=4)
        assert warnings_since(daemon, start) == ["Spool cannot commit"]
        assert await daemon.metric("iotflow_spool_writable") == 0
        assert await daemon.metric("iotflow_mqtt_connected") == 1
        assert len(cloud.accepted) == 1  # nothing committed, nothing acknowledged

        disk.free_up()
        await daemon.wait_log(lambda e: e.get("event") == "Spool commits again")
        await asyncio.wait_for(_all_seen(cloud, {(dev, n) for n in range(21)}), 60)
        assert await daemon.metric("iotflow_spool_writable") == 1
        assert warnings_since(daemon, start) == ["Spool cannot commit"]
        assert await daemon.stop() == 0


@pytest.mark.parametrize("on_small_disk", ["spool", "registry and spool"])
async def test_sigterm_while_the_disk_is_full_exits_non_zero_and_loses_nothing(
    tmp_path: Path,
    cloud: FakeCloud,
    mosquitto: Mosquitto,
    daemons: list[DaemonProcess],
    on_small_disk: str,
) -> None:
    dev = "0018B20000000F02"
    drain = 3.0
    with small_disk(tmp_path / "small", "4m") as disk:
        # As on a gateway, where /var/lib/iotflow holds both: the registry full too.
        workdir = disk.path / "state" if on_small_disk != "spool" else tmp_path / "sigterm"
        daemon = DaemonProcess(
            workdir,
            broker_url=mosquitto.url,
            client_id=f"iotflow-test-sigterm-{len(on_small_disk)}",
            connections=[connection(cloud.url("/s"), [dev])],
            spool_path=disk.path / "spool.db",
            delivery={"drain_timeout": f"{drain:g}s"},
        )
        daemons.append(daemon)
        await daemon.start()
        await publish(mosquitto, [uplink("tts", dev, 0)])
        await cloud.wait_for(1)

        disk.fill()
        await publish(mosquitto, [uplink("tts", dev, n) for n in range(1, 31)])
        await daemon.wait_log(lambda e: "disk is full" in str(e.get("error")))
        stopping = asyncio.get_running_loop().time()
        code = await daemon.stop(timeout=drain + 10)
        elapsed = asyncio.get_running_loop().time() - stopping
        print(f"SIGTERM while full: exit code {code} after {elapsed:.2f}s (drain_timeout {drain}s)")
        assert code != 0
        assert elapsed < drain, f"shutdown took {elapsed:.1f}s"
        # Only the spool failed: every other step still ran, or the process would not exit.
        failed = [e for e in daemon.logs if e.get("event") == "Shutdown step failed"]
        print(f"failed steps: {[(e['step'], e['error']) for e in failed]}")
        assert "spool" in [e["step"] for e in failed]
        if on_small_disk == "spool":
            assert [e["step"] for e in failed] == ["spool"]
        assert any(e.get("event") == "Stopped with errors" for e in daemon.logs)
        assert len(cloud.accepted) == 1

        # Space returns, iotflow starts again: the broker still had every uplink.
        disk.free_up()
        await daemon.start()
        await asyncio.wait_for(_all_seen(cloud, {(dev, n) for n in range(31)}), 60)
        assert await daemon.stop() == 0
