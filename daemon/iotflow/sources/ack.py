"""Manual PUBACK, the in-flight bound and CONNECT watching: the one place under aiomqtt.

aiomqtt 2.x acknowledges a QoS 1 message as soon as it is queued for us; iotflow must
acknowledge only once the uplink's deliveries are committed to the spool. paho-mqtt 2.x,
which aiomqtt drives, has `manual_ack_set` and `ack` (for MQTT 5 and 3.1.1 alike); aiomqtt
keeps its paho client in `_client`. Everything that depends on that private attribute is in
this module, and `tests/test_source.py` proves an unacknowledged uplink is redelivered after
a crash.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from iotflow import mqtt_properties
from iotflow.delivery.pressure import IngestPressure

# Every uplink's PUBLISH is decoded by paho: without its tables rebuilt each time.
mqtt_properties.install()


class ManualAck:
    """Turns paho's automatic acknowledgement off for one aiomqtt client (before connecting)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: paho.Client = client._client
        self._paho.manual_ack_set(True)

    def ack(self, mid: int, qos: int) -> bool:
        """Send the PUBACK of message `mid`; False when the client could not (disconnected)."""
        if qos == 0:
            return True
        return self._paho.ack(mid, qos) == paho.MQTT_ERR_SUCCESS


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


class Messages:
    """The session's messages, as `client.messages` gives them, without its task and its
    `asyncio.wait` per message.

    aiomqtt's iterator makes a task to get each message and waits on it and on the
    disconnection together: a task, a wait and their extra turns of the event loop for
    every uplink, even when the queue already holds the next one. Here a message is taken
    from aiomqtt's queue (`_queue`, private) as it comes; a disconnection with nothing
    left queued wakes the wait with a marker and ends the iteration as aiomqtt's does
    (MqttError), after the messages queued before it. Made once connected: aiomqtt
    replaces its disconnection future at each connect.
    """

    _LOST: Any = object()

    def __init__(self, client: aiomqtt.Client) -> None:
        self._queue: asyncio.Queue[Any] = client._queue
        self._disconnected: asyncio.Future[None] = client._disconnected
        self._disconnected.add_done_callback(self._wake)

    def _wake(self, _: asyncio.Future[None]) -> None:
        if self._queue.empty():
            self._queue.put_nowait(self._LOST)  # unbounded: aiomqtt's default queue

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> aiomqtt.Message:
        queue = self._queue
        if queue.empty() and self._disconnected.done():
            item = self._LOST
        else:
            item = queue.get_nowait() if not queue.empty() else await queue.get()
        if item is self._LOST:
            cause = self._disconnected.exception() if self._disconnected.done() else None
            raise aiomqtt.MqttError("Disconnected during message iteration") from cause
        message: aiomqtt.Message = item
        return message


PRESSURE_TAKEN = 50  # see InflightGate.__init__

# Bytes asked of the socket at once: many uplinks (about 0.6 kB each) per system call.
READ_CHUNK = 64 * 1024


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
    without it aiomqtt's queue would grow without end while the spool is slower than the
    broker. While paused the socket is not read, so TCP pushes back on the broker; a pause
    longer than the keep-alive ends the connection, and the broker redelivers what we did
    not ack. It is armed once subscribed: until then the SUBACKs must be read, whatever
    the broker redelivers first from our session.
    """

    def __init__(
        self, client: aiomqtt.Client, limit: int, pressure: IngestPressure | None = None
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
        self._limit = limit
        self._paused_fd: int | None = None
        self._armed = False
        self.taken = 0
        self._buffer = b""
        self._offset = 0
        paho_recv = self._paho._sock_recv
        on_message = self._paho.on_message
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

        def arrived(*args: Any) -> None:
            if on_message is not None:
                on_message(*args)
            self.taken += 1
            if self._pressure is not None and self.taken >= self._high:
                self._pressure.set(True)
            if self._armed and self.taken >= self._limit:
                self._pause()

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

    def arm(self) -> None:
        self._armed = True
        if self.taken >= self._limit:
            self._pause()

    def release(self) -> None:
        """One message is done with (acknowledged, or committed at QoS 0)."""
        self.taken -= 1
        if self._pressure is not None and self.taken <= self._low:
            self._pressure.set(False)
        if self._paused_fd is not None and self.taken < self._limit:
            self._resume()

    def _take_over(self, fd: int) -> None:
        sock = self._paho.socket()
        if sock is None or sock.fileno() != fd:
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
        if fd is None or sock is None or sock.fileno() != fd:
            return  # the connection is gone; aiomqtt has seen it close
        # aiomqtt's own reader callback is a closure we cannot get back; this one does
        # what it does. Bytes that arrived meanwhile, or wait in the buffer, are read at once.
        self._loop.add_reader(fd, self._read)
        self._loop.call_soon(self._read)

    def _read(self) -> None:
        try:
            while self._paused_fd is None:
                self._paho.loop_read()
                if self.buffered > 0 and self._paho.socket() is not None:
                    continue  # more packets in the buffer: no readable event will say so
                sock: Any = self._paho.socket()
                # An SSL socket may hold decoded bytes that no readable event announces.
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except Exception as exc:  # as aiomqtt's callback: a broken socket ends the session
            disconnected: asyncio.Future[None] = self._aiomqtt._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)
