"""The test infrastructure itself: each test here fails if its part does not work."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid

import aiohttp
import aiomqtt
import asyncpg
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from support.clouds import Behaviour, FakeCloud, datacake, qubitro
from support.mosquitto import Mosquitto
from support.ports import free_port
from support.postgres import Postgres

# Safety nets only: each wait ends on an event long before these on a healthy machine.
RECEIVE_TIMEOUT = 60.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


def _topic() -> str:
    # One topic per test: the session broker is shared, and stray retained or queued
    # messages of another test must not be counted here.
    return f"iotflow-test/{uuid.uuid4().hex}"


def _persistent(broker: Mosquitto, identifier: str) -> aiomqtt.Client:
    """An MQTT v5 client whose session the broker keeps for an hour while it is away."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
    properties.SessionExpiryInterval = 3600
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )


async def _publish_numbered(broker: Mosquitto, topic: str, numbers: range) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as publisher:
        for number in numbers:
            # QoS 1 publish returns once the broker sent PUBACK: the message is queued.
            await publisher.publish(topic, str(number).encode(), qos=1)


async def _receive(client: aiomqtt.Client, count: int) -> list[int]:
    received: list[int] = []
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append(int(message.payload))
                if len(received) == count:
                    break
    except TimeoutError:
        tail = received[-3:]
        raise AssertionError(
            f"received {len(received)} of {count} messages within {RECEIVE_TIMEOUT}s,"
            f" the last ones {tail}"
        ) from None
    return received


# -- ports -------------------------------------------------------------------------------


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert port not in (1883, 5432)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# -- mosquitto ---------------------------------------------------------------------------


def test_the_suite_broker_is_its_own(mosquitto: Mosquitto) -> None:
    assert mosquitto.port != 1883
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert f"Opening ipv4 listen socket on port {mosquitto.port}" in mosquitto.log_text()


async def test_qos1_message_reaches_a_subscriber(mosquitto: Mosquitto) -> None:
    topic = _topic()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as subscriber:
        await subscriber.subscribe(topic, qos=1)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
            await publisher.publish(topic, b'{"DevEUI": "0018B20000000B20"}', qos=1)
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            message = await anext(aiter(subscriber.messages))
    assert message.topic.value == topic
    assert message.qos == 1
    assert message.payload == b'{"DevEUI": "0018B20000000B20"}'


async def test_persistent_session_keeps_messages_across_broker_restart(
    fresh_mosquitto: Mosquitto,
) -> None:
    broker = fresh_mosquitto
    topic = _topic()
    identifier = f"iotflow-test-{uuid.uuid4().hex[:8]}"
    # More than mosquitto's default max_queued_messages (1000), which the fixture lifts.
    before, after = range(1500), range(1500, 2500)

    async with _persistent(broker, identifier) as subscriber:
        await subscriber.subscribe(topic, qos=1)
    await _publish_numbered(broker, topic, before)
    port = broker.port
    broker.restart()
    assert broker.port == port
    # Published to the restarted broker: the restored session must still be subscribed.
    await _publish_numbered(broker, topic, after)

    # No subscribe this time: the broker resumes the session and sends what it kept.
    async with _persistent(broker, identifier) as subscriber:
        received = await _receive(subscriber, len(before) + len(after))
    assert received == [*before, *after]
    assert "Saving in-memory database" in broker.log_text()


async def test_a_clean_session_gets_nothing_queued(fresh_mosquitto: Mosquitto) -> None:
    # The counterpart of the test above: proves queuing is the session's doing, so that
    # test cannot pass by accident (for instance through retained messages).
    broker = fresh_mosquitto
    topic = _topic()
    identifier = f"iotflow-test-{uuid.uuid4().hex[:8]}"
    async with _persistent(broker, identifier) as subscriber:
        await subscriber.subscribe(topic, qos=1)
    await _publish_numbered(broker, topic, range(3))
    broker.restart()

    async with aiomqtt.Client(
        broker.host, broker.port, identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5
    ) as clean:
        # Clean start drops the session; a marker then shows what arrives is all there is.
        await clean.subscribe(topic, qos=1)
        await clean.publish(topic, b"-1", qos=1)
        assert await _receive(clean, 1) == [-1]


def test_stop_kill_and_restart_are_idempotent_and_logged(fresh_mosquitto: Mosquitto) -> None:
    broker = fresh_mosquitto
    pid = broker.pid
    broker.kill()
    assert not broker.running
    broker.kill()
    broker.stop()
    broker.start()
    assert broker.running
    assert broker.pid not in (None, pid)
    assert broker.log_text().count(" running") == 2


async def test_extra_config_adds_a_listener() -> None:
    # How later tests add a TLS listener: a second listener block in the same config.
    port = free_port()
    with Mosquitto(extra_config=f"listener {port} 127.0.0.1\n") as broker:
        assert port != broker.port
        topic = _topic()
        async with aiomqtt.Client(broker.host, port) as client:
            await client.subscribe(topic, qos=1)
            await client.publish(topic, b"7", qos=1)
            assert await _receive(client, 1) == [7]
    assert not broker.running
    assert not broker.directory.exists()


# -- postgres ----------------------------------------------------------------------------


async def test_postgres_accepts_asyncpg(postgres: Postgres) -> None:
    assert postgres.port != 5432
    connection = await asyncpg.connect(postgres.dsn)
    try:
        assert await connection.fetchval("select 1") == 1
        assert await connection.fetchval("select current_database()") == "iotflow"
    finally:
        await connection.close()


# -- fake cloud --------------------------------------------------------------------------


async def test_cloud_answers_503_then_200_and_records_requests(cloud: FakeCloud) -> None:
    cloud.respond(503, times=2, path="/uplink")
    statuses = []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        for number in range(3):
            async with http.post(
                cloud.url("/uplink?x=1"),
                json={"n": number},
                headers={"Authorization": "Token abc"},
            ) as response:
                statuses.append(response.status)
    assert statuses == [503, 503, 200]
    assert [r.json for r in cloud.all_requests] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [r.status for r in cloud.all_requests] == [503, 503, 200]
    [accepted] = await cloud.wait_for(1)
    assert accepted.method == "POST"
    assert accepted.path == "/uplink"
    assert accepted.query == {"x": "1"}
    assert accepted.headers["authorization"] == "Token abc"
    assert accepted.body == b'{"n": 2}'


async def test_cloud_rate_limit_sends_retry_after(cloud: FakeCloud) -> None:
    cloud.respond(429, retry_after=7, times=1)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(cloud.url("/a"), json={}) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "7"
        async with http.post(cloud.url("/a"), json={}) as response:
            assert response.status == 200


async def test_cloud_wait_for_times_out_with_what_it_received(cloud: FakeCloud) -> None:
    cloud.respond(503, path="/down")
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.post(cloud.url("/down"), data=b"payload-1") as response,
    ):
        assert response.status == 503
    with pytest.raises(AssertionError, match=r"got 0") as failure:
        await cloud.wait_for(1, timeout=0.5)
    assert "POST /down -> 503" in str(failure.value)
    assert "payload-1" in str(failure.value)


async def test_a_hung_path_does_not_block_another(cloud: FakeCloud) -> None:
    cloud.hang(path="/slow")
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:

        async def post(path: str) -> int:
            async with http.post(cloud.url(path), json={"path": path}) as response:
                return response.status

        slow = asyncio.create_task(post("/slow"))
        await cloud.wait_for_requests(1, path="/slow")
        assert await post("/fast") == 200
        await cloud.wait_for(1, path="/fast")
        assert not slow.done()
        assert cloud.requests_to("/slow")[0].status is None

        cloud.release(path="/slow")
        assert await slow == 200
        # Released: new requests to the path are answered at once.
        assert await post("/slow") == 200
    assert [r.path for r in cloud.accepted] == ["/fast", "/slow", "/slow"]


async def test_cloud_stop_answers_hung_requests() -> None:
    # A test that forgets to release must not hold the suite for the shutdown timeout.
    cloud = FakeCloud()
    await cloud.start()
    cloud.hang()
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:

        async def post() -> int:
            async with http.post(cloud.url("/x"), json={}) as response:
                return response.status

        request = asyncio.create_task(post())
        await cloud.wait_for_requests(1)
        await cloud.stop()
        assert await request == 503


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 401),
        ({"Authorization": "Bearer abc"}, 401),
        ({"Authorization": "Token wrong"}, 401),
        ({"Authorization": "Token secret"}, 200),
    ],
)
async def test_cloud_checks_datacake_token(
    cloud: FakeCloud, headers: dict[str, str], expected: int
) -> None:
    cloud.require(datacake("secret"), path="/integrations/lorawan/actility")
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.post(
            cloud.url("/integrations/lorawan/actility"), json={"DevEUI_uplink": {}}, headers=headers
        ) as response,
    ):
        assert response.status == expected
        body = await response.json()
    if expected == 401:
        assert body["error"] == "unauthorized"
        assert cloud.accepted == []
    else:
        assert len(cloud.accepted) == 1


async def test_cloud_checks_qubitro_headers_only_on_its_path(cloud: FakeCloud) -> None:
    cloud.require(qubitro("project-1", "key-1"), path="/integrations/actility")
    url = cloud.url("/integrations/actility")
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(url, json={}) as response:
            assert response.status == 401
            assert "projectId" in (await response.json())["detail"]
        wrong = {"projectId": "project-1", "webhookSigningKey": "nope"}
        async with http.post(url, json={}, headers=wrong) as response:
            assert response.status == 403
        right = {"projectId": "project-1", "webhookSigningKey": "key-1"}
        async with http.post(url, data=b"not json", headers=right) as response:
            assert response.status == 400
        async with http.post(url, json={}, headers=right) as response:
            assert response.status == 200
        # Other paths are other platforms: no Qubitro headers needed there.
        async with http.post(cloud.url("/elsewhere"), json={}) as response:
            assert response.status == 200


async def test_an_outage_comes_before_the_credential_check(cloud: FakeCloud) -> None:
    cloud.require(datacake())
    cloud.set_behaviour(Behaviour(status=503, body={"message": "maintenance"}), times=1)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(cloud.url("/x"), json={}) as response:
            assert response.status == 503
            assert await response.json() == {"message": "maintenance"}
        async with http.post(cloud.url("/x"), json={}) as response:
            assert response.status == 401
    assert re.search(r"POST /x -> 401", cloud.describe())
