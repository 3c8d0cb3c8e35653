"""End to end: `iotflow run` as a process, a real Mosquitto, clouds as local HTTP servers."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest

from support.clouds import FakeCloud, datacake, qubitro
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import payload_hex, uplink

pytestmark = pytest.mark.slow

DEVICES = {
    "actility": "0018B20000000B20",
    "chirpstack": "A840414FC182F6C2",
    "tts": "70B3D57ED005A1B2",
}
TOKEN = "dc-secret-token"
PROJECT, SIGNING_KEY = "aa62ebe1-7ff3-4d05-baec-e6ff2edf34a4", "qubitro-signing-key"


def http_connection(
    cid: str, url: str, *, brand: str | None = None, devices: list[str], **config: Any
) -> dict[str, Any]:
    connection: dict[str, Any] = {
        "id": cid,
        "name": f"test {cid}",
        "connectorId": "actility-http-iot",
        "devices": devices,
        "configuration": {"destinationURL": url, **config},
    }
    if brand:
        connection["brand"] = brand
    return connection


def three_clouds(cloud: FakeCloud, devices: list[str], **config: Any) -> list[dict[str, Any]]:
    return [
        http_connection(
            "datacake",
            cloud.url("/datacake"),
            brand="DATACAKE",
            devices=devices,
            headers={"Authorization": f"Token {TOKEN}"},
            **config,
        ),
        http_connection(
            "cayenne", cloud.url("/cayenne"), brand="CAYENNE", devices=devices, **config
        ),
        http_connection(
            "qubitro",
            cloud.url("/qubitro"),
            brand="QUBITRO",
            devices=devices,
            headers={"projectId": PROJECT, "webhookSigningKey": SIGNING_KEY},
            **config,
        ),
    ]


@pytest.fixture
async def daemon_factory(
    tmp_path: Path, mosquitto: Mosquitto
) -> AsyncIterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(name: str = "d", broker: Mosquitto | None = None, **kw: Any) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / name, broker_url=(broker or mosquitto).url, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.close()


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]], *, qos: int = 1) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=qos)


async def test_each_format_reaches_three_clouds_with_their_headers(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    cloud.require(datacake(TOKEN), path="/datacake")
    cloud.require(qubitro(PROJECT, SIGNING_KEY), path="/qubitro")
    daemon = daemon_factory(connections=three_clouds(cloud, list(DEVICES.values())))
    await daemon.start()
    messages = {fmt: uplink(fmt, dev, 7) for fmt, dev in DEVICES.items()}
    await publish(mosquitto, list(messages.values()))
    await cloud.wait_for(9)
    for path in ("/datacake", "/cayenne", "/qubitro"):
        received = cloud.requests_to(path, accepted=True)
        assert len(received) == 3
        by_device = {r.json["DevEUI_uplink"]["DevEUI"]: r for r in received}
        assert set(by_device) == set(DEVICES.values())
        for fmt, dev in DEVICES.items():
            request = by_device[dev]
            assert request.headers["Content-Type"] == "application/json"
            inner = request.json["DevEUI_uplink"]
            assert inner["payload_hex"] == payload_hex(fmt)
            assert inner["FCntUp"] == 7
            if fmt == "actility":
                # ThingPark's own document passes through unchanged.
                assert request.json == orjson.loads(messages[fmt][1])
            else:
                assert {"Time", "FPort", "LrrRSSI", "LrrSNR", "Lrrs"} <= set(inner)
    assert cloud.requests_to("/datacake")[0].headers["Authorization"] == f"Token {TOKEN}"
    assert cloud.requests_to("/qubitro")[0].headers["webhookSigningKey"] == SIGNING_KEY
    # No secret reaches the log.
    assert TOKEN not in "\n".join(daemon.output)
    assert SIGNING_KEY not in "\n".join(daemon.output)
    assert (
        await daemon.metric("iotflow_deliveries_total", connection="qubitro", outcome="delivered")
        == 3
    )
    assert await daemon.metric("iotflow_uplinks_received_total", format="tts") == 1
    assert await daemon.stop() == 0


async def test_send_metadata_and_raw_decoded(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "A840414FC182F6C3"
    daemon = daemon_factory(
        connections=[
            http_connection("meta", cloud.url("/meta"), devices=[dev], sendMetadata=True),
            http_connection("raw", cloud.url("/raw"), devices=[dev], sendRawDecodedFormat=True),
        ]
    )
    await daemon.start()
    await publish(mosquitto, [uplink("chirpstack", dev, 1)])
    await cloud.wait_for(2)
    (meta,) = cloud.requests_to("/meta")
    assert meta.json["DevEUI"] == dev
    assert "DevEUI_uplink" not in meta.json
    (raw,) = cloud.requests_to("/raw")
    assert raw.json == {"temperature": 22.2, "humidity": 37, "light": 165, "motion": 4, "vdd": 3556}


async def test_a_cloud_that_recovers_gets_everything(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "0018B20000000C01"
    cloud.respond(503, path="/flaky")
    daemon = daemon_factory(
        connections=[http_connection("flaky", cloud.url("/flaky"), devices=[dev])]
    )
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, n) for n in range(20)])
    await cloud.wait_for_requests(5, path="/flaky")
    cloud.respond(200, path="/flaky")
    received = await cloud.wait_for(20, path="/flaky")
    counts = sorted({r.json["DevEUI_uplink"]["FCntUp"] for r in received})
    assert counts == list(range(20))
    # One device, one connection: delivered in the order of arrival.
    assert [r.json["DevEUI_uplink"]["FCntUp"] for r in received] == list(range(20))
    assert await daemon.metric("iotflow_delivery_retries_total", connection="flaky") >= 1


async def test_expired_and_failed_deliveries(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "0018B20000000C02"
    cloud.respond(503, path="/down")
    cloud.respond(400, path="/refuses", body={"error": "unknown device"})
    daemon = daemon_factory(
        connections=[
            http_connection("down", cloud.url("/down"), devices=[dev], uplinkTimeValidity="2s"),
            http_connection("refuses", cloud.url("/refuses"), devices=[dev]),
        ]
    )
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, n) for n in range(3)])
    await daemon.wait_log(lambda e: e.get("event") == "Delivery expired", count=3)
    await daemon.wait_log(lambda e: e.get("event") == "Delivery failed", count=3)
    assert len(cloud.requests_to("/refuses")) == 3  # one attempt each: a 400 is final
    assert (
        await daemon.metric("iotflow_deliveries_total", connection="down", outcome="expired") == 3
    )
    assert (
        await daemon.metric("iotflow_deliveries_total", connection="refuses", outcome="failed") == 3
    )
    assert await daemon.metric("iotflow_spool_pending", connection="down") == 0


async def test_a_hung_cloud_does_not_delay_another(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    devices = [f"0018B20000000D{n:02X}" for n in range(10)]
    cloud.hang(path="/hung")
    daemon = daemon_factory(
        connections=[
            http_connection("hung", cloud.url("/hung"), devices=devices),
            http_connection("fine", cloud.url("/fine"), devices=devices),
        ],
        delivery={"timeout": "120s", "max_in_flight": 4},
    )
    await daemon.start()
    await publish(mosquitto, [uplink("tts", dev, n) for n, dev in enumerate(devices * 5)])
    # All 50 reach the healthy cloud while the other still holds its first requests.
    await cloud.wait_for(50, path="/fine")
    assert len(cloud.requests_to("/hung")) == 4  # its max_in_flight, all hanging
    cloud.release(path="/hung")
    await cloud.wait_for(50, path="/hung")


async def test_garbage_is_counted_and_dropped(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "0018B20000000C03"
    daemon = daemon_factory(connections=[http_connection("ok", cloud.url("/ok"), devices=[dev])])
    await daemon.start()
    good = uplink("actility", dev, 1)
    garbage = [
        ("tpx/things/x/uplink", b"\xff\xfe not json"),
        ("tpx/things/x/uplink", b"[1, 2, 3]"),
        ("tpx/things/x/uplink", b'{"DevEUI_uplink": {"DevEUI": "XYZ", "FPort": 1}}'),
        ("tpx/things/x/uplink", b'{"something": "else"}'),
        ("tpx/things/x/uplink", b'{"DevEUI_uplink": ' + b'"' + b"a" * 200_000 + b'"}'),
        ("application/1/device/2/event/up", b'{"deviceInfo": {"devEui": 12}}'),
    ]
    await publish(mosquitto, [garbage[0], good, *garbage[1:], uplink("actility", dev, 2)])
    received = await cloud.wait_for(2, path="/ok")
    assert [r.json["DevEUI_uplink"]["FCntUp"] for r in received] == [1, 2]
    rejected = {
        reason: await daemon.metric("iotflow_uplinks_rejected_total", reason=reason)
        for reason in ("not_json", "wrong_shape", "bad_dev_eui", "too_large")
    }
    assert rejected["not_json"] == 2
    assert rejected["too_large"] == 1
    assert rejected["bad_dev_eui"] + rejected["wrong_shape"] == 3
    lines = [e for e in daemon.logs if e.get("event") == "Uplink rejected"]
    assert len(lines) == 6
    assert all(len(e["payload"]) <= 200 and e["topic"] for e in lines)
    assert daemon.process is not None
    assert daemon.process.returncode is None


async def test_unbound_devices_are_counted_as_unrouted(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    daemon = daemon_factory(connections=[http_connection("ok", cloud.url("/ok"), devices=[])])
    await daemon.start()
    await publish(mosquitto, [uplink("chirpstack", "1122334455667788", 1)])
    await daemon.wait_log(lambda e: e.get("event") == "Uplink of an unbound device")
    assert await daemon.metric("iotflow_uplinks_unrouted_total") == 1


async def test_sighup_applies_a_changed_config_and_keeps_the_old_on_error(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "0018B20000000C04"
    daemon = daemon_factory(connections=[http_connection("c", cloud.url("/first"), devices=[dev])])
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, 1)])
    await cloud.wait_for(1, path="/first")

    # A changed config: the connection now posts elsewhere, and a second one appears.
    daemon.write_config(
        [
            http_connection("c", cloud.url("/second"), devices=[dev]),
            http_connection("new", cloud.url("/new"), devices=[dev]),
        ]
    )
    await daemon.signal(signal.SIGHUP)
    await daemon.wait_log(lambda e: e.get("event") == "Config reloaded")
    await publish(mosquitto, [uplink("actility", dev, 2)])
    await cloud.wait_for(1, path="/second")
    await cloud.wait_for(1, path="/new")

    # A broken config: refused, the running one stays.
    broken = daemon.config_path.read_text().replace('retry_max = "1s"', 'retry_max = "soon"')
    daemon.write_config([], text=broken)
    await daemon.signal(signal.SIGHUP)
    refused = await daemon.wait_log(
        lambda e: e.get("event") == "Reload refused; keeping the running config"
    )
    assert any(p.startswith("delivery.retry_max:") for p in refused[0]["problems"])
    await publish(mosquitto, [uplink("actility", dev, 3)])
    await cloud.wait_for(2, path="/second")
    assert await daemon.metric("iotflow_config_reloads_total", result="failure") == 1
    assert await daemon.metric("iotflow_config_reloads_total", result="success") == 1
    assert len(cloud.requests_to("/first")) == 1
    assert await daemon.stop() == 0


async def test_sigterm_drains_and_resumes_from_the_spool(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "0018B20000000C05"
    cloud.respond(503, path="/later")
    connections = [http_connection("later", cloud.url("/later"), devices=[dev])]
    daemon = daemon_factory(connections=connections)
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, n) for n in range(5)])
    await cloud.wait_for_requests(1, path="/later")
    assert await daemon.stop() == 0
    # What was not delivered stayed in the spool; the next run sends it.
    cloud.respond(200, path="/later")
    await daemon.start()
    received = await cloud.wait_for(5, path="/later")
    assert sorted(r.json["DevEUI_uplink"]["FCntUp"] for r in received) == list(range(5))


async def test_header_templates_and_health_endpoints(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    dev = "0018B20000000C06"
    daemon = daemon_factory(
        connections=[
            http_connection(
                "tpl",
                cloud.url("/tpl"),
                devices=[dev],
                headers={"X-Device": "{DevEUI}", "X-Name": "{CustomerData.name|DevEUI|'none'}"},
            )
        ]
    )
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.api}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{daemon.api}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"] == {"broker": True, "registry": True}
    await publish(mosquitto, [uplink("actility", dev, 1)])
    (request,) = await cloud.wait_for(1, path="/tpl")
    assert request.headers["X-Device"] == dev
    assert request.headers["X-Name"] == "My Demo Device"


async def test_readyz_reports_a_broker_that_is_gone(
    daemon_factory: Callable[..., DaemonProcess], fresh_mosquitto: Mosquitto
) -> None:
    daemon = daemon_factory(broker=fresh_mosquitto)
    await daemon.start()
    fresh_mosquitto.stop()
    await daemon.wait_log(lambda e: e.get("event") == "Broker connection lost")
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.api}/readyz") as r:
        assert r.status == 503
        assert (await r.json())["checks"]["broker"] is False
    assert await daemon.metric("iotflow_mqtt_connected") == 0


async def test_a_shared_group_splits_uplinks_between_instances(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    devices = [f"0018B20000000F{n:02X}" for n in range(8)]
    connections = [http_connection("shared", cloud.url("/shared"), devices=devices)]
    group = '[mqtt]\nshared_group = "fleet"\n'
    first = daemon_factory("one", connections=connections)
    second = daemon_factory("two", connections=connections)
    for daemon in (first, second):
        # The group goes into the [mqtt] table the harness writes.
        daemon.write_config(connections, daemon.config_text(connections).replace("[mqtt]\n", group))
        await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, n) for n, dev in enumerate(devices * 10)])
    received = await cloud.wait_for(80, path="/shared")
    assert (
        len(
            {
                (r.json["DevEUI_uplink"]["DevEUI"], r.json["DevEUI_uplink"]["FCntUp"])
                for r in received
            }
        )
        == 80
    )
    assert len(received) == 80  # each uplink went to one instance only
    counts = [
        await d.metric("iotflow_deliveries_total", connection="shared", outcome="delivered")
        for d in (first, second)
    ]
    assert sum(counts) == 80
    assert all(c > 0 for c in counts)
