"""Manual PUBACK, the in-flight bound and CONNECT watching: the one place under aiomqtt.

aiomqtt 2.x acknowledges a QoS 1 message as soon as it is queued for us; iotflow must
acknowledge only once the uplink's deliveries are committed to the spool. paho-mqtt 2.x,
which aiomqtt drives, has `manual_ack_set` and `ack` (for MQTT 5 and 3.1.1 alike); aiomqtt
keeps its paho client in `_client`. Everything that depends on that private attribute, or
on paho's own (its socket reads, its queue of packets to write), is in this module;
`tests/test_source.py` proves an unacknowledged uplink is redelivered after a crash, and
that the PUBACKs of a group commit leave in one write that the broker takes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt import _packet

from iotflow import mqtt_properties
from iotflow.delivery.pressure import IngestPressure

# Every uplink's PUBLISH is decoded by paho: without its tables rebuilt each time.
mqtt_properties.install()

# A PUBACK: its type, a remaining length of 2, the packet identifier (paho's `_send_puback`).
_PUBACK = struct.Struct("!BBH")


def disconnection(client: aiomqtt.Client) -> asyncio.Future[None]:
    """aiomqtt's future of the client's disconnection; replaced at each connect, so taken once
    connected."""
    future: asyncio.Future[None] = client._disconnected
    return future


class ManualAck:
    """Turns paho's automatic acknowledgement off for one aiomqtt client (before connecting),
    and writes the PUBACKs of many messages at once.

    paho's `ack` queues each PUBACK as a packet of its own: a write to its wake-up socket
    pair, a writer registered with the event loop (through `call_soon_threadsafe`), then a
    `send` and the writer removed, for every uplink. The PUBACKs that a group commit frees
    together go here in one `send` instead (issue #16). Each is the 4 bytes paho's own
    `_send_puback` builds, for MQTT 5 and 3.1.1 alike (a PUBACK of reason Success without
    properties may leave both out: MQTT 5 section 3.4.2.1). When paho has packets of its
    own still to write, ours are queued behind them, in paho's queue, to keep the order.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: paho.Client = client._client
        self._paho.manual_ack_set(True)

    def ack(self, mid: int, qos: int) -> bool:
        """Acknowledge one message (paho's own way: QoS 2 too); False when the client could
        not (disconnected)."""
        if qos == 0:
            return True
        return self._paho.ack(mid, qos) == paho.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Sequence[int]) -> bool:
        """PUBACK the QoS 1 messages `mids`, in this order; False when the client could not
        (disconnected)."""
        if not mids:
            return True
        client = self._paho
        if client.socket() is None:
            return False
        data = b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids])
        sent = 0
        if not client._out_packet:
            try:
                sent = client._sock_send(data)
            except BlockingIOError:
                sent = 0  # paho has registered its writer: the queue below goes out with it
            except OSError:
                return False  # the connection is lost; aiomqtt's reader reports it
        if sent < len(data):
            queued = client._packet_queue(paho.PUBACK, data[sent:], 0, 0)
            return queued == paho.MQTT_ERR_SUCCESS
        with client._msgtime_mutex:  # what paho's own writes record, for its keep-alive
            client._last_msg_out = paho.time_func()
        return True


class ConnectWatch:
    """Sets `closed` when the broker closes the connection before its CONNACK.

    A broker that speaks only MQTT 3.1.1 may drop an MQTT 5 CONNECT without an answer
    (RabbitMQ does); aiomqtt then waits for its timeout and reports only "Operation timed
    out". paho tells us at once, through on_disconnect.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: paho.Client = client._client
        self._loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()
        self._answered = False
        on_connect, on_disconnect = self._paho.on_connect, self._paho.on_disconnect

        def connected(*args: Any) -> None:
            self._answered = True
            if on_connect is not None:
                on_connect(*args)

        def disconnected(*args: Any) -> None:
            if not self._answered:
                # paho may call this from the executor thread that runs connect().
                self._loop.call_soon_threadsafe(self.closed.set)
            if on_disconnect is not None:
                on_disconnect(*args)

        self._paho.on_connect = connected
        self._paho.on_disconnect = disconnected


PRESSURE_TAKEN = 50  # see InflightGate.__init__

# Bytes asked of the socket at once: many uplinks (about 0.6 kB each) per system call.
READ_CHUNK = 64 * 1024

# What the gate hands on of each message: its topic (bytes: MQTT requires UTF-8, a broker
# may not check), payload, packet identifier and QoS.
OnMessage = Callable[[bytes, bytes, int, int], None]


class InflightGate:
    """Reads the broker's socket in bulk, and stops reading while `limit` messages are
    taken in and not released.

    Reading: paho reads a packet in three or four `recv` calls (its type, each byte of its
    length, then the rest) and aiomqtt handles one packet per readable event, so every
    uplink cost four system calls and a turn of the event loop. Here one `recv` fills a
    buffer that paho's reads are served from, and one readable event handles every packet
    the buffer holds (issue #16: about a fifth of the daemon's CPU per uplink). The
    buffer belongs to one socket: a session makes a new client, and so a new gate.

    The bound: MQTT 3.1.1 has no Receive Maximum, and some MQTT 5 brokers exceed ours;
    without it what is taken in would grow without end while the spool is slower than the
    broker. While paused the socket is not read, so TCP pushes back on the broker; a pause
    longer than the keep-alive ends the connection, and the broker redelivers what we did
    not ack. It is armed once subscribed: until then the SUBACKs must be read, whatever
    the broker redelivers first from our session.
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        limit: int,
        pressure: IngestPressure | None = None,
        on_message: OnMessage | None = None,
    ) -> None:
        self._aiomqtt = client
        # This many uplinks taken and not acknowledged: ingest falls behind (a commit and
        # its PUBACK keep a handful in flight; 50 is 50 ms of waiting at 1,000/s; half the
        # bound if that is less); half as many: keeping up again (apart, not to flap).
        self._pressure = pressure
        self._high = max(1, min(limit // 2, PRESSURE_TAKEN))
        self._low = self._high // 2
        self._paho: paho.Client = client._client
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._limit = limit
        self._paused_fd: int | None = None
        self._armed = False
        self._stopped = False
        self.taken = 0
        self._buffer = b""
        self._offset = 0
        paho_recv = self._sock_recv = self._paho._sock_recv
        aiomqtt_on_message = self._paho.on_message
        on_socket_open = self._paho.on_socket_open

        def recv(size: int) -> bytes:
            # paho's own reads, served from the buffer; an empty buffer is refilled by one
            # recv (BlockingIOError, SSL's want-read included, and EOF pass through as is).
            offset, buffer = self._offset, self._buffer
            if offset >= len(buffer):
                buffer = paho_recv(READ_CHUNK)
                if not buffer:
                    return buffer
                self._buffer, offset = buffer, 0
            end = offset + size
            self._offset = end
            return buffer[offset:end]

        def arrived(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            # A message paho decoded (`_publishes` takes the common ones itself).
            if on_message is not None:
                # Given to the source as paho decodes it, not through aiomqtt's queue of
                # Message objects and a task's wait on it (issue #16).
                self._took(message._topic, bytes(message.payload), message.mid, message.qos)
                return
            self.taken += 1
            if aiomqtt_on_message is not None:
                aiomqtt_on_message(client, userdata, message)
            self._check_bound()

        def socket_opened(*args: Any) -> None:
            if on_socket_open is not None:
                on_socket_open(*args)  # aiomqtt's, which adds its own reader: ours replaces it
            sock = args[-1]
            # Called from the thread that runs paho's connect(), like aiomqtt's own.
            self._loop.call_soon_threadsafe(self._take_over, sock.fileno())

        self._paho._sock_recv = recv  # type: ignore[assignment]
        self._paho.on_message = arrived
        self._paho.on_socket_open = socket_opened

    @property
    def buffered(self) -> int:
        """Bytes read from the socket that paho has not consumed yet."""
        return len(self._buffer) - self._offset

    def _took(self, topic: bytes, payload: bytes, mid: int, qos: int) -> None:
        self.taken += 1
        assert self._on_message is not None
        self._on_message(topic, payload, mid, qos)
        self._check_bound()

    def _check_bound(self) -> None:
        if self._pressure is not None and self.taken >= self._high:
            self._pressure.set(True)
        if self._armed and self.taken >= self._limit:
            self._pause()

    def arm(self) -> None:
        self._armed = True
        if self.taken >= self._limit:
            self._pause()

    def release(self, count: int = 1) -> None:
        """`count` messages are done with (acknowledged, or committed at QoS 0)."""
        self.taken -= count
        if self._pressure is not None and self.taken <= self._low:
            self._pressure.set(False)
        if self._paused_fd is not None and self.taken < self._limit:
            self._resume()

    def stop_reading(self) -> None:
        """Read no more (a stop): what the broker sends from now on stays unacknowledged, and
        it redelivers it to the next session."""
        self._stopped = True
        sock = self._paho.socket()
        if self._paused_fd is None and sock is not None:
            self._loop.remove_reader(sock.fileno())

    def _take_over(self, fd: int) -> None:
        sock = self._paho.socket()
        if sock is None or sock.fileno() != fd or self._stopped:
            return  # closed before this ran
        if self._paused_fd is None:
            self._loop.add_reader(fd, self._read)
            # aiomqtt's reader may have run first and left packets in the buffer.
            self._loop.call_soon(self._read)

    def _pause(self) -> None:
        sock = self._paho.socket()
        if self._paused_fd is not None or sock is None:
            return
        self._paused_fd = sock.fileno()
        self._loop.remove_reader(self._paused_fd)

    def _resume(self) -> None:
        fd, self._paused_fd = self._paused_fd, None
        sock = self._paho.socket()
        if fd is None or sock is None or sock.fileno() != fd or self._stopped:
            return  # the connection is gone (aiomqtt has seen it close), or we stop
        # aiomqtt's own reader callback is a closure we cannot get back; this one does
        # what it does. Bytes that arrived meanwhile, or wait in the buffer, are read at once.
        self._loop.add_reader(fd, self._read)
        self._loop.call_soon(self._read)

    def _read(self) -> None:
        client = self._paho
        try:
            while self._paused_fd is None and not self._stopped:
                took = 0
                # Unless paho is in the middle of a packet: what is whole is taken here.
                if self._on_message is not None and not client._in_packet["command"]:
                    if self.buffered == 0:
                        self._fill()
                    took = self._publishes()
                if not took:
                    client.loop_read()
                if self.buffered > 0 and self._paho.socket() is not None:
                    continue  # more packets in the buffer: no readable event will say so
                sock: Any = self._paho.socket()
                # An SSL socket may hold decoded bytes that no readable event announces.
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except Exception as exc:  # as aiomqtt's callback: a broken socket ends the session
            disconnected = disconnection(self._aiomqtt)
            if not disconnected.done():
                disconnected.set_exception(exc)

    def _fill(self) -> None:
        """Read what the socket holds into the empty buffer. Nothing yet, the end of the
        stream or an error leave it empty: paho's own read then meets them, and says so."""
        try:
            data = self._sock_recv(READ_CHUNK)
        except OSError:  # BlockingIOError (SSL's want-read too) included
            return
        if data:
            self._buffer, self._offset = data, 0

    def _publishes(self) -> int:
        """Take the QoS 0 and 1 PUBLISH packets whole at the head of the buffer; how many.

        paho reads a packet through three or four of our `recv` calls, adds its body to a
        bytearray, and makes an `MQTTMessage` (with a `threading.Condition`), a log record's
        arguments and a fresh packet state for each: about a fifth of what taking an uplink
        in costs (issue #16). These are cut out of the buffer here. A PUBLISH without
        properties (MQTT 5: a property length of 0; 3.1.1 has none) is read in place
        (`_plain_publish`); one with properties is decoded by paho's own `decode_publish`,
        which checks them (the source uses none). Anything else (another packet type, QoS
        2, a packet not wholly in the buffer, one that is malformed) is left where it is,
        for paho to read its own way, errors included.
        """
        buffer, offset = self._buffer, self._offset
        end = len(buffer)
        protocol = self._paho._protocol
        mqtt5 = protocol == paho.MQTTv5
        took = 0
        while offset < end and self._paused_fd is None and not self._stopped:
            header = buffer[offset]
            if header & 0xF0 != paho.PUBLISH or header & 0x06 > 0x02:
                break
            body = _body(buffer, offset, end)
            if body is None:
                break
            start, stop = body
            qos = (header >> 1) & 0x03
            message = _plain_publish(buffer, start, stop, qos, mqtt5)
            if message is None:
                try:
                    packet = _packet.decode_publish(header, buffer[start:stop], protocol)
                except Exception:  # paho reads it again, and reports it its own way
                    break
                message = (packet.topic, bytes(packet.payload), packet.mid)
            offset = self._offset = stop
            took += 1
            self._took(*message, qos)
        if took:
            with self._paho._msgtime_mutex:  # what paho's reads record, for its keep-alive
                self._paho._last_bytes_received = paho.time_func()
        return took


def _body(buffer: bytes, offset: int, end: int) -> tuple[int, int] | None:
    """Where the body of the packet at `offset` starts and stops, when it is whole before
    `end` and its Remaining Length is well formed (1 to 4 bytes: MQTT 5 section 1.5.5)."""
    length, multiplier, pos = 0, 1, offset + 1
    for _ in range(4):
        if pos >= end:
            return None
        byte = buffer[pos]
        pos += 1
        length += (byte & 0x7F) * multiplier
        multiplier <<= 7
        if byte < 0x80:
            return (pos, pos + length) if pos + length <= end else None
    return None


def _plain_publish(
    buffer: bytes, start: int, stop: int, qos: int, mqtt5: bool
) -> tuple[bytes, bytes, int] | None:
    """Topic, payload and packet identifier of a PUBLISH body without properties (MQTT 5
    section 3.3.2, 3.1.1 section 3.3.2); None for one with properties, or one too short
    for its own lengths (malformed: paho's to refuse)."""
    at = start + 2
    if at > stop:
        return None
    topic_end = at + int.from_bytes(buffer[start:at])
    mid = 0
    at = topic_end
    if qos:
        at += 2
        if at > stop:
            return None
        mid = int.from_bytes(buffer[topic_end:at])
    if mqtt5:
        if at >= stop or buffer[at] != 0:
            return None  # properties, or none where their length must be
        at += 1
    elif topic_end == start + 2:
        return None  # an empty topic: not allowed in 3.1.1
    if at > stop:
        return None
    return buffer[start + 2 : topic_end], buffer[at:stop], mid
