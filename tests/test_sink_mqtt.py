"""The MQTT and AWS IoT sinks on their own, against real Mosquitto brokers and moto.

The cloud brokers are Mosquitto processes started here: one whose TLS listener requires a
client certificate (and a websocket listener doing the same), one that takes a user name
and password. Certificates are made per run (`support.tls`). AWS IoT's control plane is
moto in server mode, a separate process on a free port, reached by boto3 through
`AWS_ENDPOINT_URL_IOT` as botocore documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson
import pytest

from iotflow.connectors.mqtt import AwsConfig, MqttConfig
from iotflow.downlinks import DownlinkRequest
from iotflow.errors import AuthenticationSinkError, PermanentSinkError, RetryableSinkError
from iotflow.sinks import SinkContext
from iotflow.sinks.aws import (
    ALPN_MQTT_CLIENT_CERTIFICATE,
    AMAZON_ROOTS,
    AwsSink,
    aws_endpoint,
    presign_websocket_path,
)
from iotflow.sinks.mqtt import (
    DownlinkTopic,
    MqttSink,
    TlsMaterial,
    normalize_pem,
    tls_context,
)
from iotflow.spool import Delivery
from support.mosquitto import HOST, Mosquitto
from support.ports import free_port
from support.tls import Identity, Pki, make_pki
from support.uplinks import actility

# Both sinks hold an MqttSession; the tests drive either the same way.
MqttClientSink = MqttSink | AwsSink

DEV = "0018B20000000B20"
OTHER = "0018B20000000B21"
USER, PASSWORD = "cloud-user", "cloud-password"

_ids = iter(range(1, 1_000_000))


def delivery(dev_eui: str = DEV, fcnt: int = 1, **inner: Any) -> Delivery:
    document = actility(dev_eui, fcnt)
    document["DevEUI_uplink"].update(inner)
    return Delivery(
        id=next(_ids),
        connection_id="c",
        dev_eui=dev_eui,
        uplink_time=time.time(),
        received_at=time.time(),
        document=orjson.dumps(document),
    )


@dataclass
class Downlinks:
    """A DownlinkHandler that records what it is handed."""

    received: list[tuple[str, DownlinkRequest]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None:
        self.received.append((connection_id, request))
        self.changed.set()

    async def wait_for(self, count: int, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self.changed.clear()
                await self.changed.wait()


# -- brokers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def tls_broker(pki: Pki, *, websocket_port: int | None = None) -> Mosquitto:
    broker = Mosquitto()
    config = pki.broker_listener_config(broker.directory)
    if websocket_port is not None:
        # A second listener, websockets over TLS, with the same certificates and demands.
        config += f"listener {websocket_port} {HOST}\nprotocol websockets\n" + config
    broker.extra_config = config
    return broker


@pytest.fixture(scope="module")
def cloud(pki: Pki) -> Iterator[Mosquitto]:
    """The cloud broker: TLS, client certificates required; plus a websocket listener."""
    broker = tls_broker(pki, websocket_port=free_port())
    with broker:
        yield broker


def websocket_port(broker: Mosquitto) -> int:
    return int(broker.extra_config.split("listener ")[1].split()[0])


@pytest.fixture(scope="module")
def password_cloud() -> Iterator[Mosquitto]:
    """A plain broker that wants a user name and password."""
    broker = Mosquitto()
    passwords = broker.directory / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwords), USER, PASSWORD],
        check=True,
        capture_output=True,
    )
    # Later lines win in mosquitto's config: this overrides the harness's allow_anonymous.
    broker.extra_config = f"allow_anonymous false\npassword_file {passwords}\n"
    with broker:
        yield broker


def subscriber_tls(pki: Pki) -> ssl.SSLContext:
    return tls_context(
        TlsMaterial(
            trusted_ca=pki.ca,
            certificate=pki.client.certificate,
            private_key=pki.client.private_key,
        )
    )


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    at: float


class Subscriber:
    """A client of the cloud broker that records what arrives on a topic filter."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[Received] = []
        self._changed = asyncio.Event()

    async def run(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.messages.append(
                Received(message.topic.value, payload, message.qos, time.monotonic())
            )
            self._changed.set()

    async def wait_for(self, count: int, timeout: float = 20) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages


@contextlib.asynccontextmanager
async def subscribe(
    broker: Mosquitto, topic: str, *, tls: ssl.SSLContext | None = None, **kw: Any
) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client(broker.host, broker.port, tls_context=tls, **kw) as client:
        await client.subscribe(topic, qos=1)
        subscriber = Subscriber(client)
        task = asyncio.create_task(subscriber.run())
        try:
            yield subscriber
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def received(cloud: Mosquitto, pki: Pki) -> AsyncIterator[Subscriber]:
    """Everything published on the cloud broker during the test."""
    async with subscribe(cloud, "#", tls=subscriber_tls(pki)) as subscriber:
        yield subscriber


# -- sinks -------------------------------------------------------------------------------


def mqtt_config(
    broker: Mosquitto, pki: Pki, identity: Identity | None = None, **config: Any
) -> MqttConfig:
    identity = identity if identity is not None else pki.client
    values: dict[str, Any] = {
        "hostName": f"{broker.host}:{broker.port}",
        "protocol": "SSL",
        "trustedCaCertficate": pki.ca,
        "certificate": identity.certificate,
        "privateKey": identity.private_key,
        "downlinkEnabled": False,
        **config,
    }
    return MqttConfig.model_validate({k: v for k, v in values.items() if v is not None})


@pytest.fixture
async def sinks() -> AsyncIterator[list[MqttClientSink]]:
    """Sinks made by a test; closed at its end whatever happened."""
    made: list[MqttClientSink] = []
    yield made
    for sink in made:
        await sink.close()


async def started(made: list[MqttClientSink], sink: MqttClientSink) -> MqttClientSink:
    made.append(sink)
    await sink.start()
    return sink


def context(timeout: float = 5, downlink: Downlinks | None = None) -> SinkContext:
    return SinkContext(timeout=timeout, max_in_flight=32, downlink=downlink)


# -- actility-mqtt-iot -------------------------------------------------------------------


async def test_a_sink_opens_its_session_at_its_first_delivery(
    cloud: Mosquitto, pki: Pki, received: Subscriber, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(cloud, pki, clientId="iotflow-lazy", downlinkEnabled=True)
    sink = await started(sinks, MqttSink("lazy", config, context()))
    # A connection with nothing to send holds no session at the broker.
    await asyncio.sleep(0.2)  # room for a session that should not open
    assert not await sink.healthcheck()
    assert "as iotflow-lazy" not in cloud.log_text()
    await sink.send(delivery())
    await received.wait_for(1)
    assert await sink.healthcheck()
    assert "as iotflow-lazy" in cloud.log_text()


async def test_uplinks_land_on_the_rendered_topic_with_qos_1(
    cloud: Mosquitto, pki: Pki, received: Subscriber, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(cloud, pki, uplinkTopicPattern="cloud/{DevEUI}/port/{FPort}", qos=1)
    sink = await started(sinks, MqttSink("tls", config, context()))
    sent = [delivery(DEV, n) for n in range(3)]
    for item in sent:
        await sink.send(item)  # returns once the broker acknowledged (PUBACK)
    messages = await received.wait_for(3)
    assert [m.topic for m in messages] == [f"cloud/{DEV}/port/1"] * 3
    assert [m.payload for m in messages] == [d.document for d in sent]
    assert all(m.qos == 1 for m in messages)
    assert sink.client_id.startswith("iotflow-tls-")


async def test_topic_fallbacks_and_metadata_body(
    cloud: Mosquitto, pki: Pki, received: Subscriber, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(
        cloud,
        pki,
        uplinkTopicPattern="names/{CustomerData.name|DevEUI|'none'}/{Nothing|'none'}",
        sendMetadata=True,
        clientId="fixed-client-id",
    )
    sink = await started(sinks, MqttSink("fallback", config, context()))
    await sink.send(delivery(DEV, 1))
    await sink.send(delivery(OTHER, 2, CustomerData={}))
    first, second = await received.wait_for(2)
    assert first.topic == "names/My Demo Device/none"
    assert second.topic == f"names/{OTHER}/none"
    body = orjson.loads(first.payload)
    assert "DevEUI_uplink" not in body
    assert body["DevEUI"] == DEV
    assert sink.client_id == "fixed-client-id"


async def test_a_topic_mqtt_cannot_take_is_a_permanent_failure(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(cloud, pki, uplinkTopicPattern="names/{CustomerData.name}")
    sink = await started(sinks, MqttSink("wildcard", config, context()))
    with pytest.raises(PermanentSinkError, match="not an MQTT topic"):
        await sink.send(delivery(DEV, 1, CustomerData={"name": "a+b"}))


async def test_websockets_over_tls(
    cloud: Mosquitto, pki: Pki, received: Subscriber, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(cloud, pki, hostName=f"{HOST}:{websocket_port(cloud)}", protocol="WSS")
    sink = await started(sinks, MqttSink("wss", config, context()))
    assert str(sink.endpoint).startswith("wss://")
    await sink.send(delivery(DEV, 9))
    (message,) = await received.wait_for(1)
    assert message.topic == f"tpx/things/{DEV}/uplink"


async def test_a_certificate_of_another_ca_is_an_authentication_failure(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(cloud, pki, identity=pki.rogue)
    sink = await started(sinks, MqttSink("rogue", config, context(timeout=10)))
    began = time.monotonic()
    # TLS 1.3 refuses a client certificate after the handshake: the broker sends its alert
    # and closes. A client slow enough (a loaded machine) writes its CONNECT after that
    # close, the broker's reset then discards the unread alert, and the attempt reads
    # only an EOF: retried, as any hang-up is. The next attempt reads the alert.
    caught: AuthenticationSinkError | None = None
    lost: list[str] = []
    for _ in range(5):
        try:
            await sink.send(delivery())
        except AuthenticationSinkError as exc:  # a RetryableSinkError too: caught first
            caught = exc
            break
        except RetryableSinkError as exc:
            lost.append(str(exc))
    assert caught is not None, lost
    assert all("EOF occurred in violation of protocol" in error for error in lost), lost
    assert "our certificate" in str(caught)
    # Not a timed benchmark: the refusal is read from the TLS alert, not from a timeout.
    assert time.monotonic() - began < 10
    assert "PRIVATE KEY" not in str(caught)
    assert not await sink.healthcheck()


async def test_no_certificate_is_an_authentication_failure(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    config = MqttConfig(
        hostName=f"{cloud.host}:{cloud.port}", protocol="SSL", trustedCaCertficate=pki.ca
    )
    sink = await started(sinks, MqttSink("anonymous", config, context()))
    with pytest.raises(AuthenticationSinkError, match=r"CERTIFICATE_REQUIRED|our certificate"):
        await sink.send(delivery())


async def test_a_broker_we_do_not_trust_is_an_authentication_failure(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    config = mqtt_config(cloud, pki, trustedCaCertficate=pki.rogue_ca)
    sink = await started(sinks, MqttSink("untrusted", config, context()))
    with pytest.raises(AuthenticationSinkError, match="its certificate"):
        await sink.send(delivery())


async def test_unusable_tls_material_is_an_authentication_failure(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    no_key = MqttConfig(
        hostName=f"{cloud.host}:{cloud.port}",
        protocol="SSL",
        trustedCaCertficate=pki.ca,
        certificate=pki.client.certificate,
    )
    sink = await started(sinks, MqttSink("no-key", no_key, context()))
    with pytest.raises(AuthenticationSinkError, match="privateKey"):
        await sink.send(delivery())
    mismatch = mqtt_config(
        cloud, pki, identity=Identity(pki.client.certificate, pki.rogue.private_key)
    )
    sink = await started(sinks, MqttSink("mismatch", mismatch, context()))
    with pytest.raises(AuthenticationSinkError, match="TLS material") as caught:
        await sink.send(delivery())
    assert "PRIVATE KEY" not in str(caught.value)


def test_pem_without_line_breaks_still_loads(pki: Pki) -> None:
    # What a certificate looks like after a careless copy into a JSON string.
    flattened = Identity(
        pki.client.certificate.replace("\n", " "), pki.client.private_key.replace("\n", "")
    )
    assert normalize_pem(pki.ca.replace("\n", "\\n")) == pki.ca
    context_ = tls_context(
        TlsMaterial(pki.ca.replace("\n", ""), flattened.certificate, flattened.private_key)
    )
    assert context_.cert_store_stats()["x509_ca"] == 1


async def test_password_broker(password_cloud: Mosquitto, sinks: list[MqttClientSink]) -> None:
    def config(password: str) -> MqttConfig:
        return MqttConfig.model_validate(
            {
                "hostName": f"{password_cloud.host}:{password_cloud.port}",
                "username": USER,
                "password": password,
                "downlinkEnabled": False,
            }
        )

    wrong = await started(sinks, MqttSink("wrong", config("nope"), context()))
    with pytest.raises(AuthenticationSinkError, match="refused") as caught:
        await wrong.send(delivery())
    assert "nope" not in str(caught.value)
    async with subscribe(password_cloud, "tpx/#", username=USER, password=PASSWORD) as subscriber:
        right = await started(sinks, MqttSink("right", config(PASSWORD), context()))
        await right.send(delivery(DEV, 4))
        (message,) = await subscriber.wait_for(1)
        assert orjson.loads(message.payload)["DevEUI_uplink"]["FCntUp"] == 4


async def test_a_broker_that_is_down_is_retryable(sinks: list[MqttClientSink]) -> None:
    config = MqttConfig(hostName=f"{HOST}:{free_port()}", downlinkEnabled=False)
    sink = await started(sinks, MqttSink("down", config, context(timeout=3)))
    with pytest.raises(RetryableSinkError) as caught:
        await sink.send(delivery())
    assert not isinstance(caught.value, AuthenticationSinkError)


async def test_a_broker_that_never_answers_is_retryable(sinks: list[MqttClientSink]) -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Takes the CONNECT, never answers, and notes when the client hangs up.
        while await reader.read(1024):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, HOST, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        config = MqttConfig(hostName=f"{HOST}:{port}", downlinkEnabled=False)
        sink = await started(sinks, MqttSink("silent", config, context(timeout=1)))
        with pytest.raises(RetryableSinkError) as caught:
            await sink.send(delivery())
        assert not isinstance(caught.value, AuthenticationSinkError)
        # The attempt's socket is closed, not left to the garbage collector.
        async with asyncio.timeout(5):
            await closed.wait()
        await sink.close()


async def test_a_broker_that_closes_before_its_connack_fails_the_attempt_at_once(
    sinks: list[MqttClientSink],
) -> None:
    """A broker, or a load balancer before it, that takes the CONNECT and hangs up: the
    attempt fails then, not at the end of the delivery timeout (aiomqtt ignores a
    disconnection before the CONNACK; seen as a flaky contract test on a loaded machine)."""
    connects = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connects
        if await reader.read(1024):
            connects += 1
        writer.close()

    server = await asyncio.start_server(hang_up, HOST, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        config = MqttConfig(hostName=f"{HOST}:{port}", downlinkEnabled=False)
        # A timeout no test waits out: the attempt must end on the hang-up.
        sink = await started(sinks, MqttSink("hangs-up", config, context(timeout=120)))
        async with asyncio.timeout(20):
            with pytest.raises(RetryableSinkError, match="closed the connection") as caught:
                await sink.send(delivery())
        assert not isinstance(caught.value, AuthenticationSinkError)
        assert connects >= 1
        await sink.close()


async def test_close_during_a_connection_attempt_does_not_wait_it_out(
    sinks: list[MqttClientSink],
) -> None:
    """A broker that takes the CONNECT and says nothing: closing the sink (a shutdown, a
    connection deleted) abandons the attempt rather than waiting for its timeout."""
    connected = asyncio.Event()
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(1024):
            connected.set()
        while await reader.read(1024):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, HOST, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        config = MqttConfig(hostName=f"{HOST}:{port}", downlinkEnabled=False)
        sink = await started(sinks, MqttSink("silent", config, context(timeout=120)))
        sending = asyncio.create_task(sink.send(delivery()))
        async with asyncio.timeout(20):
            await connected.wait()
            await sink.close()
            with pytest.raises(RetryableSinkError, match="closing"):
                await sending
            # The abandoned attempt's socket is closed too.
            await closed.wait()


async def test_a_restarted_broker_is_reconnected(pki: Pki, sinks: list[MqttClientSink]) -> None:
    with tls_broker(pki) as broker:
        async with subscribe(broker, "#", tls=subscriber_tls(pki)) as subscriber:
            sink = await started(sinks, MqttSink("restart", mqtt_config(broker, pki), context()))
            await sink.send(delivery(DEV, 1))
            await subscriber.wait_for(1)
        broker.stop()
        with pytest.raises(RetryableSinkError):
            await sink.send(delivery(DEV, 2))
        broker.start()
        async with subscribe(broker, "#", tls=subscriber_tls(pki)) as subscriber:
            await sink.send(delivery(DEV, 3))  # the send itself brings the session back
            (message,) = await subscriber.wait_for(1)
            assert orjson.loads(message.payload)["DevEUI_uplink"]["FCntUp"] == 3


# -- downlinks ---------------------------------------------------------------------------


def test_downlink_topic_patterns() -> None:
    plain = DownlinkTopic("tpx/things/{DevEUI}/downlink")
    assert plain.filter == "tpx/things/+/downlink"
    assert plain.dev_eui("tpx/things/0018b20000000b20/downlink") == "0018b20000000b20"
    mixed = DownlinkTopic("app/{CustomerData.name|'x'}/dev-{DevEUI|'none'}.cmd/{FPort}")
    assert mixed.filter == "app/+/+/+"
    assert mixed.dev_eui("app/site/dev-0018B20000000B20.cmd/2") == "0018B20000000B20"
    assert mixed.dev_eui("app/site/other/2") is None
    assert DownlinkTopic("commands/all").dev_eui("commands/all") is None


async def test_downlinks_reach_the_handler_also_when_sent_while_away(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    handler = Downlinks()
    config = mqtt_config(
        cloud,
        pki,
        downlinkEnabled=True,
        downlinkTopicPattern="cmd/{DevEUI}/down",
        downlinkPort=5,
        clientId="iotflow-downlinks",
    )
    sink = await started(sinks, MqttSink("down", config, context(downlink=handler)))
    # The session opens with the first uplink, and subscribes before the uplink goes out.
    await sink.send(delivery())
    tls = subscriber_tls(pki)
    async with aiomqtt.Client(cloud.host, cloud.port, tls_context=tls) as app:
        body = {"DevEUI_downlink": {"FPort": "2", "payload_hex": "0102", "Confirmed": 1}}
        await app.publish("cmd/0018b20000000b20/down", orjson.dumps(body), qos=1)
        await app.publish("cmd/0018B20000000B20/down", b'{"payload_hex": "ff"}', qos=1)
        await app.publish("cmd/0018B20000000B20/down", b"not json", qos=1)
        await handler.wait_for(2)
        assert handler.received == [
            ("down", DownlinkRequest(DEV, 2, b"\x01\x02", confirmed=True)),
            ("down", DownlinkRequest(DEV, 5, b"\xff")),
        ]
        # The session is persistent: what the application sends while we are away is kept.
        await sink.close()
        await app.publish("cmd/0018B20000000B20/down", b'{"payload_hex": "aa"}', qos=1)
    again = await started(sinks, MqttSink("down", config, context(downlink=handler)))
    await again.send(delivery())
    await handler.wait_for(3)
    assert handler.received[2] == ("down", DownlinkRequest(DEV, 5, b"\xaa"))
    assert await again.healthcheck()


async def test_a_fleet_shares_the_downlink_subscription(
    cloud: Mosquitto, pki: Pki, sinks: list[MqttClientSink]
) -> None:
    # Two instances of a fleet run the same connection; each downlink must reach one of
    # them, not both (which would send it to the device twice).
    changed = asyncio.Event()  # set by either instance's handler
    first, second = Downlinks(changed=changed), Downlinks(changed=changed)
    made = []
    for name, handler in (("a", first), ("b", second)):
        config = mqtt_config(
            cloud,
            pki,
            downlinkEnabled=True,
            downlinkTopicPattern="fleet/{DevEUI}/down",
            downlinkPort=5,
            clientId=f"iotflow-fleet-{name}",
        )
        shared = SinkContext(timeout=5, max_in_flight=32, downlink=handler, shared_group="g1")
        sink = await started(sinks, MqttSink("fleet", config, shared))
        await sink.send(delivery())  # opens the session and its subscription
        made.append(sink)
    tls = subscriber_tls(pki)
    async with aiomqtt.Client(cloud.host, cloud.port, tls_context=tls) as app:
        for n in range(10):
            await app.publish("fleet/0018B20000000B20/down", b'{"payload_hex": "%02x"}' % n, qos=1)
        async with asyncio.timeout(15):
            while len(first.received) + len(second.received) < 10:
                changed.clear()
                await changed.wait()
    payloads = sorted(r.payload for _, r in first.received + second.received)
    assert payloads == [bytes([n]) for n in range(10)]  # each once, none twice
    assert first.received
    assert second.received


# -- actility-aws-iot --------------------------------------------------------------------


def aws_config(broker: Mosquitto, pki: Pki, **config: Any) -> AwsConfig:
    values: dict[str, Any] = {
        "region": "eu-central-1",
        "accountPrefix": "a2sheeefctigr-ats",
        "hostName": f"mqtts://{broker.host}:{broker.port}",
        "trustedCaCertficate": pki.ca,
        "certificate": pki.client.certificate,
        "privateKey": pki.client.private_key,
        "createDevices": False,
        "downlinkEnabled": False,
        **config,
    }
    return AwsConfig.model_validate(values)


def test_aws_host_naming() -> None:
    base = {"region": "eu-central-1", "accountPrefix": "a2sheeefctigr-ats"}
    endpoint = aws_endpoint(AwsConfig.model_validate(base))
    assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.websockets) == (
        "a2sheeefctigr-ats.iot.eu-central-1.amazonaws.com",
        8883,
        True,
        False,
    )
    wss = aws_endpoint(AwsConfig.model_validate({**base, "protocol": "WSS"}))
    assert (wss.port, wss.websockets, str(wss)) == (
        443,
        True,
        "wss://a2sheeefctigr-ats.iot.eu-central-1.amazonaws.com:443/mqtt",
    )
    vpce = aws_endpoint(AwsConfig.model_validate({**base, "hostName": "vpce-1.example.com"}))
    assert (vpce.host, vpce.port, vpce.tls) == ("vpce-1.example.com", 8883, True)
    double = aws_endpoint(AwsConfig.model_validate({**base, "hostName": "mqtt://127.0.0.1:1884"}))
    assert (double.host, double.port, double.tls) == ("127.0.0.1", 1884, False)
    with pytest.raises(ValueError, match="accountPrefix"):
        aws_endpoint(AwsConfig.model_validate({"region": "eu-central-1"}))
    # Client certificates on port 443 need AWS's ALPN protocol name.
    on_443 = AwsSink(
        "alpn",
        AwsConfig.model_validate({**base, "hostName": "mqtts://example.com:443"}),
        context(),
    )
    assert on_443.session.tls is not None
    assert on_443.session.tls.alpn == (ALPN_MQTT_CLIENT_CERTIFICATE,)
    # Amazon's roots are the default trust, and they load.
    roots = ssl.create_default_context(cadata=AMAZON_ROOTS)
    assert roots.cert_store_stats()["x509_ca"] == 2


def test_aws_websocket_url_is_signed_as_botocore_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    moment = datetime(2026, 11, 21, 15, 38, 46, tzinfo=UTC)
    host = "a2sheeefctigr-ats.iot.eu-central-1.amazonaws.com"
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: moment)
    request = AWSRequest(method="GET", url=f"https://{host}/mqtt")
    signer = botocore_auth.SigV4QueryAuth(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        "iotdevicegateway",
        "eu-central-1",
        expires=86400,
    )
    signer.add_auth(request)
    ours = presign_websocket_path(
        host, "eu-central-1", "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", now=moment
    )
    assert f"https://{host}{ours}" == request.url


async def test_aws_publishes_are_paced_to_100_a_second(
    cloud: Mosquitto, pki: Pki, received: Subscriber, sinks: list[MqttClientSink]
) -> None:
    sink = await started(sinks, AwsSink("aws", aws_config(cloud, pki), context(timeout=10)))
    await sink.send(delivery(DEV, 0))  # the session is open before the clock starts
    await received.wait_for(1)
    began = time.monotonic()
    await asyncio.gather(*(sink.send(delivery(DEV, n)) for n in range(1, 251)))
    elapsed = time.monotonic() - began
    messages = await received.wait_for(251)
    # A rate limit under test, not a speed benchmark: 250 publishes at 100/s need 2.5 s.
    assert elapsed >= 2.4
    # Nor did any second of the run see many more than 100 arrive (arrival times, measured
    # here after the broker, are a little less even than the publishes).
    arrivals = sorted(m.at for m in messages[1:])
    busiest = max(
        sum(1 for t in arrivals[i:] if t < start + 1.0) for i, start in enumerate(arrivals)
    )
    assert busiest <= 105
    assert {m.topic for m in messages} == {f"tpx/things/{DEV}/uplink"}


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """AWS's API as moto plays it, in server mode on a free port; its URL."""
    pytest.importorskip("moto")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"moto_server exited: {log.read().decode()}")
                try:
                    with socket.create_connection((HOST, port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # a bounded wait for another process to listen
            yield f"http://{HOST}:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.mark.parametrize("certificate_form", ["arn", "id"])
async def test_create_devices_registers_each_thing_once(
    cloud: Mosquitto,
    pki: Pki,
    received: Subscriber,
    sinks: list[MqttClientSink],
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    certificate_form: str,
) -> None:
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ENDPOINT_URL_IOT", moto_server)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    iot = boto3.client(
        "iot",
        region_name="eu-central-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    certificate = iot.create_keys_and_certificate(setAsActive=True)
    device_type = f"sensor-{certificate_form}"
    iot.create_thing_type(thingTypeName=device_type)
    devices = (
        ["0018B20000000C01", "0018B20000000C02"]
        if certificate_form == "arn"
        else ["0018B20000000D01", "0018B20000000D02"]
    )
    config = aws_config(
        cloud,
        pki,
        createDevices=True,
        deviceType=device_type,
        certificateId=certificate[
            "certificateArn" if certificate_form == "arn" else "certificateId"
        ],
        accessKeyId="testing",
        secretAccessKey="testing",
    )
    sink = await started(sinks, AwsSink(f"aws-{certificate_form}", config, context()))
    assert isinstance(sink, AwsSink)
    assert sink.registrar is not None
    for n in range(3):
        for dev in devices:
            await sink.send(delivery(dev, n))
    await received.wait_for(6)  # the uplinks went out, registration or not
    await sink.registrar.idle()
    for dev in devices:
        thing = iot.describe_thing(thingName=dev)
        assert thing["thingTypeName"] == device_type
        principals = iot.list_thing_principals(thingName=dev)["principals"]
        assert principals == [certificate["certificateArn"]]
    assert sink.registrar.registered == 2  # once per device, not per uplink
    lookups = 1 if certificate_form == "id" else 0
    assert sink.registrar.api_calls == 4 + lookups


async def test_create_devices_failures_do_not_hold_up_uplinks(
    cloud: Mosquitto,
    pki: Pki,
    received: Subscriber,
    sinks: list[MqttClientSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("boto3")
    # Nothing listens there: every AWS API call fails.
    monkeypatch.setenv("AWS_ENDPOINT_URL_IOT", f"http://{HOST}:{free_port()}")
    config = aws_config(
        cloud, pki, createDevices=True, accessKeyId="testing", secretAccessKey="testing"
    )
    sink = await started(sinks, AwsSink("aws-fail", config, context()))
    assert isinstance(sink, AwsSink)
    assert sink.registrar is not None
    await sink.send(delivery(DEV, 1))
    await received.wait_for(1)
    await sink.registrar.idle()
    assert sink.registrar.registered == 0


def test_the_sinks_import_without_boto3() -> None:
    # The aws extra is optional: importing the sink never imports boto3.
    code = "import sys, iotflow.sinks; assert 'boto3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
