"""`actility-amqp-0.9.1-iot` against the suite's real RabbitMQ: what the sink contract suite
(test_sink_contract.py) does not show: the product's bodies, the exchange declared when
missing, refused credentials and virtual hosts, downlinks from the bound queue, and a
fleet's instances sharing that queue (each downlink handed over once)."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import secrets
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq.exceptions
import orjson
import pytest
from yarl import URL

from fixtures_path import SEEDS
from iotflow.connectors import parse_connection
from iotflow.connectors.amqp import AmqpConfig
from iotflow.downlinks import DownlinkRequest
from iotflow.errors import AuthenticationSinkError, PermanentSinkError, RetryableSinkError
from iotflow.sinks import SinkContext, create_sink
from iotflow.sinks.amqp import AmqpSink, DownlinkKey, _ClosedOnFailure, queue_name
from iotflow.spool import Delivery
from support.ports import free_port
from support.rabbitmq import RabbitMQ
from support.uplinks import actility

DEV_EUI = "0018B20000000A01"


def product_bodies() -> list[dict[str, Any]]:
    text = (SEEDS / "amqp.md").read_text()
    return [
        json.loads(b)
        for b in re.findall(r"```json\s*\n(?:POST /connections\s*\n)?(.*?)```", text, re.S)
    ]


def test_the_products_bodies_are_valid_as_they_are() -> None:
    bodies = product_bodies()
    assert [b["configuration"]["protocol"] for b in bodies] == ["TCP", "SSL"]
    for body in bodies:
        connection = parse_connection({"id": "seed", **body})
        config = connection.configuration
        assert isinstance(config, AmqpConfig)
        assert config.exchangeName == "IotFlowExchange"
        assert config.virtualHost == "/"


def test_the_binding_key_and_the_devEUI_of_a_routing_key() -> None:
    key = DownlinkKey("{profile}.amqp.things.{DevEUI}.downlink")
    assert key.binding == "*.amqp.things.*.downlink"
    assert key.dev_eui("demo.amqp.things.0018B20000000A01.downlink") == "0018B20000000A01"
    # A dot inside braces is a path, not a word boundary.
    named = DownlinkKey("sites.{CustomerData.name}.dev-{DevEUI}.cmd")
    assert named.binding == "sites.*.*.cmd"
    assert named.dev_eui("sites.office.dev-0018b20000000a01.cmd") == "0018b20000000a01"
    assert named.dev_eui("sites.office") is None


def test_one_downlink_queue_per_connection_and_fleet() -> None:
    assert queue_name("c1", "") == "iotflow.c1.downlinks"
    assert queue_name("c1", "fleet-a") == "iotflow.fleet-a.c1.downlinks"


def connection_of(broker: RabbitMQ, cid: str = "amqp", **config: Any) -> Any:
    return parse_connection(
        {
            "id": cid,
            "name": cid,
            "connectorId": "actility-amqp-0.9.1-iot",
            "configuration": {
                "hostName": f"127.0.0.1:{broker.amqp_port}",
                "username": broker.username,
                "password": broker.password,
                **config,
            },
        }
    )


def delivery(n: int, dev_eui: str = DEV_EUI) -> Delivery:
    now = time.time()
    return Delivery(n, "amqp", dev_eui, now, now, orjson.dumps(actility(dev_eui, n)))


@pytest.fixture
async def client(rabbitmq: RabbitMQ) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    yield connection
    await connection.close()


async def test_a_missing_exchange_is_declared_and_unroutable_uplinks_are_permanent(
    rabbitmq: RabbitMQ, client: aio_pika.abc.AbstractConnection
) -> None:
    exchange = f"fresh-{secrets.token_hex(4)}"
    sink = create_sink(
        connection_of(rabbitmq, exchangeName=exchange, downlinkEnabled=False),
        SinkContext(timeout=5, max_in_flight=4),
    )
    await sink.start()
    try:
        # Declared (durable, topic), but no queue is bound yet: the broker returns it.
        with pytest.raises(PermanentSinkError, match="unroutable"):
            await sink.send(delivery(1))
        channel = await client.channel()
        declared = await channel.declare_exchange(exchange, passive=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(declared, routing_key="tpx.things.*.uplink")
        await sink.send(delivery(2))
        async with asyncio.timeout(10):
            message = await queue.get(timeout=5)
        assert message.routing_key == f"tpx.things.{DEV_EUI}.uplink"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert orjson.loads(message.body)["DevEUI_uplink"]["FCntUp"] == 2
        # A durable exchange: a second declaration with durable=False is refused.
        other = await client.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await other.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=False)
    finally:
        await sink.close()


@pytest.mark.parametrize(
    "config", [{"password": "wrong"}, {"virtualHost": "no-such-vhost"}], ids=["password", "vhost"]
)
async def test_refused_credentials_are_an_authentication_error(
    rabbitmq: RabbitMQ, config: dict[str, Any]
) -> None:
    sink = create_sink(
        connection_of(rabbitmq, downlinkEnabled=False, **config),
        SinkContext(timeout=5, max_in_flight=1),
    )
    await sink.start()
    try:
        with pytest.raises(AuthenticationSinkError) as caught:
            await sink.send(delivery(1))
        assert rabbitmq.password not in str(caught.value)
        assert not await sink.healthcheck()
    finally:
        await sink.close()


class Handed:
    """The downlink path: what the sinks handed over, by whom."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, DownlinkRequest]] = []
        self.changed = asyncio.Condition()

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None:
        async with self.changed:
            self.requests.append((connection_id, request))
            self.changed.notify_all()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(20), self.changed:
            await self.changed.wait_for(lambda: len(self.requests) >= count)


async def publish(
    client: aio_pika.abc.AbstractConnection, exchange: str, key: str, body: Any
) -> None:
    channel = await client.channel()
    target = await channel.get_exchange(exchange)
    await target.publish(aio_pika.Message(orjson.dumps(body)), routing_key=key)
    await channel.close()


async def test_downlinks_from_the_bound_queue_reach_the_downlink_path(
    rabbitmq: RabbitMQ, client: aio_pika.abc.AbstractConnection
) -> None:
    handed = Handed()
    cid = f"dl-{secrets.token_hex(3)}"
    sink = create_sink(
        connection_of(rabbitmq, cid, downlinkPort=12),
        SinkContext(timeout=5, max_in_flight=1, downlink=handed),
    )
    assert isinstance(sink, AmqpSink)
    await sink.start()
    try:
        # No queue for uplinks in this test: unroutable, but the connection is open.
        with pytest.raises(PermanentSinkError):
            await sink.send(delivery(1))
        await publish(client, "amq.topic", f"tpx.things.{DEV_EUI}.downlink", {"x": 1})  # refused
        body = {"DevEUI_downlink": {"payload_hex": "0a0b", "CorrelationID": "c-7"}}
        await publish(client, "amq.topic", f"tpx.things.{DEV_EUI.lower()}.downlink", body)
        await handed.until(1)
        ((connection_id, request),) = handed.requests
        assert connection_id == cid
        assert (request.dev_eui, request.f_port, request.payload) == (DEV_EUI, 12, b"\x0a\x0b")
        assert request.correlation_id == "c-7"
        # Both were acknowledged: nothing is left in the connection's queue.
        channel = await client.channel()
        queue = await channel.declare_queue(sink.queue, passive=True)
        assert queue.declaration_result.message_count == 0
    finally:
        await sink.close()


async def test_a_fleet_consumes_one_queue_and_hands_each_downlink_over_once(
    rabbitmq: RabbitMQ, client: aio_pika.abc.AbstractConnection
) -> None:
    handed = Handed()
    cid = f"fleet-{secrets.token_hex(3)}"
    context = SinkContext(timeout=5, max_in_flight=1, downlink=handed, shared_group="fleet")
    sinks = [create_sink(connection_of(rabbitmq, cid, downlinkPort=3), context) for _ in range(2)]
    for sink in sinks:
        await sink.start()
        with pytest.raises(PermanentSinkError):  # opens the connection; no uplink queue
            await sink.send(delivery(1))
    try:
        for n in range(8):
            body = {"DevEUI_downlink": {"payload_hex": f"{n:02x}"}}
            await publish(client, "amq.topic", f"tpx.things.{DEV_EUI}.downlink", body)
        await handed.until(8)
        payloads = sorted(r.payload[0] for _, r in handed.requests)
        assert payloads == list(range(8))  # each once, none twice
    finally:
        for sink in sinks:
            await sink.close()


# -- SSL ---------------------------------------------------------------------------------


def tls_connection(broker: RabbitMQ, **config: Any) -> Any:
    return connection_of(
        broker,
        hostName=f"127.0.0.1:{broker.amqps_port}",
        protocol="SSL",
        downlinkEnabled=False,
        **config,
    )


async def test_ssl_with_the_brokers_ca_and_a_client_certificate(
    rabbitmq: RabbitMQ, client: aio_pika.abc.AbstractConnection
) -> None:
    assert rabbitmq.tls is not None
    pki = rabbitmq.tls
    channel = await client.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind("amq.topic", routing_key=f"tls.{DEV_EUI}")
    for extra in (
        {},
        {"certificate": pki.client.certificate, "privateKey": pki.client.private_key},
    ):
        sink = create_sink(
            tls_connection(
                rabbitmq,
                trustedCaCertficate=pki.ca,
                uplinkTopicPattern="tls.{DevEUI}",
                **extra,
            ),
            SinkContext(timeout=5, max_in_flight=1),
        )
        await sink.start()
        try:
            await sink.send(delivery(1))
            message = await queue.get(timeout=5)
            assert orjson.loads(message.body)["DevEUI_uplink"]["DevEUI"] == DEV_EUI
        finally:
            await sink.close()


@pytest.mark.parametrize("case", ["broker not trusted", "product's shortened PEM"])
async def test_ssl_refusals_are_authentication_errors(rabbitmq: RabbitMQ, case: str) -> None:
    assert rabbitmq.tls is not None
    pki = rabbitmq.tls
    config: dict[str, Any] = {
        "broker not trusted": {"trustedCaCertficate": pki.rogue_ca},
        "product's shortened PEM": {
            "certificate": product_bodies()[1]["configuration"]["certificate"],
            "privateKey": product_bodies()[1]["configuration"]["privateKey"],
        },
    }[case]
    sink = create_sink(tls_connection(rabbitmq, **config), SinkContext(timeout=5, max_in_flight=1))
    await sink.start()
    try:
        with pytest.raises(AuthenticationSinkError):
            await sink.send(delivery(1))
    finally:
        await sink.close()


async def test_a_nack_is_retryable(
    rabbitmq: RabbitMQ, client: aio_pika.abc.AbstractConnection
) -> None:
    """A queue at its length limit with `reject-publish` makes the broker nack (RabbitMQ's
    publisher confirms: "basic.nack ... when the message cannot be enqueued")."""
    exchange = f"full-{secrets.token_hex(4)}"
    channel = await client.channel()
    target = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await queue.bind(target, routing_key="#")
    sink = create_sink(
        connection_of(rabbitmq, exchangeName=exchange, downlinkEnabled=False),
        SinkContext(timeout=5, max_in_flight=1),
    )
    await sink.start()
    try:
        await sink.send(delivery(1))  # takes the queue's only place
        with pytest.raises(RetryableSinkError, match="refused"):
            await sink.send(delivery(2))
        await queue.get(timeout=5)  # room again: the retry goes through
        await sink.send(delivery(2))
    finally:
        await sink.close()


async def test_the_products_patterns_route_both_ways(
    rabbitmq: RabbitMQ, client: aio_pika.abc.AbstractConnection
) -> None:
    """`{profile}.amqp.things.{DevEUI}.uplink`: iotflow's uplinks have no `profile`, so the
    first word is empty; `*` matches an empty word, so the product's keys still route."""
    (tcp, _) = product_bodies()
    patterns = {k: tcp["configuration"][k] for k in ("uplinkTopicPattern", "downlinkTopicPattern")}
    exchange = f"IotFlowExchange-{secrets.token_hex(3)}"
    handed = Handed()
    sink = create_sink(
        connection_of(
            rabbitmq, f"p-{secrets.token_hex(3)}", exchangeName=exchange, downlinkPort=4, **patterns
        ),
        SinkContext(timeout=5, max_in_flight=1, downlink=handed),
    )
    await sink.start()
    try:
        with pytest.raises(PermanentSinkError):  # declares the exchange; nothing bound yet
            await sink.send(delivery(1))
        channel = await client.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="*.amqp.things.*.uplink")
        await sink.send(delivery(2))
        message = await queue.get(timeout=5)
        assert message.routing_key == f".amqp.things.{DEV_EUI}.uplink"
        body = {"DevEUI_downlink": {"payload_hex": "ff"}}
        await publish(client, exchange, f".amqp.things.{DEV_EUI}.downlink", body)
        await handed.until(1)
        assert handed.requests[0][1].dev_eui == DEV_EUI
    finally:
        await sink.close()


async def test_a_failed_connect_leaves_its_connection_closed() -> None:
    """aio-pika drops a connection whose connect failed without closing it, and its
    `__del__` then makes a `close()` coroutine nothing awaits (a warning at garbage
    collection, seen failing a later test): the sink's connections close themselves."""
    connection = _ClosedOnFailure(URL(f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    with pytest.raises(ConnectionError):
        await connection.connect(timeout=5)
    assert connection.is_closed


async def test_a_connection_collected_in_another_thread_is_closed_quietly() -> None:
    """A connection lost or given up on (a close cut short by its timeout) can be collected
    by a garbage collection that runs in another thread (aiosqlite's, say): aio-pika's
    `__del__` would make there a `close()` coroutine that no loop runs, a warning that
    failed CI once more. It is closed on its own loop instead."""
    connection = _ClosedOnFailure(URL("amqp://guest:guest@127.0.0.1:1/"))
    closed = connection.closed()
    holder = [connection]
    del connection

    def collect() -> None:
        holder.clear()
        gc.collect()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await asyncio.to_thread(collect)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []
    assert await asyncio.wait_for(closed, 5) is True
