"""The source broker: manual acknowledgement only after commit, in arrival order."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence

import aiomqtt
import paho.mqtt.client as paho
import pytest
from structlog.testing import capture_logs

from iotflow.config.model import MqttSettings
from iotflow.sources.ack import InflightGate, ManualAck
from iotflow.sources.mqtt import REMINDER_INTERVAL, Handler, Incoming, MqttSource, _ErrorLog
from iotflow.spool import SpoolFullError
from iotflow.telemetry.metrics import Metrics
from support.mosquitto import Mosquitto

# A process that consumes with iotflow's source and prints what it receives. With
# COMMIT=0 its handler never commits, so nothing may ever be acknowledged.
CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from iotflow.config.model import MqttSettings
    from iotflow.sources.mqtt import MqttSource
    from iotflow.telemetry.metrics import Metrics

    url, client_id, commit = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

    def handle(incoming):
        print("received", incoming.payload.decode(), flush=True)
        if commit:
            return None
        return asyncio.get_running_loop().create_future()  # a commit that never ends

    async def main():
        settings = MqttSettings.model_validate({
            "url": url, "client_id": client_id, "receive_maximum": 1,
            "subscriptions": [{"topic": "ack-test/#", "format": "actility"}],
        })
        source = MqttSource(settings, handle, Metrics())
        task = asyncio.create_task(source.run())
        await source.consuming.wait()
        print("consuming", flush=True)
        await task

    asyncio.run(main())
    """
)


async def run_consumer(
    broker: Mosquitto, client_id: str, *, commit: bool
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONSUMER,
        broker.url,
        client_id,
        "1" if commit else "0",
        stdout=asyncio.subprocess.PIPE,
    )
    # What the broker kept for the session may arrive before the subscription is answered:
    # it is handled at once, and its lines come before "consuming".
    early: list[str] = []
    while (line := await _own_line(process)) != "consuming":
        early.append(line)
    _early[process] = early
    return process


_early: dict[asyncio.subprocess.Process, list[str]] = {}


async def next_line(process: asyncio.subprocess.Process) -> str:
    """The consumer's next "received" line (its log lines are skipped)."""
    early = _early.get(process)
    if early:
        return early.pop(0)
    return await _own_line(process)


async def _own_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    while True:
        raw = await asyncio.wait_for(process.stdout.readline(), 30)
        assert raw, "the consumer exited"
        line = raw.decode().strip()
        if line == "consuming" or line.startswith("received "):
            return line


async def kill(process: asyncio.subprocess.Process) -> None:
    _early.pop(process, None)
    process.kill()
    await process.wait()


async def consuming(
    settings: MqttSettings, handle: Handler
) -> tuple[MqttSource, asyncio.Task[None]]:
    """A source that has subscribed, and the task that runs it."""
    source = MqttSource(settings, handle, Metrics())
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(source.consuming.wait(), 30)
    return source, task


def source_settings(
    broker: Mosquitto, name: str, protocol: str, receive_maximum: int
) -> MqttSettings:
    """A source with this in-flight bound, client id `<name>-<protocol>`, on `<name>/#`."""
    return MqttSettings.model_validate(
        {
            "url": broker.url,
            "client_id": f"{name}-{protocol}",
            "protocol": protocol,
            "receive_maximum": receive_maximum,
            "subscriptions": [{"topic": f"{name}/#", "format": "actility"}],
        }
    )


class HeldCommits:
    """A handler whose commits end only when the test ends them, and a condition that is
    notified at each message handled (and whenever the test calls `notify`)."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.changed = asyncio.Condition()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def handle(self, incoming: Incoming) -> Awaitable[None] | None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        asyncio.get_running_loop().create_task(self.notify())
        return future


async def test_an_uncommitted_uplink_is_redelivered_after_a_crash(
    fresh_mosquitto: Mosquitto,
) -> None:
    first = await run_consumer(fresh_mosquitto, "ack-test", commit=False)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as publisher:
        await publisher.publish("ack-test/1", b"one", qos=1)
        assert await next_line(first) == "received one"
        await kill(first)  # SIGKILL: the broker sees the socket die, no DISCONNECT
        second = await run_consumer(fresh_mosquitto, "ack-test", commit=True)
        await publisher.publish("ack-test/2", b"two", qos=1)
        # Never acknowledged: the broker redelivers it first, then the new one.
        assert await next_line(second) == "received one"
        assert await next_line(second) == "received two"
        await kill(second)


async def test_a_committed_uplink_is_acknowledged(fresh_mosquitto: Mosquitto) -> None:
    # The control: with commits, acknowledgements do reach the broker. The consumer allows
    # one unacknowledged message (Receive Maximum 1), so receiving "two" proves "one" acked.
    first = await run_consumer(fresh_mosquitto, "ack-control", commit=True)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as publisher:
        await publisher.publish("ack-test/1", b"one", qos=1)
        await publisher.publish("ack-test/2", b"two", qos=1)
        assert await next_line(first) == "received one"
        assert await next_line(first) == "received two"
        await kill(first)
        second = await run_consumer(fresh_mosquitto, "ack-control", commit=True)
        await publisher.publish("ack-test/3", b"three", qos=1)
        seen = [await next_line(second)]
        if seen[0] == "received two":  # its ack may have died with the process: allowed
            seen.append(await next_line(second))
        assert seen[-1] == "received three"
        await kill(second)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acknowledgements_leave_in_arrival_order(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    acked: list[int] = []
    original = ManualAck.ack_many

    def record(self: ManualAck, mids: Sequence[int]) -> bool:
        acked.extend(mids)
        asyncio.get_running_loop().create_task(notify())
        return original(self, mids)

    monkeypatch.setattr(ManualAck, "ack_many", record)
    held = HeldCommits()
    commits, changed, notify, handle = held.futures, held.changed, held.notify, held.handle

    settings = MqttSettings.model_validate(
        {
            "url": mosquitto.url,
            "client_id": f"ack-order-{protocol}",
            "protocol": protocol,
            "subscriptions": [{"topic": f"ack-order-{protocol}/#", "format": "actility"}],
        }
    )
    source, task = await consuming(settings, handle)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
        for n in range(5):
            await publisher.publish(f"ack-order-{protocol}/{n}", b"x", qos=1)
    async with asyncio.timeout(30), changed:
        await changed.wait_for(lambda: len(commits) == 5)
    # Commits finish in reverse; acknowledgements still leave in arrival order.
    for future in reversed(commits):
        future.set_result(None)
        await asyncio.sleep(0)
    async with asyncio.timeout(30), changed:
        await changed.wait_for(lambda: len(acked) == 5)
    assert acked == sorted(acked)
    source.stop()
    await asyncio.wait_for(task, 30)


async def test_failing_commits_are_logged_once_and_their_end_too(mosquitto: Mosquitto) -> None:
    attempts = 0
    recovered = asyncio.Event()

    def handle(incoming: Incoming) -> Awaitable[None] | None:
        nonlocal attempts
        attempts += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if attempts <= 4:  # the spool cannot commit: reconnect, the broker redelivers
            future.set_exception(SpoolFullError("spool write failed: database or disk is full"))
        else:
            future.set_result(None)
            recovered.set()
        return future

    settings = MqttSettings.model_validate(
        {
            "url": mosquitto.url,
            "client_id": "commit-episode",
            "reconnect_initial": "10ms",
            "reconnect_max": "50ms",
            "subscriptions": [{"topic": "commit-episode/#", "format": "actility"}],
        }
    )
    with capture_logs() as logs:
        source, task = await consuming(settings, handle)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
            await publisher.publish("commit-episode/1", b"x", qos=1)
        await asyncio.wait_for(recovered.wait(), 30)
        source.stop()
        await asyncio.wait_for(task, 30)

    assert attempts == 5  # redelivered after each failed commit, never acknowledged before
    warnings = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert [e["event"] for e in warnings] == ["Uplink not committed; reconnecting for redelivery"]
    assert "full" in warnings[0]["error"]
    assert [e["event"] for e in logs].count("Uplinks committed again") == 1


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_what_is_taken_in_is_bounded_by_iotflow(
    fresh_mosquitto: Mosquitto, protocol: str
) -> None:
    # MQTT 3.1.1 has no Receive Maximum: Mosquitto (max_inflight_messages 1000 here) sends
    # as much as it may. iotflow stops reading at `receive_maximum` uncommitted uplinks.
    limit, total = 5, 40
    held = HeldCommits()
    commits, changed, handle = held.futures, held.changed, held.handle

    def more_than(seen: int) -> Callable[[], bool]:
        return lambda: len(commits) > seen

    settings = source_settings(fresh_mosquitto, "bounded", protocol, limit)
    source, task = await consuming(settings, handle)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as publisher:
        for n in range(total):
            await publisher.publish(f"bounded/{n}", b"x", qos=1)
    async with asyncio.timeout(30), changed:
        await changed.wait_for(lambda: len(commits) >= limit)
    # Nothing can signal that nothing more arrives: a bounded look, long enough for the
    # broker to push all 40 on this machine (it does, without the bound).
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5), changed:
            await changed.wait_for(lambda: source.taken_in > limit)
    assert source.taken_in == limit
    assert len(commits) <= limit
    # Commits free the window: everything arrives, a window at a time.
    while len(commits) < total:
        for future in commits:
            if not future.done():
                future.set_result(None)
        async with asyncio.timeout(30), changed:
            await changed.wait_for(more_than(len(commits)))
        assert source.taken_in <= limit
    for future in commits:
        if not future.done():
            future.set_result(None)
    source.stop()
    await asyncio.wait_for(task, 30)


def test_a_connection_error_is_logged_once_then_as_a_reminder() -> None:
    now = [0.0]
    errors = _ErrorLog(clock=lambda: now[0])
    assert errors.should_log("refused") == (True, 0)
    for _ in range(100):
        now[0] += 2.0  # a retry every 2 s
        assert not errors.should_log("refused")[0]
    now[0] = REMINDER_INTERVAL
    assert errors.should_log("refused") == (True, 101)  # the repeats since the last line
    assert errors.should_log("timed out") == (True, 0)  # a new error: at once
    errors.reset()
    assert errors.should_log("timed out") == (True, 0)  # after a connection: at once


async def test_a_broker_granting_qos_0_is_said_to_be_at_most_once() -> None:
    # Mosquitto's max_qos 0 grants QoS 0 to a QoS 1 subscription, as The Things Stack does.
    with Mosquitto(extra_config="max_qos 0") as broker:
        settings = MqttSettings.model_validate(
            {
                "url": broker.url,
                "client_id": "granted-qos",
                "protocol": "3.1.1",
                "subscriptions": [{"topic": "granted/#", "format": "actility"}],
            }
        )
        with capture_logs() as logs:
            source, task = await consuming(settings, lambda incoming: None)
            source.stop()
            await asyncio.wait_for(task, 30)
    (warning,) = [e for e in logs if e["event"].startswith("The broker granted a lower QoS")]
    assert (warning["topic"], warning["qos"], warning["granted"]) == ("granted/#", 1, 0)


def _packet(header: int, body: bytes) -> bytes:
    """An MQTT packet: its first byte, the Remaining Length (MQTT 5 section 1.5.5), the body."""
    length, encoded = len(body), bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes([header, *encoded]) + body


def _publish(
    topic: bytes, payload: bytes, *, qos: int, mid: int = 0, properties: bytes | None = b""
) -> bytes:
    """A PUBLISH: MQTT 5 with these properties (each short: one length byte), or MQTT
    3.1.1 (`properties=None`)."""
    identifier = mid.to_bytes(2, "big") if qos else b""
    listed = b"" if properties is None else bytes([len(properties)]) + properties
    body = len(topic).to_bytes(2, "big") + topic + identifier + listed + payload
    return _packet(0x30 | qos << 1, body)


def _collecting_gate(
    protocol: aiomqtt.ProtocolVersion,
) -> tuple[InflightGate, list[tuple[bytes, bytes, int, int]]]:
    """A gate on a client that never connects, and the messages it hands on."""
    taken: list[tuple[bytes, bytes, int, int]] = []
    client = aiomqtt.Client("127.0.0.1", protocol=protocol)
    return InflightGate(client, 100, on_message=lambda *message: taken.append(message)), taken


async def test_whole_publish_packets_are_cut_from_the_buffer_and_the_rest_left_to_paho() -> None:
    # The gate takes the QoS 0 and 1 PUBLISH packets that are whole in what it has read,
    # without paho's per-packet machinery (issue #16); it stops, leaving the bytes where
    # they are for paho's own read, at anything else.
    gate, taken = _collecting_gate(aiomqtt.ProtocolVersion.V5)
    big = b"x" * 300  # a Remaining Length of two bytes
    expiry = b"\x02\x00\x00\x00\x3c"  # Message Expiry Interval 60: paho decodes this one
    first = (
        _publish(b"up/a", b"one", qos=1, mid=7)
        + _publish(b"up/b", big, qos=0)
        + _publish(b"up/p", b"{}", qos=1, mid=8, properties=expiry)
    )
    puback = bytes([0x40, 2, 0, 9])
    gate._buffer = first + puback + _publish(b"up/c", b"three", qos=1, mid=10)

    assert gate._publishes() == 3
    assert taken == [(b"up/a", b"one", 7, 1), (b"up/b", big, 0, 0), (b"up/p", b"{}", 8, 1)]
    assert (gate._offset, gate.taken) == (len(first), 3)
    assert gate._publishes() == 0  # a PUBACK: paho's
    gate._offset += len(puback)  # as paho's read of it leaves it
    assert gate._publishes() == 1
    assert taken[-1] == (b"up/c", b"three", 10, 1)

    refused = [
        _publish(b"up/d", b"four", qos=1, mid=11)[:-1],  # not whole yet
        _publish(b"up/e", b"five", qos=2, mid=12),  # QoS 2: paho's, with its PUBREC
        bytes([0x32, 0x80, 0x80, 0x80, 0x80, 0x01]),  # a fifth length byte
        _packet(0x32, b"\x00\x09up/f"),  # the topic runs past the packet
        _packet(0x30, b"\x00\x04up/g"),  # no property length
        _publish(b"up/h", b"", qos=1, mid=13, properties=b"\x02"),  # a property cut short
    ]
    for packet in refused:
        gate._buffer, gate._offset = packet, 0
        assert gate._publishes() == 0, packet
        assert gate._offset == 0
    assert len(taken) == 4


async def test_a_read_that_brings_one_message_hands_it_on_without_paho() -> None:
    # At a paced rate each readable event brings a message or two: the gate reads the socket
    # itself, so they too are cut from its buffer rather than read by paho packet by packet.
    gate, taken = _collecting_gate(aiomqtt.ProtocolVersion.V5)
    reads = [_publish(b"up/a", b"one", qos=1, mid=7)]

    def recv(bufsize: int) -> bytes:
        if reads:
            return reads.pop()
        raise BlockingIOError

    gate._sock_recv = recv
    gate._read()
    assert taken == [(b"up/a", b"one", 7, 1)]
    assert gate.buffered == 0


async def test_mqtt_3_publish_packets_are_cut_from_the_buffer_too() -> None:
    gate, taken = _collecting_gate(aiomqtt.ProtocolVersion.V311)
    gate._buffer = _publish(b"up/a", b"\x00one", qos=1, mid=7, properties=None) + _publish(
        b"up/b", b"", qos=0, properties=None
    )
    assert gate._publishes() == 2
    assert taken == [(b"up/a", b"\x00one", 7, 1), (b"up/b", b"", 0, 0)]
    gate._buffer, gate._offset = _publish(b"", b"x", qos=1, mid=8, properties=None), 0
    assert gate._publishes() == 0  # an empty topic: malformed in 3.1.1, paho's to refuse


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_burst_is_read_in_fewer_system_calls_than_messages(
    fresh_mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    # What the broker kept for our session arrives at once at the next connection. paho
    # alone reads each packet in 3 or 4 recv calls; iotflow reads the socket in bulk
    # (issue #16), and every message still arrives, once, in order.
    calls = 0
    original = paho.Client._sock_recv

    def counted(self: paho.Client, size: int) -> bytes:
        nonlocal calls
        calls += 1
        return original(self, size)

    monkeypatch.setattr(paho.Client, "_sock_recv", counted)
    received: list[bytes] = []
    changed = asyncio.Condition()

    async def notify() -> None:
        async with changed:
            changed.notify_all()

    def handle(incoming: Incoming) -> Awaitable[None] | None:
        received.append(incoming.payload)
        asyncio.get_running_loop().create_task(notify())
        return None

    total = 300
    settings = source_settings(fresh_mosquitto, "burst", protocol, 1000)
    source, task = await consuming(settings, handle)
    source.stop()
    await asyncio.wait_for(task, 30)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as publisher:
        for n in range(total):
            await publisher.publish(f"burst/{n % 7}", b"%d" % n + b" " * 500, qos=1)
    calls = 0
    source = MqttSource(settings, handle, Metrics())
    task = asyncio.create_task(source.run())
    async with asyncio.timeout(30), changed:
        await changed.wait_for(lambda: len(received) >= total)
    assert [int(p) for p in received] == list(range(total))
    assert calls < total
    source.stop()
    await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_the_pubacks_of_a_group_commit_leave_in_one_send(
    fresh_mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    # paho's own ack writes one packet per call, each with its own send (issue #16). The
    # broker allows one window of unacknowledged messages: receiving the next window
    # proves it took every PUBACK of the one send.
    window = 20
    writes: list[bytes] = []
    original = paho.Client._sock_send

    def recorded(self: paho.Client, buf: bytes | bytearray) -> int:
        writes.append(bytes(buf))
        return original(self, buf)

    monkeypatch.setattr(paho.Client, "_sock_send", recorded)
    held = HeldCommits()
    commits, changed, handle = held.futures, held.changed, held.handle

    settings = source_settings(fresh_mosquitto, "one-send", protocol, window)
    source, task = await consuming(settings, handle)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as publisher:
        for n in range(2 * window):
            await publisher.publish(f"one-send/{n}", b"x", qos=1)
    async with asyncio.timeout(30), changed:
        await changed.wait_for(lambda: len(commits) == window)
    writes.clear()
    for future in commits:  # a group commit: its futures end together, in arrival order
        future.set_result(None)
    async with asyncio.timeout(30), changed:
        await changed.wait_for(lambda: len(commits) == 2 * window)
    pubacks = [w for w in writes if w[0] == paho.PUBACK]
    assert len(pubacks) == 1
    assert len(pubacks[0]) == 4 * window
    # Each is the PUBACK paho would have sent, in arrival order (Mosquitto numbers them so).
    mids = [int.from_bytes(pubacks[0][i + 2 : i + 4], "big") for i in range(0, 4 * window, 4)]
    assert all(pubacks[0][i : i + 2] == bytes([paho.PUBACK, 2]) for i in range(0, 4 * window, 4))
    assert mids == sorted(set(mids))
    assert len(mids) == window
    for future in commits[window:]:
        future.set_result(None)
    source.stop()
    await asyncio.wait_for(task, 30)


async def test_a_handler_bug_acknowledges_that_message_and_the_next_ones_go_on(
    mosquitto: Mosquitto,
) -> None:
    received: list[bytes] = []
    arrived = asyncio.Event()

    def handle(incoming: Incoming) -> Awaitable[None] | None:
        received.append(incoming.payload)
        if incoming.payload == b"bad":
            raise RuntimeError("a bug")
        arrived.set()
        return None

    settings = MqttSettings.model_validate(
        {
            "url": mosquitto.url,
            "client_id": "handler-bug",
            "subscriptions": [{"topic": "handler-bug/#", "format": "actility"}],
        }
    )
    with capture_logs() as logs:
        source, task = await consuming(settings, handle)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
            await publisher.publish("handler-bug/1", b"bad", qos=1)
            await publisher.publish("handler-bug/2", b"good", qos=1)
            await asyncio.wait_for(arrived.wait(), 30)
        source.stop()
        await asyncio.wait_for(task, 30)
    # Once each: the bad one was acknowledged, not redelivered by a new session.
    assert received == [b"bad", b"good"]
    assert source.connected.is_set() is False
    (error,) = [e for e in logs if e["log_level"] == "error"]
    assert error["event"] == "Uplink not handled; acknowledged without a commit"
    assert error["error"] == "RuntimeError: a bug"
    assert not [e for e in logs if e["event"] == "Broker connection lost"]


async def test_a_stop_acknowledges_the_commits_under_way_before_it_leaves(
    fresh_mosquitto: Mosquitto,
) -> None:
    held = HeldCommits()
    settings = MqttSettings.model_validate(
        {
            "url": fresh_mosquitto.url,
            "client_id": "stop-acks",
            "subscriptions": [{"topic": "stop-acks/#", "format": "actility"}],
        }
    )
    source, task = await consuming(settings, held.handle)
    async with aiomqtt.Client(fresh_mosquitto.host, fresh_mosquitto.port) as publisher:
        for n in range(3):
            await publisher.publish(f"stop-acks/{n}", b"before", qos=1)
        async with asyncio.timeout(30), held.changed:
            await held.changed.wait_for(lambda: len(held.futures) == 3)
        source.stop()
        # The stop waits for the commits under way (up to 10 s): they end, then it leaves.
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert not done
        for future in held.futures:
            future.set_result(None)
        await asyncio.wait_for(task, 30)
        # The same session again: what was acknowledged is not redelivered.
        received: list[bytes] = []
        after = asyncio.Event()

        def handle(incoming: Incoming) -> Awaitable[None] | None:
            received.append(incoming.payload)
            if incoming.payload == b"after":
                after.set()
            return None

        again, second = await consuming(settings, handle)
        await publisher.publish("stop-acks/3", b"after", qos=1)
        await asyncio.wait_for(after.wait(), 30)
    assert received == [b"after"]
    again.stop()
    await asyncio.wait_for(second, 30)
