"""The contract every sink keeps, checked through a real ConnectionWorker.

A sink sends and classifies; retry, expiry, the circuit and statistics are the worker's
(docs/architecture.md "Delivery semantics", "Connector plugins"). So each situation a sink
meets is driven through a worker and judged by what the worker then does: delivered;
retried (HTTP 5xx, 408, 429 with `Retry-After` in seconds and as an HTTP date, a timeout,
a reset connection); failed for good (400, 501, a redirect not followed); credentials
refused (401/403 → AUTHENTICATION_FAILED); an arbitrary exception (failed, and the worker
delivers the next one); a cloud that quotes the credentials back (stored redacted); close
during a send; healthcheck before and after start and close.

The tests are parametrized over *sink kinds*. A kind is a small adapter (`SinkKind`): a
cloud double, a connection of that kind pointed at it, and the faults the double can play
(`faults`). Adding a sink to the suite (issue #12: MQTT, AWS IoT, Cumulocity) is writing
its adapter and listing it in `KINDS`; a fault a kind cannot play is not generated for it.

Time is the worker's `clock=`/`sleep=` (a ManualClock): a `Retry-After: 30` costs no real
time, and the waits asked for are read back. Only the sink's own timeout is real (0.5 s).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import secrets
import ssl
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import orjson
import pytest
import structlog

from iotflow.config.model import DeliverySettings
from iotflow.connectors import Connection, parse_connection
from iotflow.delivery.worker import ConnectionWorker
from iotflow.errors import RetryableSinkError, SinkError
from iotflow.sinks import Sink, SinkContext, create_sink
from iotflow.spool import Delivery, Spool
from iotflow.telemetry.metrics import Metrics
from support.amqpproxy import AmqpFaultProxy
from support.azure import POLICY as AZURE_POLICY
from support.azure import FakeIotHub
from support.clock import ManualClock
from support.clouds import Behaviour, FakeCloud
from support.cumulocity import FakeCumulocity
from support.mosquitto import HOST, Mosquitto
from support.mqttproxy import MqttFaultProxy
from support.plugins import example_connector
from support.rabbitmq import RabbitMQ
from support.tls import Pki, make_pki
from support.uplinks import actility
from support.webdoubles import FakeInfluxDb, FakeSplunkHec, FakeThingsBoard, ServiceDouble, hec

CONNECTION_ID = "c1"
SEND_TIMEOUT = 0.5  # seconds: the sink's own timeout, the one real wait of the suite
# A broker session's connect (TCP, TLS, the proxy, CONNECT and its answer) is bounded by the
# same timeout: on a loaded machine it took longer than 0.5 s and a retry failed again.
SESSION_TIMEOUT = 2.0

# Credentials of the connections below: none may be found in what the worker stores or logs.
TOKEN = "dc-s3cret-token-2f9a"
TAGO_AUTHORIZATION = "tago-s3cret-auth-77c1"


@dataclass(frozen=True)
class Fault:
    """What the cloud does to one delivery, and what the worker must make of it.

    `expect`: "retried" (then delivered), "failed" (for good, one attempt), "auth" (state
    AUTHENTICATION_FAILED, then retried and delivered once the cloud accepts again).
    """

    name: str
    expect: str
    status: int | None = None
    # The least wait the cloud asked for (Retry-After), in seconds.
    retry_after: float | None = None
    # How lastError and the reason start (None: not checked, transport-specific).
    error: str | None = None
    # For the raising sink: the exception its send raises.
    raises: Callable[[], BaseException] | None = None


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


RETRYABLE = (
    Fault("HTTP 500", "retried", 500, error="HTTP 500"),
    Fault("HTTP 503", "retried", 503, error="HTTP 503"),
    Fault("HTTP 408", "retried", 408, error="HTTP 408"),
    Fault("HTTP 429 Retry-After seconds", "retried", 429, retry_after=30, error="HTTP 429"),
    Fault("HTTP 429 Retry-After date", "retried", 429, retry_after=28, error="HTTP 429"),
    Fault("timeout", "retried", error="no answer within"),
    Fault("connection reset", "retried"),
)
PERMANENT = (
    Fault("HTTP 400", "failed", 400, error="HTTP 400"),
    Fault("HTTP 501", "failed", 501, error="HTTP 501"),
    Fault("HTTP 302 not followed", "failed", 302, error="HTTP 302"),
    # A careless cloud quotes the request, credentials and all, in its error body.
    Fault("HTTP 400 quoting the credentials", "failed", 400, error="HTTP 400"),
    # An uplink value that would inject a header line (issue #10, defect 3).
    Fault("header template renders a line break", "failed", error="header 'X-Device'"),
)
AUTHENTICATION = (
    Fault("HTTP 401", "auth", 401, error="HTTP 401"),
    Fault("HTTP 403", "auth", 403, error="HTTP 403"),
)
UNEXPECTED = (
    Fault(
        "RuntimeError", "failed", error="RuntimeError: boom", raises=lambda: RuntimeError("boom")
    ),
    Fault("KeyError", "failed", error="KeyError: 'DevEUI'", raises=lambda: KeyError("DevEUI")),
    Fault("ZeroDivisionError", "failed", error="ZeroDivisionError", raises=ZeroDivisionError),
    Fault(
        "exception without printable text",
        "failed",
        error="_UnprintableError: (message unavailable)",
        raises=_UnprintableError,
    ),
    Fault(
        "exception quoting a secret",
        "failed",
        error="ValueError: bad header Authorization: *****",
        raises=lambda: ValueError(f"bad header Authorization: Token {TOKEN}"),
    ),
    Fault(
        "exception group",
        "failed",
        error="ExceptionGroup: two (2 sub-exceptions)",
        raises=lambda: ExceptionGroup("two", [ValueError("a"), TypeError("b")]),
    ),
)


def connection(destination: str) -> Connection:
    """The connection every kind delivers for: it carries credentials in a header and in
    the URL's query (as TagoIO wants it), and a header rendered from the uplink."""
    return parse_connection(
        {
            "id": CONNECTION_ID,
            "name": "contract",
            "connectorId": "actility-http-iot",
            "configuration": {
                "destinationURL": f"{destination}?authorization={TAGO_AUTHORIZATION}",
                "headers": {"Authorization": f"Token {TOKEN}", "X-Device": "{CustomerData.name}"},
                "uplinkTimeValidity": "1h",
            },
        }
    )


# One uplink time for every document: a kind whose cloud keeps no copy of the document (a
# Cumulocity event) rebuilds it from its frame counter.
UPLINK_TIME = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def document(n: int, *, name: str = "sensor") -> bytes:
    doc = actility("0018B20000000B20", n, at=UPLINK_TIME)
    doc["DevEUI_uplink"]["CustomerData"] = {"name": name}
    return orjson.dumps(doc)


class SinkKind(ABC):
    """One kind of sink and the double of its cloud, as the contract tests drive them."""

    name: str
    faults: tuple[Fault, ...]
    secrets: tuple[str, ...] = (TOKEN, TAGO_AUTHORIZATION)
    # Cases of the suite that cannot apply to this transport: (case, why). Each is listed
    # as a skipped test with its reason, so that what is not checked is visible.
    not_applicable: tuple[tuple[str, str], ...] = ()

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def connection(self) -> Connection: ...

    @abstractmethod
    def sink(self, connection: Connection) -> Sink: ...

    @abstractmethod
    def play(self, fault: Fault) -> bytes | None:
        """Make the next send meet `fault`, once; the document to send for it, or None
        for an ordinary one."""

    @abstractmethod
    def hold(self) -> None:
        """Leave the sends that arrive from now on unanswered, until `release`."""

    @abstractmethod
    def release(self) -> None: ...

    @abstractmethod
    async def arrived(self, count: int) -> None:
        """Until `count` sends reached the cloud, answered or not."""

    @abstractmethod
    async def accepted(self, count: int) -> list[bytes]:
        """Until the cloud accepted `count` documents; those documents."""

    async def check(self, fault: Fault) -> None:  # noqa: B027 (optional: most kinds see nothing more)
        """What the cloud itself saw of `fault`, where the kind can tell."""

    async def ready(self, sink: Sink) -> None:  # noqa: B027 (optional: most are ready at start)
        """What a started sink needs before it can be healthy (an MQTT session opens at the
        first delivery, by design: sinks/mqtt/session.py)."""


class HttpKind(SinkKind):
    """HttpSink against the local webhook cloud."""

    name = "http"
    faults: tuple[Fault, ...] = RETRYABLE + PERMANENT + AUTHENTICATION

    def __init__(self) -> None:
        self.cloud = FakeCloud()

    async def start(self) -> None:
        await self.cloud.start()

    async def stop(self) -> None:
        await self.cloud.stop()

    def connection(self) -> Connection:
        return connection(self.cloud.url("/uplink"))

    def sink(self, connection: Connection) -> Sink:
        return create_sink(connection, SinkContext(timeout=SEND_TIMEOUT, max_in_flight=1))

    def play(self, fault: Fault) -> bytes | None:
        cloud = self.cloud
        if fault.name == "timeout":
            cloud.hang(times=1)
        elif fault.name == "connection reset":
            cloud.reset_connection(times=1)
        elif fault.name == "header template renders a line break":
            return document(0, name="evil\r\nX-Injected: yes")
        elif fault.name == "HTTP 400 quoting the credentials":
            cloud.set_behaviour(Behaviour(status=400, echo=True), times=1)
        elif fault.name == "HTTP 302 not followed":
            cloud.respond(302, times=1, headers={"Location": cloud.url("/elsewhere")})
        elif fault.name == "HTTP 429 Retry-After date":
            when = datetime.now(UTC) + timedelta(seconds=30)
            cloud.respond(429, times=1, headers={"Retry-After": format_datetime(when, usegmt=True)})
        elif fault.retry_after is not None:
            cloud.respond(429, times=1, retry_after=fault.retry_after)
        else:
            assert fault.status is not None, fault
            cloud.respond(fault.status, times=1)
        return None

    def hold(self) -> None:
        self.cloud.hang()

    def release(self) -> None:
        self.cloud.release()

    async def arrived(self, count: int) -> None:
        await self.cloud.wait_for_requests(count, path="/uplink")

    async def accepted(self, count: int) -> list[bytes]:
        return [r.body for r in await self.cloud.wait_for(count, path="/uplink")]

    async def check(self, fault: Fault) -> None:
        paths = [r.path for r in self.cloud.all_requests]
        if fault.name == "HTTP 302 not followed":
            assert paths == ["/uplink", "/uplink"]  # not to /elsewhere
        if fault.name == "header template renders a line break":
            # Refused before sending: the cloud only saw the next, ordinary uplink.
            (only,) = self.cloud.all_requests
            assert only.headers["X-Device"] == "sensor"
            assert "X-Injected" not in only.headers


@dataclass
class RaisingSink:
    """A sink whose cloud is a list, and whose send raises whatever the test hands it."""

    next_error: BaseException | None = None
    delivered: list[bytes] = field(default_factory=list)
    arrivals: int = 0
    held: bool = False
    started: bool = False
    closed: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> None:
        self.started = True

    async def send(self, delivery: Delivery) -> None:
        async with self.changed:
            self.arrivals += 1
            self.changed.notify_all()
            await self.changed.wait_for(lambda: not self.held or self.closed)
            if self.closed:
                raise RetryableSinkError("the sink is closed")
            error, self.next_error = self.next_error, None
            if error is not None:
                raise error
            self.delivered.append(delivery.document)
            self.changed.notify_all()

    async def healthcheck(self) -> bool:
        return self.started and not self.closed

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(predicate)


class RaisingKind(SinkKind):
    """A sink that raises arbitrary exceptions: the worker's catch-all is the contract."""

    name = "raising"
    faults = UNEXPECTED

    def __init__(self) -> None:
        self.raising = RaisingSink()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def connection(self) -> Connection:
        return connection("http://127.0.0.1:9/unused")

    def sink(self, connection: Connection) -> Sink:
        return self.raising

    def play(self, fault: Fault) -> bytes | None:
        assert fault.raises is not None, fault
        self.raising.next_error = fault.raises()
        return None

    def hold(self) -> None:
        self.raising.held = True

    def release(self) -> None:
        self.raising.held = False

    async def arrived(self, count: int) -> None:
        await self.raising.until(lambda: self.raising.arrivals >= count)

    async def accepted(self, count: int) -> list[bytes]:
        await self.raising.until(lambda: len(self.raising.delivered) >= count)
        return list(self.raising.delivered)


# -- MQTT and AWS IoT: a real Mosquitto behind a proxy that plays the broker's faults -----

MQTT_PASSWORD = "mqtt-s3cret-pass-51d0"
HTTP_ONLY = (
    "MQTT has no HTTP status: a broker refuses with a CONNACK code (see 'credentials refused')"
)
NO_RETRY_AFTER = "MQTT has no Retry-After: a broker cannot ask for a wait"
NO_HEADERS = "MQTT carries no headers: the topic template is played instead"

MQTT_FAULTS = (
    Fault("broker down", "retried"),
    Fault("timeout", "retried"),
    Fault("connection reset", "retried"),
    Fault("topic template renders a wildcard", "failed", error="uplinkTopicPattern"),
    Fault("credentials refused", "auth"),
    # The sink's own code raising (orjson on a document that is not JSON): the worker's
    # catch-all, as for any exception outside the SinkError hierarchy.
    Fault("arbitrary exception", "failed", error="JSONDecodeError"),
)
MQTT_NOT_APPLICABLE = (
    *((f.name, HTTP_ONLY) for f in RETRYABLE + PERMANENT + AUTHENTICATION if f.status),
    *((f.name, NO_RETRY_AFTER) for f in RETRYABLE if f.retry_after),
    ("header template renders a line break", NO_HEADERS),
)


@functools.cache
def _pki() -> Pki:
    return make_pki()


class MqttKind(SinkKind):
    """MqttSink (`actility-mqtt-iot`, TCP) against Mosquitto, through the fault proxy."""

    name = "mqtt"
    faults = MQTT_FAULTS
    secrets = (MQTT_PASSWORD,)
    not_applicable = MQTT_NOT_APPLICABLE
    topic = "contract/{CustomerData.name}"

    def __init__(self) -> None:
        self.broker = Mosquitto()
        self.proxy: MqttFaultProxy | None = None
        self.received: list[bytes] = []
        self._changed = asyncio.Condition()
        self._subscriber: asyncio.Task[None] | None = None

    def proxy_context(self) -> ssl.SSLContext | None:
        return None

    async def start(self) -> None:
        await asyncio.to_thread(self.broker.start)
        self.proxy = MqttFaultProxy(self.broker.port, ssl_context=self.proxy_context())
        await self.proxy.start()
        subscribed = asyncio.Event()
        self._subscriber = asyncio.create_task(self._subscribe(subscribed))
        async with asyncio.timeout(10):
            await subscribed.wait()

    async def _subscribe(self, subscribed: asyncio.Event) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port) as client:
            await client.subscribe("contract/#", qos=1)
            subscribed.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                async with self._changed:
                    self.received.append(message.payload)
                    self._changed.notify_all()

    async def stop(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.stop()
        await asyncio.to_thread(self.broker.stop)

    def configuration(self) -> dict[str, Any]:
        assert self.proxy is not None
        return {
            "hostName": f"{HOST}:{self.proxy.port}",
            "protocol": "TCP",
            "username": "contract",
            "password": MQTT_PASSWORD,
            "uplinkTopicPattern": self.topic,
            "downlinkEnabled": False,
        }

    connector = "actility-mqtt-iot"

    def connection(self) -> Connection:
        return parse_connection(
            {
                "id": CONNECTION_ID,
                "name": "contract",
                "connectorId": self.connector,
                "configuration": {"uplinkTimeValidity": "1h", **self.configuration()},
            }
        )

    def sink(self, connection: Connection) -> Sink:
        return create_sink(connection, SinkContext(timeout=SESSION_TIMEOUT, max_in_flight=1))

    def play(self, fault: Fault) -> bytes | None:
        proxy = self.proxy
        assert proxy is not None
        if fault.name == "broker down":
            proxy.close_next_connection = True
        elif fault.name == "timeout":
            proxy.drop_next_publish = True
        elif fault.name == "connection reset":
            proxy.reset_at_next_publish = True
        elif fault.name == "credentials refused":
            proxy.refuse_next_connect = True
        elif fault.name == "topic template renders a wildcard":
            return document(0, name="all/#")
        elif fault.name == "arbitrary exception":
            return b"{not json"
        else:
            raise AssertionError(fault)
        return None

    def hold(self) -> None:
        assert self.proxy is not None
        self.proxy.hold()

    def release(self) -> None:
        if self.proxy is not None:
            self.proxy.release()

    async def arrived(self, count: int) -> None:
        assert self.proxy is not None
        await self.proxy.wait_publishes(count)

    async def accepted(self, count: int) -> list[bytes]:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return list(self.received)

    async def check(self, fault: Fault) -> None:
        if fault.name == "topic template renders a wildcard":
            # Refused before publishing: the broker only saw the next, ordinary uplink.
            (only,) = await self.accepted(1)
            assert orjson.loads(only)["DevEUI_uplink"]["FCntUp"] == 2

    async def ready(self, sink: Sink) -> None:
        now = time.time()
        warm_up = Delivery(0, CONNECTION_ID, "0018B20000000B20", now, now, document(0))
        await sink.send(warm_up)


class AwsKind(MqttKind):
    """AwsSink (`actility-aws-iot`): mutual TLS with its client certificate, as AWS IoT
    Core wants, to the proxy standing in for the account's endpoint (`hostName`, as a VPC
    endpoint or a local double is given). Thing registration (boto3, moto in
    test_sink_mqtt.py) runs in the background and never decides a delivery: off here."""

    name = "aws"
    connector = "actility-aws-iot"
    topic = "contract/{CustomerData.name}"

    def __init__(self) -> None:
        super().__init__()
        self.pki = _pki()
        self.secrets = (self.pki.client.private_key,)

    def proxy_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as directory:
            _, cert, key = self.pki.write_broker_files(Path(directory))
            context.load_cert_chain(cert, key)
        context.load_verify_locations(cadata=self.pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def configuration(self) -> dict[str, Any]:
        assert self.proxy is not None
        return {
            "region": "eu-central-1",
            "hostName": f"mqtts://{HOST}:{self.proxy.port}",
            "trustedCaCertficate": self.pki.ca,
            "certificate": self.pki.client.certificate,
            "privateKey": self.pki.client.private_key,
            "uplinkTopicPattern": self.topic,
            "createDevices": False,
            "downlinkEnabled": False,
        }


# -- Cumulocity: the local tenant double ----------------------------------------------------

C8Y_NOT_APPLICABLE = (
    (
        "HTTP 302 not followed",
        "Cumulocity's resources answer no redirect; the client sends"
        " allow_redirects=False and a 3xx is permanent by classify_http, as for HttpSink",
    ),
    ("header template renders a line break", "a Cumulocity connection has no header templates"),
    (
        "HTTP 400 quoting the credentials",
        "the tenant double never quotes a request back;"
        " the Basic credential is a secret of the connection (test_sink_cumulocity.py)",
    ),
    *(
        (
            f.name,
            "no input or tenant answer makes CumulocitySink raise outside the SinkError"
            " hierarchy (an unreadable document is a Rejection, so permanent); the worker's"
            " catch-all is the raising kind's",
        )
        for f in UNEXPECTED[:1]
    ),
)
C8Y_FAULTS = (
    *(f for f in RETRYABLE + PERMANENT + AUTHENTICATION
      if f.name not in {n for n, _ in C8Y_NOT_APPLICABLE} | {"timeout"}),
    # The same timeout, with the resource it happened on in the reason.
    Fault("timeout", "retried", error="POST /event/events: no answer within"),
    Fault("document is not an uplink", "failed", error="uplink document unreadable"),
    Fault("HTTP 422 unknown source", "failed", 422, error="HTTP 422"),
)  # fmt: skip


class CumulocityKind(SinkKind):
    """CumulocitySink against FakeCumulocity; faults are played on POST /event/events
    (after the device was looked up and created, so that a retry walks the whole way)."""

    name = "cumulocity"
    faults = C8Y_FAULTS
    not_applicable = C8Y_NOT_APPLICABLE

    def __init__(self) -> None:
        self.tenant = FakeCumulocity(password="c8y-s3cret-pass-9e4b")
        login = f"{self.tenant.tenant}/{self.tenant.username}:{self.tenant.password}"
        self.secrets = (self.tenant.password, base64.b64encode(login.encode()).decode())

    async def start(self) -> None:
        await self.tenant.start()

    async def stop(self) -> None:
        await self.tenant.stop()

    def connection(self) -> Connection:
        return parse_connection(
            {
                "id": CONNECTION_ID,
                "name": "contract",
                "connectorId": "actility-cumulocity-iot",
                "configuration": {
                    "hostName": self.tenant.base_url,
                    "tenantId": self.tenant.tenant,
                    "username": self.tenant.username,
                    "password": self.tenant.password,
                    "uplinkTimeValidity": "1h",
                },
            }
        )

    def sink(self, connection: Connection) -> Sink:
        return create_sink(connection, SinkContext(timeout=SEND_TIMEOUT, max_in_flight=1))

    def play(self, fault: Fault) -> bytes | None:
        fail = functools.partial(self.tenant.fail, method="POST", path="/event/events")
        if fault.name == "timeout":
            fail(500, delay=SEND_TIMEOUT * 4)
        elif fault.name == "connection reset":
            fail(500, reset=True)
        elif fault.name == "document is not an uplink":
            return b'{"not": "an uplink"}'
        elif fault.name == "HTTP 429 Retry-After date":
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
            fail(429, retry_after=when)
        elif fault.retry_after is not None:
            fail(429, retry_after=int(fault.retry_after))
        else:
            assert fault.status is not None, fault
            fail(fault.status)
        return None

    def hold(self) -> None:
        self.tenant.hold("POST", "/event/events")

    def release(self) -> None:
        self.tenant.release()

    async def arrived(self, count: int) -> None:
        await self.tenant.wait_until(
            lambda: self.tenant.count("POST", "/event/events") >= count, timeout=10
        )

    async def accepted(self, count: int) -> list[bytes]:
        await self.tenant.wait_until(lambda: len(self.tenant.events) >= count, timeout=10)
        # What reached the tenant is Cumulocity's event, not the document: the uplink's
        # frame counter says which document each event came from.
        counters = [e["c8y_LoRaUplink"]["fCnt"] for e in self.tenant.events]
        return [document(n) for n in counters]


# -- AMQP 0.9.1: the suite's RabbitMQ behind a proxy that plays the broker's faults ---------

AMQP_PASSWORD = "iotflow-test"  # the node's user (support/rabbitmq.py)
AMQP_FAULTS = (
    Fault("broker down", "retried"),
    Fault("timeout", "retried", error="no confirm from"),
    Fault("connection reset", "retried"),
    Fault("credentials refused", "auth"),
    # No queue is bound for the routing key: the broker returns the message (NO_ROUTE).
    Fault("unroutable", "failed", error="unroutable"),
    Fault("routing key too long", "failed", error="uplinkTopicPattern"),
    Fault("arbitrary exception", "failed", error="JSONDecodeError"),
)
AMQP_NOT_APPLICABLE = (
    *((f.name, HTTP_ONLY.replace("MQTT", "AMQP").replace("CONNACK code", "Connection.Close"))
      for f in RETRYABLE + PERMANENT + AUTHENTICATION if f.status),
    *((f.name, NO_RETRY_AFTER.replace("MQTT", "AMQP")) for f in RETRYABLE if f.retry_after),
    ("header template renders a line break", "AMQP headers are not templated here"),
)  # fmt: skip


class AmqpKind(SinkKind):
    """AmqpSink (`actility-amqp-0.9.1-iot`) against the suite's RabbitMQ, through the
    AMQP fault proxy; a queue bound to `contract.sensor` is the cloud's consumer."""

    name = "amqp"
    faults = AMQP_FAULTS
    secrets = (AMQP_PASSWORD,)
    not_applicable = AMQP_NOT_APPLICABLE

    def __init__(self, broker: RabbitMQ) -> None:
        self.broker = broker
        self.proxy = AmqpFaultProxy(broker.amqp_port)
        self.exchange = f"contract-{secrets.token_hex(4)}"
        self.received: list[bytes] = []
        self._changed = asyncio.Condition()
        self._consumer: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> None:
        await self.proxy.start()
        self._consumer = await aio_pika.connect(self.broker.amqp_url)
        channel = await self._consumer.channel()
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="contract.sensor")
        await queue.consume(self._receive, no_ack=True)

    async def _receive(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with self._changed:
            self.received.append(message.body)
            self._changed.notify_all()

    async def stop(self) -> None:
        await self.proxy.stop()
        if self._consumer is not None:
            await self._consumer.close()

    def connection(self) -> Connection:
        return parse_connection(
            {
                "id": CONNECTION_ID,
                "name": "contract",
                "connectorId": "actility-amqp-0.9.1-iot",
                "configuration": {
                    "hostName": f"{HOST}:{self.proxy.port}",
                    "username": self.broker.username,
                    "password": AMQP_PASSWORD,
                    "exchangeName": self.exchange,
                    "uplinkTopicPattern": "contract.{CustomerData.name}",
                    "downlinkEnabled": False,
                    "uplinkTimeValidity": "1h",
                },
            }
        )

    def sink(self, connection: Connection) -> Sink:
        return create_sink(connection, SinkContext(timeout=SESSION_TIMEOUT, max_in_flight=1))

    def play(self, fault: Fault) -> bytes | None:
        proxy = self.proxy
        if fault.name == "broker down":
            proxy.close_next_connection = True
        elif fault.name == "timeout":
            proxy.swallow_next_publish = True
        elif fault.name == "connection reset":
            proxy.reset_at_next_publish = True
        elif fault.name == "credentials refused":
            proxy.spoil_next_login = True
        elif fault.name == "unroutable":
            return document(0, name="nobody")
        elif fault.name == "routing key too long":
            return document(0, name="x" * 300)
        elif fault.name == "arbitrary exception":
            return b"{not json"
        else:
            raise AssertionError(fault)
        return None

    def hold(self) -> None:
        self.proxy.hold()

    def release(self) -> None:
        self.proxy.release()

    async def arrived(self, count: int) -> None:
        await self.proxy.wait_publishes(count)

    async def accepted(self, count: int) -> list[bytes]:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return list(self.received)

    async def check(self, fault: Fault) -> None:
        if fault.name in ("unroutable", "routing key too long"):
            # Only the next, ordinary uplink reached the consumer.
            (only,) = await self.accepted(1)
            assert orjson.loads(only)["DevEUI_uplink"]["FCntUp"] == 2

    async def ready(self, sink: Sink) -> None:
        now = time.time()
        warm_up = Delivery(0, CONNECTION_ID, "0018B20000000B20", now, now, document(0))
        await sink.send(warm_up)


# -- Azure IoT Hub: the local hub (registry + MQTT through the fault proxy) -----------------

AZURE_MQTT_FAULTS = tuple(
    f
    for f in MQTT_FAULTS
    if f.name in ("broker down", "timeout", "connection reset", "credentials refused")
)
# Played on the registry: a device's identity is created at its first uplink.
AZURE_HTTP_FAULTS = tuple(
    f
    for f in RETRYABLE + PERMANENT + AUTHENTICATION
    if f.status is not None and f.name != "HTTP 400 quoting the credentials"
)
AZURE_NOT_APPLICABLE = (
    ("HTTP 400 quoting the credentials", "the hub double never quotes a request back"),
    ("header template renders a line break", "Azure connections have no header templates"),
    (
        "arbitrary exception",
        "the Azure sink reads no document it is given (fixed topic, DevEUI from the delivery)",
    ),
)


class AzureKind(SinkKind):
    """AzureSink (`actility-azure-iot`) against FakeIotHub: registry faults on the first
    identity request, MQTT faults through the hub's login proxy."""

    name = "azure"
    faults = AZURE_MQTT_FAULTS + AZURE_HTTP_FAULTS
    not_applicable = AZURE_NOT_APPLICABLE

    def __init__(self) -> None:
        self.hub = FakeIotHub(_pki())
        self.secrets = (self.hub.policy_key,)

    async def start(self) -> None:
        await self.hub.start()

    async def stop(self) -> None:
        await self.hub.stop()

    def connection(self) -> Connection:
        hub = self.hub
        return parse_connection(
            {
                "id": CONNECTION_ID,
                "name": "contract",
                "connectorId": "actility-azure-iot",
                "configuration": {
                    "hostName": hub.hub,
                    "sharedAccessKeyName": AZURE_POLICY,
                    "sharedAccessKey": hub.policy_key,
                    "mqttEndpoint": hub.mqtt_endpoint,
                    "registryURL": hub.registry_url,
                    "trustedCaCertficate": hub.pki.ca,
                    "downlinkEnabled": False,
                    "uplinkTimeValidity": "1h",
                },
            }
        )

    def sink(self, connection: Connection) -> Sink:
        return create_sink(connection, SinkContext(timeout=SESSION_TIMEOUT, max_in_flight=1))

    def play(self, fault: Fault) -> bytes | None:
        hub, proxy = self.hub, self.hub.proxy
        assert proxy is not None
        if fault.name == "broker down":
            proxy.close_next_connection = True
        elif fault.name == "timeout":
            proxy.drop_next_publish = True
        elif fault.name == "connection reset":
            proxy.reset_at_next_publish = True
        elif fault.name == "credentials refused":
            proxy.refuse_next_connect = True
        elif fault.name == "HTTP 302 not followed":
            hub.fail_next(302, {"Location": f"{hub.registry_url}/elsewhere"})
        elif fault.name == "HTTP 429 Retry-After date":
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
            hub.fail_next(429, {"Retry-After": when})
        elif fault.retry_after is not None:
            hub.fail_next(429, {"Retry-After": str(int(fault.retry_after))})
        else:
            assert fault.status is not None, fault
            hub.fail_next(fault.status)
        return None

    def hold(self) -> None:
        assert self.hub.proxy is not None
        self.hub.proxy.hold()

    def release(self) -> None:
        if self.hub.proxy is not None:
            self.hub.proxy.release()

    async def arrived(self, count: int) -> None:
        assert self.hub.proxy is not None
        await self.hub.proxy.wait_publishes(count)

    async def accepted(self, count: int) -> list[bytes]:
        return [body for _, body in await self.hub.wait_received(count)]

    async def check(self, fault: Fault) -> None:
        if fault.status is not None:
            # The faulted request, then the identity created: never a second device.
            assert [s for _, _, s in self.hub.requests][-1] in (200, 409)
            assert list(self.hub.devices) == ["0018B20000000B20"]

    async def ready(self, sink: Sink) -> None:
        now = time.time()
        warm_up = Delivery(0, CONNECTION_ID, "0018B20000000B20", now, now, document(0))
        await sink.send(warm_up)


ECHO_KEY = "acme-s3cret-key-90b1"


class EchoKind(HttpKind):
    """The example third-party connector (examples/acme-echo, installed with pip) against
    the local webhook cloud: a plugin keeps the same contract as a built-in."""

    name = "acme-echo"
    # Its URL and headers are not templates: the header-injection fault does not apply.
    faults: tuple[Fault, ...] = tuple(
        f
        for f in RETRYABLE + PERMANENT + AUTHENTICATION
        if f.name != "header template renders a line break"
    )
    secrets = (ECHO_KEY,)

    def connection(self) -> Connection:
        connector = example_connector()
        configuration = connector.configuration.model_validate(
            {"url": self.cloud.url("/uplink"), "apiKey": ECHO_KEY, "uplinkTimeValidity": "1h"}
        )
        return Connection(
            id=CONNECTION_ID,
            name="contract",
            connectorId=connector.id,
            configuration=configuration,
        )

    def sink(self, connection: Connection) -> Sink:
        context = SinkContext(timeout=SEND_TIMEOUT, max_in_flight=1)
        return example_connector().create_sink(connection, context)

    async def check(self, fault: Fault) -> None:
        await super().check(fault)
        for request in self.cloud.all_requests:
            assert request.headers["X-Acme-Key"] == ECHO_KEY
            assert request.headers["X-Acme-Device"] == "0018B20000000B20"
        attempts = [r.headers["X-Acme-Attempt"] for r in self.cloud.requests_to("/uplink")]
        # The faulted delivery's tries count up; the next delivery starts again at 1.
        expected = ["1", "1"] if fault.expect == "failed" else ["1", "2", "1"]
        assert attempts == expected, attempts


# -- ThingsBoard, Splunk HEC, InfluxDB: the local doubles of their web APIs ------------------

NO_HEADER_TEMPLATES = "the connection has no header templates"


class WebKind(SinkKind):
    """A sink of the web API doubles (support/webdoubles.py): faults are injected answers
    in the API's own error shape; `accepted` rebuilds each document from its frame counter,
    as what the cloud keeps is its own record of the uplink."""

    double: ServiceDouble
    connector: str
    not_applicable: tuple[tuple[str, str], ...] = (
        ("header template renders a line break", NO_HEADER_TEMPLATES),
    )

    async def start(self) -> None:
        await self.double.start()

    async def stop(self) -> None:
        await self.double.stop()

    @abstractmethod
    def configuration(self) -> dict[str, Any]: ...

    @abstractmethod
    def counters(self) -> list[int]:
        """The frame counter of each uplink the cloud holds, in order."""

    def quoting(self) -> Any:
        """An error body that quotes the connection's credential back."""
        return {"message": f"refused: {self.secrets[0]}"}

    def connection(self) -> Connection:
        return parse_connection(
            {
                "id": CONNECTION_ID,
                "name": "contract",
                "connectorId": self.connector,
                "configuration": {"uplinkTimeValidity": "1h", **self.configuration()},
            }
        )

    def sink(self, connection: Connection) -> Sink:
        return create_sink(connection, SinkContext(timeout=SEND_TIMEOUT, max_in_flight=1))

    def play(self, fault: Fault) -> bytes | None:
        double = self.double
        if fault.name == "timeout":
            double.fail(hang=True)
        elif fault.name == "connection reset":
            double.fail(reset=True)
        elif fault.name == "HTTP 400 quoting the credentials":
            double.fail(400, body=self.quoting())
        elif fault.name == "HTTP 302 not followed":
            double.fail(302, headers={"Location": double.url("/elsewhere")})
        elif fault.name == "HTTP 429 Retry-After date":
            when = datetime.now(UTC) + timedelta(seconds=30)
            double.fail(429, retry_after=format_datetime(when, usegmt=True))
        elif fault.name == "document is not an uplink":
            return b'{"not": "an uplink"}'
        else:
            assert fault.status is not None, fault
            double.fail(
                fault.status,
                retry_after=int(fault.retry_after) if fault.retry_after is not None else None,
                body=self.bodies.get(fault.name),
            )
        return None

    bodies: dict[str, Any] = {}  # noqa: RUF012 (read only: a kind's error bodies by fault)

    def hold(self) -> None:
        self.double.hold()

    def release(self) -> None:
        self.double.release()

    async def arrived(self, count: int) -> None:
        await self.double.wait_until(lambda: len(self.double.requests) >= count, what="requests")

    async def accepted(self, count: int) -> list[bytes]:
        await self.double.wait_until(lambda: len(self.counters()) >= count, what="records")
        return [document(n) for n in self.counters()]

    async def check(self, fault: Fault) -> None:
        if fault.name == "HTTP 302 not followed":
            assert "/elsewhere" not in [c.path for c in self.double.requests]
        if fault.name == "document is not an uplink":
            # Refused before sending: the cloud only saw the next, ordinary uplink.
            assert len(self.double.requests) == 1


TB_TOKEN = "tb-s3cret-device-token-4c2e"
TB_FAULTS = (
    *(f for f in RETRYABLE + PERMANENT if f.name != "header template renders a line break"),
    # A device's token refused concerns that device alone: failed, saying which device, not
    # the whole connection's credentials.
    Fault("HTTP 401 device token refused", "failed", 401, error="HTTP 401: ThingsBoard refused"),
    Fault("HTTP 403", "auth", 403, error="HTTP 403"),
    Fault("HTTP 413 payload too large", "failed", 413, error="HTTP 413"),
    Fault("document is not an uplink", "failed", error="uplink document unreadable"),
)


class ThingsBoardKind(WebKind):
    name = "thingsboard"
    connector = "actility-thingsboard-iot"
    faults = TB_FAULTS
    secrets = (TB_TOKEN,)
    not_applicable = (
        *WebKind.not_applicable,
        ("HTTP 401", "ThingsBoard's 401 is one device's token: 'HTTP 401 device token refused'"),
    )

    def __init__(self) -> None:
        self.board = FakeThingsBoard()
        self.double = self.board
        self.board.add_device("0018B20000000B20", TB_TOKEN)

    def configuration(self) -> dict[str, Any]:
        return {"hostName": self.board.base_url, "accessTokens": {"0018B20000000B20": TB_TOKEN}}

    def counters(self) -> list[int]:
        return [r["values"]["fCnt"] for r in self.board.records("0018B20000000B20")]

    async def check(self, fault: Fault) -> None:
        await super().check(fault)
        for call in self.board.requests:
            assert call.path == f"/api/v1/{TB_TOKEN}/telemetry"


HEC_TOKEN = "hec-s3cret-token-8d1f"
HEC_FAULTS = (
    *(f for f in RETRYABLE + PERMANENT + AUTHENTICATION
      if f.name != "header template renders a line break"),
    Fault("HEC 503 server busy", "retried", 503, error="HTTP 503: Server is busy (code 9)"),
    Fault("HEC 403 invalid token", "auth", 403, error="HTTP 403: Invalid token (code 4)"),
    Fault("HEC 400 incorrect index", "failed", 400, error="HTTP 400: Incorrect index (code 7)"),
    Fault("HEC 413 content too large", "failed", 413, error="HTTP 413"),
)  # fmt: skip


class SplunkKind(WebKind):
    name = "splunk"
    connector = "actility-splunk-iot"
    faults = HEC_FAULTS
    secrets = (HEC_TOKEN,)
    bodies = {  # noqa: RUF012
        "HEC 503 server busy": hec("Server is busy", 9),
        "HEC 403 invalid token": hec("Invalid token", 4),
        "HEC 400 incorrect index": hec("Incorrect index", 7),
    }

    def __init__(self) -> None:
        self.hec = FakeSplunkHec(HEC_TOKEN)
        self.double = self.hec

    def configuration(self) -> dict[str, Any]:
        return {"hostName": self.hec.base_url, "hecToken": HEC_TOKEN}

    def quoting(self) -> Any:
        return hec(f"Invalid data format; Authorization: Splunk {HEC_TOKEN}", 6)

    def counters(self) -> list[int]:
        return [e["event"]["DevEUI_uplink"]["FCntUp"] for e in self.hec.events]

    async def check(self, fault: Fault) -> None:
        await super().check(fault)
        for call in self.hec.requests:
            assert call.headers["Authorization"] == f"Splunk {HEC_TOKEN}"


INFLUX_TOKEN = "influx-s3cret-token-31aa"
INFLUX_FAULTS = (
    *(f for f in RETRYABLE + PERMANENT + AUTHENTICATION
      if f.name != "header template renders a line break"),
    Fault("InfluxDB 503 Retry-After", "retried", 503, retry_after=30, error="HTTP 503"),
    Fault("InfluxDB 404 bucket", "failed", 404, error='HTTP 404: bucket "lora" not found'),
    Fault("InfluxDB 422 field type conflict", "failed", 422, error="HTTP 422: failure writing"),
    Fault("InfluxDB 413", "failed", 413, error="HTTP 413"),
    Fault("document is not an uplink", "failed", error="uplink document unreadable"),
)  # fmt: skip


class InfluxDbKind(WebKind):
    name = "influxdb"
    connector = "actility-influxdb-iot"
    faults = INFLUX_FAULTS
    secrets = (INFLUX_TOKEN,)
    bodies = {  # noqa: RUF012
        "InfluxDB 404 bucket": {"code": "not found", "message": 'bucket "lora" not found'},
        "InfluxDB 422 field type conflict": {
            "code": "unprocessable entity",
            "message": "failure writing points to database: partial write: field type conflict",
        },
    }

    def __init__(self) -> None:
        self.influx = FakeInfluxDb(INFLUX_TOKEN)
        self.double = self.influx

    def configuration(self) -> dict[str, Any]:
        return {
            "hostName": self.influx.base_url,
            "org": "acme",
            "bucket": "lora",
            "token": INFLUX_TOKEN,
        }

    def counters(self) -> list[int]:
        return [int(p.fields["fCnt"]) for p in self.influx.written()]


KINDS: tuple[type[SinkKind], ...] = (
    HttpKind,
    RaisingKind,
    MqttKind,
    AwsKind,
    CumulocityKind,
    EchoKind,
    ThingsBoardKind,
    SplunkKind,
    InfluxDbKind,
    AmqpKind,
    AzureKind,
)


# -- the worker around a sink --------------------------------------------------------------


class Harness:
    """A real worker (one in flight, so that a dead worker task shows at once) and what
    it decided: spool completions, events, statistics, metrics, log lines."""

    def __init__(self, kind: SinkKind, spool: Spool) -> None:
        self.kind = kind
        self.spool = spool
        self.clock = ManualClock()
        self.connection = kind.connection()
        self.sink = kind.sink(self.connection)
        self.metrics = Metrics()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.completed: list[int] = []
        self._changed = asyncio.Condition()
        original = spool.complete

        def complete(delivery_id: int, **final: Any) -> None:
            original(delivery_id, **final)
            self.completed.append(delivery_id)
            asyncio.get_running_loop().create_task(self._notify())

        spool.complete = complete  # type: ignore[method-assign]
        self.worker = ConnectionWorker(
            self.connection,
            self.sink,
            spool=spool,
            metrics=self.metrics,
            settings=DeliverySettings(
                retry_initial=timedelta(milliseconds=10),
                retry_max=timedelta(seconds=5),
                max_in_flight=1,
                circuit_failures=1000,
            ),
            record=self._record,
            clock=self.clock.time,
            sleep=self.clock.sleep,
        )

    def _record(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def feed(self, body: bytes | None = None, n: int = 1) -> Delivery:
        now = self.clock.time()
        (delivery,) = await self.spool.append(
            body if body is not None else document(n),
            dev_eui="0018B20000000B20",
            uplink_time=now,
            received_at=now,
            connection_ids=[CONNECTION_ID],
        )
        self.worker.offer(delivery)
        return delivery

    async def finished(self, delivery: Delivery) -> None:
        await self.until(lambda: delivery.id in self.completed)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, data in self.events if k == kind]

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "iotflow_deliveries_total", {"connection": CONNECTION_ID, "outcome": outcome}
        )
        return value or 0.0


def make_kind(kind_type: type[SinkKind], request: pytest.FixtureRequest) -> SinkKind:
    """A kind; the AMQP one gets the suite's RabbitMQ node (a session fixture: it takes
    seconds to start)."""
    if issubclass(kind_type, AmqpKind):
        return kind_type(request.getfixturevalue("rabbitmq"))
    return kind_type()


@pytest.fixture(params=KINDS, ids=lambda k: k.name)
async def kind(request: pytest.FixtureRequest) -> AsyncIterator[SinkKind]:
    made = make_kind(request.param, request)
    await made.start()
    yield made
    made.release()
    await made.stop()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "spool.db")
    yield spool
    await spool.close()


@pytest.fixture
async def harness(kind: SinkKind, spool: Spool) -> AsyncIterator[Harness]:
    made = Harness(kind, spool)
    await made.worker.start()
    yield made
    await made.worker.stop(time.monotonic() + 1)


def _cases() -> list[Any]:
    cases = [
        pytest.param(k, fault, id=f"{k.name}-{fault.name}") for k in KINDS for fault in k.faults
    ]
    skipped = [
        pytest.param(
            k, Fault(case, "n/a"), id=f"{k.name}-{case}", marks=pytest.mark.skip(reason=why)
        )
        for k in KINDS
        for case, why in k.not_applicable
    ]
    return cases + skipped


# -- the contract --------------------------------------------------------------------------


async def test_delivered(harness: Harness) -> None:
    first = await harness.feed(n=1)
    second = await harness.feed(n=2)
    await harness.finished(second)
    assert await harness.kind.accepted(2) == [first.document, second.document]
    stats = harness.worker.stats
    assert (stats.delivered, stats.failed, stats.retried, stats.pending) == (2, 0, 0, 0)
    assert stats.lastError is None
    assert harness.count("delivered") == 2
    assert harness.worker.state == "OPENED"
    assert harness.clock.sleeps == []


@pytest.mark.parametrize(("kind_type", "fault"), _cases())
async def test_fault(
    kind_type: type[SinkKind], fault: Fault, spool: Spool, request: pytest.FixtureRequest
) -> None:
    made = make_kind(kind_type, request)
    await made.start()
    harness = Harness(made, spool)
    try:
        with structlog.testing.capture_logs() as logs:
            await harness.worker.start()
            body = made.play(fault)
            faulted = await harness.feed(body, n=1)
            await harness.finished(faulted)
            # Whatever happened to that one, the worker (the only one) delivers the next.
            following = await harness.feed(n=2)
            await harness.finished(following)
        _check(harness, fault, faulted, following)
        await made.check(fault)
        _no_secret_anywhere(harness, logs)
    finally:
        made.release()
        await harness.worker.stop(time.monotonic() + 1)
        await made.stop()


def _check(harness: Harness, fault: Fault, faulted: Delivery, following: Delivery) -> None:
    stats = harness.worker.stats
    if fault.error is not None:
        assert stats.lastError is not None
        assert stats.lastError.startswith(fault.error), stats.lastError
    if fault.expect == "failed":
        assert (stats.failed, stats.delivered, stats.retried) == (1, 1, 0)
        assert harness.count("failed") == 1
        (event,) = harness.kinds("delivery_failed")
        assert event["attempts"] == 1
        assert event["reason"] == stats.lastError
        if fault.status is not None:
            assert event["status"] == fault.status
        assert harness.clock.sleeps == []
        assert harness.worker.state == "OPENED"
        return
    # Retried once, then delivered: both documents reached the cloud, in order.
    assert (stats.failed, stats.delivered, stats.retried) == (0, 2, 1), stats
    assert harness.count("delivered") == 2
    assert harness.kinds("delivery_failed") == []
    (wait,) = harness.clock.sleeps
    if fault.retry_after is not None:
        assert wait >= fault.retry_after
    states = [e["state"] for e in harness.kinds("state_changed")]
    if fault.expect == "auth":
        assert states[-2:] == ["AUTHENTICATION_FAILED", "OPENED"]
    else:
        assert "AUTHENTICATION_FAILED" not in states
    assert harness.worker.state == "OPENED"


def _no_secret_anywhere(harness: Harness, logs: list[MutableMapping[str, Any]]) -> None:
    stored = orjson.dumps(
        {"events": harness.events, "statistics": harness.worker.stats.document(), "logs": logs},
        default=str,
    ).decode()
    for secret in harness.kind.secrets:
        assert secret not in stored


async def test_a_cloud_quoting_the_credentials_is_stored_redacted(spool: Spool) -> None:
    made = HttpKind()
    await made.start()
    harness = Harness(made, spool)
    try:
        await harness.worker.start()
        made.cloud.set_behaviour(Behaviour(status=400, echo=True), times=1)
        faulted = await harness.feed(n=1)
        await harness.finished(faulted)
        (request,) = made.cloud.requests_to("/uplink")
        # The cloud did get them and quote them ...
        assert request.headers["Authorization"] == f"Token {TOKEN}"
        assert request.query["authorization"] == TAGO_AUTHORIZATION
        (event,) = harness.kinds("delivery_failed")
        # ... and what iotflow kept of its answer has them masked.
        quoted = orjson.loads(event["body"])["request"]
        assert quoted["headers"]["Authorization"] == "*****"
        assert quoted["query"]["authorization"] == "*****"
        assert TOKEN not in event["body"]
        assert TAGO_AUTHORIZATION not in event["body"]
    finally:
        await harness.worker.stop(time.monotonic() + 1)
        await made.stop()


async def test_close_during_a_send(harness: Harness, spool: Spool) -> None:
    """Stopping the worker while a send hangs: the send is given up at the deadline, the
    delivery stays in the spool (neither delivered nor failed), the sink is closed."""
    harness.kind.hold()
    delivery = await harness.feed(n=1)
    await harness.kind.arrived(1)
    started = time.monotonic()
    await harness.worker.stop(time.monotonic() + 0.2)
    assert time.monotonic() - started < 5
    assert delivery.id not in harness.completed
    assert harness.events == [e for e in harness.events if e[0] == "state_changed"]
    assert harness.worker.stats.pending == 1
    assert not await harness.sink.healthcheck()
    await spool.flush()
    assert await spool.pending_counts() == {CONNECTION_ID: 1}


async def test_close_ends_a_send_in_flight(kind: SinkKind, spool: Spool) -> None:
    """A sink closed under a send: the send ends promptly, as a retryable error (it may
    not have reached the cloud), and never hangs past its own timeout."""
    harness = Harness(kind, spool)
    sink = harness.sink
    await sink.start()
    kind.hold()
    now = time.time()
    (delivery,) = await spool.append(
        document(1),
        dev_eui="0018B20000000B20",
        uplink_time=now,
        received_at=now,
        connection_ids=[CONNECTION_ID],
    )
    sending = asyncio.create_task(sink.send(delivery))
    await kind.arrived(1)
    await sink.close()
    async with asyncio.timeout(SESSION_TIMEOUT + 5):
        with pytest.raises(SinkError) as caught:
            await sending
    assert isinstance(caught.value, RetryableSinkError)
    # A send after close is refused the same way, not an AttributeError or an assertion.
    with pytest.raises(RetryableSinkError):
        await sink.send(delivery)


async def test_healthcheck(kind: SinkKind) -> None:
    sink = kind.sink(kind.connection())
    assert not await sink.healthcheck()
    await sink.start()
    await kind.ready(sink)
    assert await sink.healthcheck()
    await sink.close()
    assert not await sink.healthcheck()
    await sink.close()  # twice is harmless
