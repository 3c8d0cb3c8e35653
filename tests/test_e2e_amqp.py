"""End to end: `iotflow run` as a process routing uplinks from the suite's Mosquitto to a
real RabbitMQ over AMQP 0.9.1 (`actility-amqp-0.9.1-iot`), and downlinks back.

The restart test has a node of its own (it stops and starts it with deliveries in flight);
the others use the suite's node.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiomqtt
import orjson
import pytest

from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.rabbitmq import RabbitMQ
from support.uplinks import uplink

pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer test-token"}


def amqp_connection(
    cid: str, broker: RabbitMQ, exchange: str, devices: list[str], **config: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "name": f"test {cid}",
        "connectorId": "actility-amqp-0.9.1-iot",
        "devices": devices,
        "configuration": {
            "hostName": f"{broker.host}:{broker.amqp_port}",
            "protocol": "TCP",
            "username": broker.username,
            "password": broker.password,
            "exchangeName": exchange,
            "uplinkTopicPattern": "tpx.things.{DevEUI}.uplink",
            "downlinkEnabled": False,
            **config,
        },
    }


async def application_queue(broker: RabbitMQ, exchange: str, name: str) -> None:
    """The cloud application's durable queue, bound to every uplink of the exchange."""
    connection = await aio_pika.connect(broker.amqp_url)
    async with connection:
        channel = await connection.channel()
        target = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(target, routing_key="tpx.things.*.uplink")


async def drain(broker: RabbitMQ, name: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    """Messages of the application's queue, (routing key, document), until `count` distinct
    uplinks came (at least once: a message confirmed late is also sent again)."""
    found: list[tuple[str, dict[str, Any]]] = []
    distinct: set[tuple[str, int]] = set()
    connection = await aio_pika.connect(broker.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True)
        async with asyncio.timeout(60), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                document = orjson.loads(message.body)
                found.append((message.routing_key or "", document))
                inner = document["DevEUI_uplink"]
                distinct.add((inner["DevEUI"], inner["FCntUp"]))
                if len(distinct) >= count:
                    break
    return found


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def connection(daemon: DaemonProcess, cid: str) -> dict[str, Any]:
    url = f"{daemon.api}/iot-flow/v1/connections/{cid}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=AUTH) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
    return document


async def delivered(daemon: DaemonProcess, cid: str) -> float:
    return await daemon.metric("iotflow_deliveries_total", connection=cid, outcome="delivered")


async def until_delivered(daemon: DaemonProcess, cid: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await delivered(daemon, cid) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{await delivered(daemon, cid)} delivered:\n{daemon.tail()}")
        await asyncio.sleep(0.1)  # a bounded poll of another process's API


async def test_uplinks_reach_the_exchange_with_their_routing_keys(
    tmp_path: Path, mosquitto: Mosquitto, rabbitmq: RabbitMQ, daemons: list[DaemonProcess]
) -> None:
    devices = {"actility": "0018B20000002A01", "chirpstack": "A840414FC1822A02"}
    exchange, queue = f"e2e-{secrets.token_hex(3)}", f"app-{secrets.token_hex(3)}"
    await application_queue(rabbitmq, exchange, queue)
    daemon = DaemonProcess(
        tmp_path / "amqp",
        broker_url=mosquitto.url,
        connections=[amqp_connection("cloud-amqp", rabbitmq, exchange, list(devices.values()))],
    )
    daemons.append(daemon)
    await daemon.start()
    await publish(mosquitto, [uplink(fmt, dev, 3) for fmt, dev in devices.items()])
    messages = await drain(rabbitmq, queue, 2)
    assert sorted(key for key, _ in messages) == sorted(
        f"tpx.things.{dev}.uplink" for dev in devices.values()
    )
    assert {doc["DevEUI_uplink"]["DevEUI"] for _, doc in messages} == set(devices.values())
    await until_delivered(daemon, "cloud-amqp", 2, timeout=30)
    document = await connection(daemon, "cloud-amqp")
    assert document["state"] == "OPENED"
    assert document["configuration"]["password"] == "*****"
    # The node's password is also the start of the daemon's MQTT client id: as a whole word.
    quoted = re.compile(rf"(?<![\w-]){re.escape(rabbitmq.password)}(?![\w-])")
    assert not quoted.search("\n".join(daemon.output))
    assert await daemon.stop() == 0


async def test_a_restarted_broker_loses_nothing_and_keeps_each_devices_order(
    tmp_path: Path, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    devices = ["0018B20000002B01", "0018B20000002B02", "0018B20000002B03"]
    per_device = 20
    total = per_device * len(devices)
    with RabbitMQ() as node:
        exchange, queue = "restart", "restart-app"
        await application_queue(node, exchange, queue)
        daemon = DaemonProcess(
            tmp_path / "amqp-restart",
            broker_url=mosquitto.url,
            connections=[amqp_connection("restart", node, exchange, devices)],
            delivery={"retry_initial": "200ms", "retry_max": "2s", "timeout": "5s"},
        )
        daemons.append(daemon)
        await daemon.start()
        uplinks = [uplink("actility", dev, n) for n in range(1, per_device + 1) for dev in devices]
        half = len(uplinks) // 2
        await publish(mosquitto, uplinks[:half])
        await until_delivered(daemon, "restart", 5, timeout=60)
        # Stopped while the second half comes in, started again on the same ports and data.
        stopping = asyncio.create_task(asyncio.to_thread(node.stop))
        await publish(mosquitto, uplinks[half:])
        await stopping
        await asyncio.to_thread(node.start)
        await until_delivered(daemon, "restart", total, timeout=180)
        messages = await drain(node, queue, total)
    counters: dict[str, list[int]] = {dev: [] for dev in devices}
    for _, doc in messages:
        inner = doc["DevEUI_uplink"]
        if inner["FCntUp"] not in counters[inner["DevEUI"]]:  # at least once: maybe twice
            counters[inner["DevEUI"]].append(inner["FCntUp"])
    # None lost, and each device's uplinks in the order they came.
    missing = {d: sorted(set(range(1, per_device + 1)) - set(c)) for d, c in counters.items()}
    assert not any(missing.values()), (missing, daemon.tail(30))
    unordered = {d: c for d, c in counters.items() if c != sorted(c)}
    assert not unordered, (unordered, daemon.tail(30))
    statistics = (await connection(daemon, "restart"))["statistics"]
    assert statistics["failed"] == 0
    assert statistics["retried"] > 0  # some were in flight or waiting while it was down


async def test_wrong_credentials_show_authentication_failed(
    tmp_path: Path, mosquitto: Mosquitto, rabbitmq: RabbitMQ, daemons: list[DaemonProcess]
) -> None:
    dev = "0018B20000002C01"
    daemon = DaemonProcess(
        tmp_path / "amqp-auth",
        broker_url=mosquitto.url,
        connections=[amqp_connection("refused", rabbitmq, "amq.topic", [dev], password="nope")],
    )
    daemons.append(daemon)
    await daemon.start()
    await publish(mosquitto, [uplink("actility", dev, 1)])
    deadline = time.monotonic() + 30
    while (state := (await connection(daemon, "refused"))["state"]) != "AUTHENTICATION_FAILED":
        if time.monotonic() > deadline:
            raise AssertionError(f"state {state}:\n{daemon.tail()}")
        await asyncio.sleep(0.1)  # a bounded poll of another process's API
    document = await connection(daemon, "refused")
    assert "refused" in document["statistics"]["lastError"]
    assert "nope" not in "\n".join(daemon.output)


async def test_a_downlink_from_the_queue_reaches_the_network_server(
    tmp_path: Path, mosquitto: Mosquitto, rabbitmq: RabbitMQ, daemons: list[DaemonProcess]
) -> None:
    dev = "0018B20000002D01"
    exchange, queue = f"e2e-dl-{secrets.token_hex(3)}", f"app-{secrets.token_hex(3)}"
    await application_queue(rabbitmq, exchange, queue)
    daemon = DaemonProcess(
        tmp_path / "amqp-downlink",
        broker_url=mosquitto.url,
        connections=[
            amqp_connection(
                "commands",
                rabbitmq,
                exchange,
                [dev],
                downlinkEnabled=True,
                downlinkTopicPattern="tpx.things.{DevEUI}.downlink",
                downlinkPort=10,
            )
        ],
    )
    daemons.append(daemon)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as network_server:
        await network_server.subscribe(f"tpx/things/{dev}/downlink", qos=1)
        await daemon.start()
        # The first uplink opens the connection (and its downlink queue) and tells the
        # daemon which network server the device belongs to.
        await publish(mosquitto, [uplink("actility", dev, 1)])
        await drain(rabbitmq, queue, 1)
        await daemon.wait_log(lambda e: e.get("event") == "Downlinks subscribed", timeout=30)
        body = {"DevEUI_downlink": {"payload_hex": "010203", "CorrelationID": "c-1"}}
        cloud = await aio_pika.connect(rabbitmq.amqp_url)
        async with cloud:
            channel = await cloud.channel()
            target = await channel.get_exchange(exchange)
            await target.publish(
                aio_pika.Message(orjson.dumps(body)), routing_key=f"tpx.things.{dev}.downlink"
            )
        async with asyncio.timeout(30):
            message = await anext(aiter(network_server.messages))
    assert isinstance(message.payload, bytes)
    command = orjson.loads(message.payload)["DevEUI_downlink"]
    # The connection's downlinkPort fills the missing FPort; 01 02 03 as sent.
    assert (int(command["FPort"]), command["payload_hex"]) == (10, "010203")
