"""End to end: `iotflow run` as a process routing to a second, TLS-only Mosquitto.

The source broker is the suite's plain Mosquitto; the cloud is a Mosquitto of this module
whose listener requires client certificates made by the test (`support.tls`). The
certificates reach the daemon as PEM text inside the provisioned connection, as the
connections API would carry them.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest

from iotflow.sinks.mqtt import TlsMaterial, tls_context
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.tls import Identity, Pki, make_pki
from support.uplinks import uplink

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture
def cloud(pki: Pki, request: pytest.FixtureRequest) -> Iterator[Mosquitto]:
    """The cloud broker, the test's own (tests stop and restart it)."""
    broker = Mosquitto()
    broker.extra_config = pki.broker_listener_config(broker.directory)
    with broker:
        yield broker
        # Shown only when the test fails.
        request.node.add_report_section("teardown", "cloud broker log", broker.log_text())


def mqtt_connection(
    cid: str, cloud: Mosquitto, pki: Pki, devices: list[str], identity: Identity, **config: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "name": f"test {cid}",
        "connectorId": "actility-mqtt-iot",
        "devices": devices,
        "configuration": {
            "hostName": f"{cloud.host}:{cloud.port}",
            "protocol": "SSL",
            "trustedCaCertficate": pki.ca,
            "certificate": identity.certificate,
            "privateKey": identity.private_key,
            "downlinkEnabled": False,
            **config,
        },
    }


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


class CloudApplication:
    """What reads the cloud broker: a persistent QoS 1 session that survives its restarts.

    Its session is kept by the broker (clean session off, persistence on), so what arrives
    while it reconnects after a restart is queued for it, not lost to the count.
    """

    def __init__(self, broker: Mosquitto, tls: ssl.SSLContext, topic: str) -> None:
        self.broker = broker
        self.tls = tls
        self.topic = topic
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    identifier="cloud-application",
                    clean_session=False,
                    tls_context=self.tls,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self._subscribed.set()
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.messages.append((message.topic.value, orjson.loads(payload)))
                        self._changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)  # the broker is restarting; a bounded retry

    async def __aenter__(self) -> CloudApplication:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(15):
            await self._subscribed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_until(
        self, done: Callable[[list[tuple[str, dict[str, Any]]]], bool], timeout: float = 60
    ) -> list[tuple[str, dict[str, Any]]]:
        try:
            async with asyncio.timeout(timeout):
                while not done(self.messages):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"cloud got {len(self.messages)} messages") from None
        return self.messages


def application_tls(pki: Pki) -> ssl.SSLContext:
    return tls_context(
        TlsMaterial(
            trusted_ca=pki.ca,
            certificate=pki.client.certificate,
            private_key=pki.client.private_key,
        )
    )


async def connection(daemon: DaemonProcess, cid: str) -> dict[str, Any]:
    url = f"{daemon.api}/iot-flow/v1/connections/{cid}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=AUTH) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
    return document


async def delivered(daemon: DaemonProcess, cid: str) -> float:
    return await daemon.metric("iotflow_deliveries_total", connection=cid, outcome="delivered")


async def wait_state(daemon: DaemonProcess, cid: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (current := (await connection(daemon, cid))["state"]) != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"state {current}, not {state}:\n{daemon.tail()}")
        await asyncio.sleep(0.1)  # a bounded poll of another process's API


async def test_uplinks_arrive_on_the_cloud_topics(
    tmp_path: Path, mosquitto: Mosquitto, cloud: Mosquitto, pki: Pki, daemons: list[DaemonProcess]
) -> None:
    devices = {
        "actility": "0018B20000001A01",
        "chirpstack": "A840414FC1821A02",
        "tts": "70B3D57ED0051A03",
    }
    connections = [
        mqtt_connection(
            "cloud-mqtt",
            cloud,
            pki,
            list(devices.values()),
            pki.client,
            uplinkTopicPattern="sites/{CustomerData.name|'unnamed'}/{DevEUI}/up",
        )
    ]
    daemon = DaemonProcess(
        tmp_path / "mqtt-topics", broker_url=mosquitto.url, connections=connections
    )
    daemons.append(daemon)
    async with CloudApplication(cloud, application_tls(pki), "sites/#") as application:
        await daemon.start()
        await publish(mosquitto, [uplink(fmt, dev, 5) for fmt, dev in devices.items()])
        messages = await application.wait_until(lambda m: len(m) >= 3)
    by_device = {body["DevEUI_uplink"]["DevEUI"]: topic for topic, body in messages}
    # Device names: ThingPark's CustomerData.name, ChirpStack's deviceName, TTS's device_id.
    assert by_device == {
        devices["actility"]: f"sites/My Demo Device/{devices['actility']}/up",
        devices["chirpstack"]: f"sites/office-ers/{devices['chirpstack']}/up",
        devices["tts"]: f"sites/eui-{devices['tts'].lower()}/{devices['tts']}/up",
    }
    # The cloud can hold the last message before the daemon has counted its PUBACK.
    async with asyncio.timeout(10):
        while await delivered(daemon, "cloud-mqtt") < 3:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
    document = await connection(daemon, "cloud-mqtt")
    assert document["state"] == "OPENED"
    assert document["statistics"]["delivered"] == 3
    # The key is shown masked, and never reaches the log.
    assert document["configuration"]["privateKey"] == "*****"
    key_line = pki.client.private_key.splitlines()[1]
    assert key_line not in "\n".join(daemon.output)
    assert await daemon.stop() == 0


async def test_a_restarted_cloud_broker_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, cloud: Mosquitto, pki: Pki, daemons: list[DaemonProcess]
) -> None:
    devices = [f"0018B20000001B{n:02X}" for n in range(4)]
    connections = [
        mqtt_connection("restart", cloud, pki, devices, pki.client, uplinkTimeValidity="10m")
    ]
    daemon = DaemonProcess(
        tmp_path / "mqtt-restart", broker_url=mosquitto.url, connections=connections
    )
    daemons.append(daemon)
    sent: set[tuple[str, int]] = set()

    async def send(counts: range) -> None:
        batch = [(dev, n) for n in counts for dev in devices]
        sent.update(batch)
        await publish(mosquitto, [uplink("actility", dev, n) for dev, n in batch])

    def arrived(messages: list[tuple[str, dict[str, Any]]]) -> set[tuple[str, int]]:
        return {(b["DevEUI_uplink"]["DevEUI"], b["DevEUI_uplink"]["FCntUp"]) for _, b in messages}

    async with CloudApplication(cloud, application_tls(pki), "tpx/things/+/uplink") as app:
        await daemon.start()
        await send(range(10))
        await app.wait_until(lambda m: arrived(m) >= sent)
        # The cloud goes away while uplinks keep coming: they wait in the spool.
        cloud.stop()
        await daemon.wait_log(lambda e: e.get("event") == "Cloud broker connection lost")
        await send(range(10, 20))
        # Repeated failures open the circuit: the connection shows CLOSED.
        await wait_state(daemon, "restart", "CLOSED")
        assert await daemon.metric("iotflow_delivery_retries_total", connection="restart") >= 1
        cloud.start()
        await send(range(20, 30))
        messages = await app.wait_until(lambda m: arrived(m) >= sent)
    assert arrived(messages) == sent  # 120 uplinks, none lost (duplicates would be allowed)
    assert len(sent) == 120
    # The cloud can hold the last message before the daemon has counted its PUBACK.
    async with asyncio.timeout(10):
        while await delivered(daemon, "restart") < 120:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
    assert await delivered(daemon, "restart") == 120
    assert (
        await daemon.metric("iotflow_deliveries_total", connection="restart", outcome="expired")
        == 0
    )
    # One device's uplinks arrive in order, across the outage.
    for dev in devices:
        counts = [
            b["DevEUI_uplink"]["FCntUp"] for _, b in messages if b["DevEUI_uplink"]["DevEUI"] == dev
        ]
        assert sorted(set(counts)) == list(range(30))
        first_seen = list(dict.fromkeys(counts))
        assert first_seen == list(range(30))
    assert (await connection(daemon, "restart"))["state"] == "OPENED"


async def test_a_wrong_certificate_shows_authentication_failed(
    tmp_path: Path, mosquitto: Mosquitto, cloud: Mosquitto, pki: Pki, daemons: list[DaemonProcess]
) -> None:
    dev = "0018B20000001C01"
    connections = [mqtt_connection("rogue", cloud, pki, [dev], pki.rogue)]
    daemon = DaemonProcess(
        tmp_path / "mqtt-rogue", broker_url=mosquitto.url, connections=connections
    )
    daemons.append(daemon)
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, 1)])
    await wait_state(daemon, "rogue", "AUTHENTICATION_FAILED")
    document = await connection(daemon, "rogue")
    assert "certificate" in document["statistics"]["lastError"]
    assert document["statistics"]["delivered"] == 0


def network_server_command(fmt: str, dev: str, payload: bytes) -> str:
    """The topic on which the device's network server expects a downlink."""
    if fmt == "chirpstack":
        application_id = orjson.loads(payload)["deviceInfo"]["applicationId"]
        return f"application/{application_id}/device/{dev.lower()}/command/down"
    if fmt == "tts":
        return f"v3/demo-app@ttn/devices/eui-{dev.lower()}/down/push"
    return f"tpx/things/{dev}/downlink"


def port_and_payload(fmt: str, command: Any) -> tuple[int, str]:
    """FPort and hex payload of a downlink in the network server's own format."""
    if fmt == "chirpstack":
        return command["fPort"], base64.b64decode(command["data"]).hex()
    if fmt == "tts":
        (downlink,) = command["downlinks"]
        return downlink["f_port"], base64.b64decode(downlink["frm_payload"]).hex()
    inner = command["DevEUI_downlink"]
    return int(inner["FPort"]), inner["payload_hex"]


@pytest.mark.parametrize("fmt", ["chirpstack", "tts", "actility"])
async def test_a_cloud_downlink_reaches_the_network_server(
    tmp_path: Path,
    mosquitto: Mosquitto,
    cloud: Mosquitto,
    pki: Pki,
    daemons: list[DaemonProcess],
    fmt: str,
) -> None:
    dev = {
        "chirpstack": "A840414FC1821D01",
        "tts": "70B3D57ED0051D02",
        "actility": "0018B20000001D03",
    }[fmt]
    connections = [
        mqtt_connection(
            "commands",
            cloud,
            pki,
            [dev],
            pki.client,
            downlinkEnabled=True,
            downlinkTopicPattern="cmd/{DevEUI}/down",
            downlinkPort=10,
        )
    ]
    daemon = DaemonProcess(
        tmp_path / f"mqtt-downlink-{fmt}", broker_url=mosquitto.url, connections=connections
    )
    daemons.append(daemon)
    topic, payload = uplink(fmt, dev, 1)
    command_topic = network_server_command(fmt, dev, payload)
    async with (
        CloudApplication(cloud, application_tls(pki), "tpx/things/+/uplink") as application,
        aiomqtt.Client(mosquitto.host, mosquitto.port) as network_server,
    ):
        await network_server.subscribe(command_topic, qos=1)
        await daemon.start()
        # The first uplink opens the connection's session (and its downlink subscription)
        # and tells the daemon which network server the device belongs to.
        await publish(mosquitto, [(topic, payload)])
        await application.wait_until(lambda m: len(m) >= 1)
        body = {"DevEUI_downlink": {"payload_hex": "010203", "CorrelationID": "c-1"}}
        async with aiomqtt.Client(cloud.host, cloud.port, tls_context=application_tls(pki)) as app:
            await app.publish(f"cmd/{dev.lower()}/down", orjson.dumps(body), qos=1)
        async with asyncio.timeout(30):
            message = await anext(aiter(network_server.messages))
    assert message.topic.value == command_topic
    assert isinstance(message.payload, bytes)
    # The connection's downlinkPort fills the missing FPort; 01 02 03 as sent.
    assert port_and_payload(fmt, orjson.loads(message.payload)) == (10, "010203")
